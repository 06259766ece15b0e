"""ChatClara: a LangChain chat model that answers from CLaRa memory tokens.

The last human message is the question. The documents come, in order of precedence, from:

1. ``document_ids``: a call keyword (``chat.invoke(q, document_ids=[...])`` or
   ``chat.bind(document_ids=[...])``) or a message's ``additional_kwargs``; their memory
   tokens are read from ``store``;
2. ``documents``: a call keyword with texts or LangChain Documents;
3. the system messages: each blank-line-separated paragraph is one document (the layout of
   ``format_documents`` and ``CLARA_PROMPT``).

A text already in ``store`` reuses its stored memory tokens; any other text is compressed on
the spot. With more than ``k`` documents the query reasoner keeps the best ``k``.
``read_text=True`` turns it into the text-RAG baseline on the same backbone: the first ``k``
documents are pasted into the prompt as text and the plain base model reads them (or the
decoder of a checkpoint fine-tuned on text, ``clara train --stage text``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from pydantic import ConfigDict

from clara_plugins import ClaraModel, MemoryStore
from clara_plugins.context import answer_pieces

CLARA_PROMPT = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")])


def format_documents(documents: Sequence[Document]) -> str:
    """Retrieved Documents as the blank-line-separated context that ChatClara reads."""
    return "\n\n".join(document.page_content for document in documents)


class ChatClara(BaseChatModel):
    """Answer questions from CLaRa memory tokens, streaming, with usage metadata."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    clara: ClaraModel
    store: MemoryStore | None = None
    model_name: str = "clara"
    k: int = 5
    max_tokens: int | None = None
    stop: list[str] | None = None
    read_text: bool = False  # the text-RAG baseline: documents pasted as text

    @property
    def _llm_type(self) -> str:
        return "clara-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        config = self.clara.config
        return {"model_name": self.model_name, "base_model": config.base_model,
                "compression_rate": config.compression_rate, "k": self.k}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = {"ls_provider": "clara", "ls_model_name": kwargs.get("model", self.model_name),
                  "ls_model_type": "chat", "ls_max_tokens": self.max_tokens}
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------ documents

    def _question_and_sources(self, messages: list[BaseMessage], kwargs: dict) -> tuple[str, list[str], list[str]]:
        """The question, and the documents as store ids or as texts (one of the two is empty)."""
        humans = [m for m in messages if isinstance(m, HumanMessage)]
        if not humans:
            raise ValueError("ChatClara needs a human message: the question to answer")
        ids = kwargs.get("document_ids") or [
            i for m in messages for i in m.additional_kwargs.get("document_ids", [])
        ]
        if ids:
            if self.store is None:
                raise ValueError("document_ids need a ChatClara with a store")
            return humans[-1].text, list(ids), []
        if kwargs.get("documents"):
            return humans[-1].text, [], [d.page_content if isinstance(d, Document) else d
                                         for d in kwargs["documents"]]
        paragraphs = [p.strip() for m in messages if isinstance(m, SystemMessage)
                      for p in m.text.split("\n\n") if p.strip()]
        return humans[-1].text, [], paragraphs

    # ------------------------------------------------------------ generation

    def _pieces(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> tuple[Iterator[str], int]:
        """The answer's text pieces, cut at stop sequences, and the input positions read."""
        question, ids, texts = self._question_and_sources(messages, kwargs)
        pieces, positions = answer_pieces(self.clara, self.store, question, ids, texts, self.k,
                                          kwargs.get("max_tokens") or self.max_tokens, self.read_text)
        return _cut_at_stops(pieces, stop or self.stop or []), positions

    def _usage(self, input_positions: int, text: str) -> dict[str, int]:
        output = len(self.clara.tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"input_tokens": input_positions, "output_tokens": output,
                "total_tokens": input_positions + output}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pieces, positions = self._pieces(messages, stop, kwargs)
        text = "".join(pieces)
        message = AIMessage(content=text, usage_metadata=self._usage(positions, text),
                            response_metadata={"model_name": self.model_name})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        pieces, positions = self._pieces(messages, stop, kwargs)
        text = ""
        for piece in pieces:
            text += piece
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=self._usage(positions, text),
            response_metadata={"model_name": self.model_name}, chunk_position="last",
        ))


def _cut_at_stops(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Pass text through until a stop sequence appears; hold back what could start one."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    buffer = ""
    for piece in pieces:
        buffer += piece
        cut = min((buffer.find(s) for s in stops if s in buffer), default=-1)
        if cut >= 0:
            if buffer[:cut]:
                yield buffer[:cut]
            return
        if len(buffer) > hold:
            yield buffer[: len(buffer) - hold]
            buffer = buffer[len(buffer) - hold:]
    if buffer:
        yield buffer
