"""Chat prompts in which each document is a placeholder of memory tokens, or its text.

A document read from memory becomes ``<MEM0>..<MEM{n-1}><SEP>``, and the embeddings at the
memory positions are later overwritten by the compressed vectors. The text reader (the text
stage, the distillation teacher, the text-RAG baselines) reads the same layout with each
document's text in its place (``text_context_prompt``).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from .config import ANSWER_TEMPLATE, SYSTEM_PROMPT
from .errors import InvalidInputError


# What templates read besides the messages. One fixed date for those that write one (Llama 3's
# reads date_string, SmolLM3's the clock through strftime_now): with today's, a prompt and its
# greedy answer changed from day to day, and a checkpoint loaded the next day was told its
# template lays prompts out otherwise. No thinking: a template that reads it (Qwen3's) opened
# every answer with a think block to write.
_TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024", "enable_thinking": False}
_TEMPLATE_DAY = datetime.date(2024, 7, 26)
_CLOCK = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")  # the formats a template asks the clock for


def render_chat(
    tokenizer: PreTrainedTokenizerBase, system: str, user: str, answer: str | None = None
) -> str:
    """One system + user turn through the tokenizer's chat template (see ``render_messages``).

    Without ``answer`` the generation prompt is opened; with it, the assistant turn is written
    right after that prompt, so that training sees the answer where generation produces it.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = render_messages(tokenizer, messages)
    if answer is None:
        return prompt
    full = render_messages(tokenizer, [*messages, {"role": "assistant", "content": answer}], open_answer=False)
    # some templates write a finished assistant turn otherwise than the turn they open (Qwen3
    # puts an empty think block before the answer); the answer then follows the opened prompt,
    # as it is generated
    found = answer.strip()  # templates may trim it
    start = full.find(found, len(prompt)) if found and full.startswith(prompt) else -1
    end = answer_turn_end(tokenizer)
    full = full if start >= 0 and not full[len(prompt):start].strip() else prompt + answer + end
    # a turn that ends in plain text ("\n") teaches no stop: the EOS does, unless the turn writes one
    if tokenizer.chat_template is not None and tokenizer.eos_token and tokenizer.eos_token not in end \
            and turn_end_token(tokenizer, end) is None:
        full += tokenizer.eos_token
    return full


def answer_turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes after an answer, e.g. ``<|im_end|>\n``: the generator
    is trained to produce it."""
    marker = "clara answer marker"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    full = render_messages(tokenizer, messages, open_answer=False)
    return full[full.rindex(marker) + len(marker):]


def turn_end_token(tokenizer: PreTrainedTokenizerBase, end: str | None = None) -> int | None:
    """The special token that opens the template's answer-turn end (``<|im_end|>``; ``end``
    when already rendered), where generation stops; None when the turn ends in plain text.
    White space before it is passed over: Llama 2's turn ends in " </s>", whose first token is
    a space (the reading gain counted its turn end as the answer's)."""
    end = answer_turn_end(tokenizer) if end is None else end
    first = tokenizer(end.lstrip(), add_special_tokens=False)["input_ids"][:1]
    if not first:
        return None
    # a template's token may be marked special without being listed among the special tokens
    # (Llama 3's <|eot_id|>): generation ran past it into a made-up next turn
    added = tokenizer.added_tokens_decoder.get(first[0])
    return first[0] if first[0] in tokenizer.all_special_ids or (added is not None and added.special) else None


def layout_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """The SHA-256 of an answering prompt and its answer as the tokenizer's chat template lays
    them out: a checkpoint records it, so that loading it with another template (another copy or
    revision of its base model) is told that its prompts are not those it was trained on."""
    return hashlib.sha256(question_prompt(tokenizer, "question", 1, "<document>", "answer").encode()).hexdigest()


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], open_answer: bool = True) -> str:
    """Chat messages ({role, content}) through the tokenizer's chat template.

    ``open_answer`` opens the assistant's turn for generation. A template that rejects the
    messages (Gemma's, Mistral's: no system role, turns that must alternate) gets the system
    text at the top of the first user turn and each run of one role's turns as one turn, and
    is refused by name if it still rejects them; a tokenizer without any chat template gets
    a plain-text layout.
    """
    if tokenizer.chat_template is None:
        answer = None if open_answer or messages[-1]["role"] != "assistant" else messages[-1]["content"]
        turns: list[str] = []
        for message in messages if answer is None else messages[:-1]:
            if message["role"] == "assistant" and turns:  # an earlier answer, labelled as the layout labels one
                turns[-1] += f"\nAnswer: {message['content']}"
            else:
                turns.append(message["content"])
        text = "\n\n".join(turns) + "\nAnswer:"
        text = _bos(tokenizer) + text  # prompts are tokenized without special tokens; templates write their own
        return text if answer is None else f"{text} {answer}{tokenizer.eos_token or ''}"
    try:
        return _ended(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_answer,
                                                    **_template_arguments(tokenizer)), open_answer)
    except TemplateError:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        rest: list[dict] = []
        for message in messages:
            if message["role"] == "system":
                continue
            if rest and rest[-1]["role"] == message["role"]:  # two user turns in a row (a tool's result read as user)
                rest[-1]["content"] += "\n\n" + message["content"]
            else:
                rest.append(dict(message))
        first_user = next((m for m in rest if m["role"] == "user"), None)
        if first_user is not None and system:
            first_user["content"] = f"{system}\n{first_user['content']}"
        try:
            return _ended(tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=open_answer,
                                                        **_template_arguments(tokenizer)), open_answer)
        except TemplateError as error:
            raise InvalidInputError(f"the model's chat template refuses these messages: {error}") from error


def _template_arguments(tokenizer: PreTrainedTokenizerBase) -> dict:
    """``apply_chat_template``'s arguments besides the messages: the template's variables, and for
    a template that reads the clock, the template itself behind a macro of the clock's name that
    gives the fixed day in each format the template asks for (a function cannot be passed in)."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or "strftime_now" not in template:
        return _TEMPLATE_VARIABLES
    clock = "{%- macro strftime_now(format) -%}{{- clara_day[format] -}}{%- endmacro -%}"
    return {**_TEMPLATE_VARIABLES, "chat_template": clock + template,
            "clara_day": {match[2]: _TEMPLATE_DAY.strftime(match[2]) for match in _CLOCK.finditer(template)}}


def _ended(text: str, open_answer: bool) -> str:
    """An opened answer's prompt without the spaces it ends in: the template's finished turn
    gives them to the answer's first word ("assistant: Marie" is "Ġ", "Marie" opened and ": ",
    "ĠMarie" written), so the generator writes that word with its space, as it is trained to."""
    return text.rstrip(" ") if open_answer else text


def _bos(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS token where the tokenizer starts every text with it (Llama, Mistral: they read
    worse without), else nothing."""
    if tokenizer.bos_token is None:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else ""


def prompt_positions(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Input positions the generator reads for a rendered prompt (a document placeholder
    counts its n memory positions and its <SEP>)."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def question_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    n_documents: int,
    document_placeholder: str,
    answer: str | None = None,
) -> str:
    """The paper's answering prompt: ``Background:`` with one placeholder per document."""
    user = ANSWER_TEMPLATE.format(documents=document_placeholder * n_documents, question=question)
    return render_chat(tokenizer, SYSTEM_PROMPT, user, answer)


def text_context_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, documents: list[str], answer: str | None = None
) -> str:
    """The same answering prompt with the documents as plain text (the text-RAG baseline)."""
    user = ANSWER_TEMPLATE.format(documents="\n\n".join(documents), question=question)
    return render_chat(tokenizer, SYSTEM_PROMPT, user, answer)


SCP_QA_SYSTEM = (
    "You are a helpful assistant. You are given a document. Your task is to generate questions "
    "that cover the key information of the document and to answer them in turn."
)

# The SCP kinds whose target rewrites the whole document: (system prompt, instruction).
# "reconstruct" (the document itself as target) and "continue" (the document's next part)
# need no teacher: cheap signals for the compressor when no teacher-written data exists.
SCP_REWRITES = {
    "paraphrase": ("You are a helpful assistant. Your task is to follow the instructions and paraphrase "
                   "the given text.", "Paraphrase the background in your own words."),
    "reconstruct": ("You are a helpful assistant. Your task is to follow the instructions and repeat "
                    "the given text.", "Repeat the background word for word."),
    "continue": ("You are a helpful assistant. Your task is to follow the instructions and continue "
                 "the given text.", "Continue the background where it stops."),
}


def scp_prompt(
    tokenizer: PreTrainedTokenizerBase, document_placeholder: str, kind: str, target: str | None = None
) -> str:
    """Salient-compressor pretraining: answer a document's QA, paraphrase or repeat it, from memory alone."""
    if kind == "qa":
        return render_chat(tokenizer, SCP_QA_SYSTEM, f"Background:\n{document_placeholder}", target)
    if kind in SCP_REWRITES:
        system, instruction = SCP_REWRITES[kind]
        return render_chat(tokenizer, system, f"Background:\n{document_placeholder}\n\n{instruction}", target)
    raise ValueError(f"unknown SCP sample kind {kind!r}: use 'qa', {', '.join(map(repr, SCP_REWRITES))}")


def scp_target(row: dict) -> str:
    """What the generator writes for an SCP row: one "Question: q\\nAnswer: a" block per QA
    pair, or the paraphrase (for "reconstruct", the document itself)."""
    if row["data_type"] == "qa":
        return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(row["question"], row["answers"]))
    return row["answers"][0]


def memory_prompt(tokenizer: PreTrainedTokenizerBase, document_placeholder: str, row: dict, k: int,
                  target: bool = True) -> str:
    """A training row read from memory tokens, its target too unless ``target`` is False: an SCP
    row (one document, ``data_type`` set) or an instruction row (a question over k documents)."""
    if "data_type" in row:
        return scp_prompt(tokenizer, document_placeholder, row["data_type"], scp_target(row) if target else None)
    return question_prompt(tokenizer, row["question"], k, document_placeholder, _answer(row) if target else None)


def memory_prompts(tokenizer: PreTrainedTokenizerBase, document_placeholder: str, rows: Sequence[dict],
                   k: int) -> tuple[list[str], list[str]]:
    """The prompts and the prompts + targets of training rows read from memory tokens."""
    return ([memory_prompt(tokenizer, document_placeholder, row, k, target=False) for row in rows],
            [memory_prompt(tokenizer, document_placeholder, row, k) for row in rows])


def text_prompt(tokenizer: PreTrainedTokenizerBase, row: dict, target: bool = True) -> str:
    """An instruction row read with its documents as text (the text stage's rows, and what a
    distillation teacher reads), its answer too unless ``target`` is False."""
    return text_context_prompt(tokenizer, row["question"], row["docs"], _answer(row) if target else None)


def text_prompts(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """The prompts and the prompts + answers of instruction rows read with their documents as text."""
    return [text_prompt(tokenizer, row, target=False) for row in rows], [text_prompt(tokenizer, row) for row in rows]


def trained_answers(row: dict) -> list[str]:
    """The answers a row trains the generator to write: an SCP row's (one a QA pair, or the
    rewrite), an instruction row's one."""
    return row["answers"] if "data_type" in row else [_answer(row)]


def _answer(row: dict) -> str:
    """An instruction row's target: its ``answer``, else the first of its ``answers``."""
    return row.get("answer") or row["answers"][0]
