"""The text-RAG baseline on CLaRa's own backbone: documents pasted into the prompt as text.

The same answering prompt as CLaRa's, with each document's text where CLaRa puts its memory
placeholder. The plain base model reads it, or, for a checkpoint trained by ``clara train
--stage text`` (``decoder_reads_text``), the decoder adapter fine-tuned on text
(``clara_plugins.passes.text_weights``). Empty document lists give the no-retrieval baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

from clara_plugins import ClaraModel
from clara_plugins.checks import check_texts
from clara_plugins.passes import text_weights
from clara_plugins.prompts import text_context_prompt


def text_prompt(model: ClaraModel, question: str, documents: Sequence[str]) -> str:
    return text_context_prompt(model.tokenizer, question, list(documents))


def read_text(model: ClaraModel, questions: Sequence[str], documents: Sequence[Sequence[str]],
              max_new_tokens: int | None = None) -> list[str]:
    """Answer each question from its documents read as text."""
    questions = check_texts(questions, "questions")
    if isinstance(documents, str) or len(documents) != len(questions):
        raise ValueError("documents must hold one list of documents per question")
    for number, docs in enumerate(documents):  # a lone string would be read one character per document
        if docs:
            check_texts(docs, f"documents[{number}]")
    prompts = [text_prompt(model, q, docs) for q, docs in zip(questions, documents)]
    with text_weights(model):
        return model.generate(prompts, max_new_tokens=max_new_tokens)

