"""ClaraLLM: CLaRa's generator as a LlamaIndex LLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import ConfigDict

from clara_plugins import ClaraModel, MemoryStore
from clara_plugins.context import answer_pieces


class ClaraLLM(CustomLLM):
    """Answer a question from memory tokens.

    The prompt is the question. Documents come from the call keywords ``document_ids``
    (memory tokens read from ``store``) or ``documents`` (texts, reusing stored memory tokens
    where the store has the text); with neither, the model answers without documents.
    ``ClaraSynthesizer`` passes the retrieved nodes' ids, so a query engine answers from
    their stored memory tokens.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    clara: ClaraModel
    store: MemoryStore | None = None
    k: int = 5
    max_new_tokens: int | None = None
    model_name: str = "clara"
    read_text: bool = False  # the text-RAG baseline: documents pasted as text

    @classmethod
    def class_name(cls) -> str:
        return "ClaraLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=getattr(self.clara.lm.config, "max_position_embeddings", 2048),
            num_output=self.max_new_tokens or self.clara.config.max_new_tokens,
            model_name=self.model_name,
            is_chat_model=False,
        )

    def _pieces(self, question: str, kwargs: dict[str, Any]) -> Iterator[str]:
        ids, texts = kwargs.get("document_ids"), list(kwargs.get("documents") or [])
        if ids and self.store is None:
            raise ValueError("document_ids need a ClaraLLM with a store")
        return answer_pieces(self.clara, self.store, question, ids or [], texts, self.k, self.max_new_tokens,
                             self.read_text)[0]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="".join(self._pieces(prompt, kwargs)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces = self._pieces(prompt, kwargs)

        def responses() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return responses()
