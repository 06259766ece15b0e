"""ClaraLLM: CLaRa's generator as a LlamaIndex LLM that reads documents from memory tokens.

Any prompt works: a completion prompt is one user message, a chat is its messages. Wherever
the prompt contains the text of a document held by ``store``, that text is read from the
stored memory tokens, in place (``clara_plugins.context`` states the rule), so LlamaIndex's
default query engines, synthesizers and chat engines read memory tokens with their own
prompts. The call keywords ``document_ids`` (store ids; or a message's
``additional_kwargs["document_ids"]``, as ChatClara reads them) and ``documents`` (texts) add
documents explicitly; ``ClaraSynthesizer`` passes each node's own text as ``documents``, which the
store reads from its memories where it holds the node. The
call keyword ``max_tokens`` limits one answer.

Each response's ``additional_kwargs["clara"]`` says how many documents were read as memory
tokens and how many positions the generator saw; ``stats`` keeps the running totals.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.schema import BaseNode, NodeWithScore

from clara_plugins.adapter_fields import PositiveCount, ReaderFields
from clara_plugins.backbone import context_window
from clara_plugins.config import ANSWER_TEMPLATE
from clara_plugins.context import Reading, chat_role, passed_documents
from clara_plugins.errors import InvalidInputError

# The layout the generator was trained on, for LlamaIndex's synthesizers
# (``index.as_query_engine(llm=llm, text_qa_template=CLARA_QA_PROMPT)``): with stored nodes as
# the context, the prompt is exactly CLaRa's answering prompt, unless the nodes carry metadata
# the LLM sees (a reader's file_path): those lines stay as text between the memories, where
# ClaraSynthesizer passes the nodes' texts alone.
CLARA_QA_PROMPT = PromptTemplate(ANSWER_TEMPLATE.format(documents="{context_str}", question="{query_str}"))

T = TypeVar("T")
_NO_STRUCTURED_OUTPUT = ("ClaraLLM has no structured output: CLaRa's generator answers in free text and was not "
                         "trained to follow a schema")
class ClaraLLM(ReaderFields, CustomLLM):
    """Answer from CLaRa memory tokens inside any LlamaIndex prompt.

    ``clara`` defaults to the store's model, or to the shipped default checkpoint; ``store``
    takes a ``clara_plugins.MemoryStore`` or ``MilvusMemoryStore``, or either framework's
    ``ClaraVectorStore``.
    """

    max_new_tokens: PositiveCount = None  # answer length limit (default: the model's)
    model_name: str = "clara"

    @classmethod
    def class_name(cls) -> str:
        return "ClaraLLM"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> ClaraLLM:
        """Settings written by ``to_dict``/``to_json`` with the model or store passed again: the
        dump holds neither, and read alone it answered from the shipped checkpoint unsaid."""
        if {**data, **kwargs}.get("clara") is None and {**data, **kwargs}.get("store") is None:
            raise InvalidInputError("a ClaraLLM's settings hold no CLaRa model or store: pass them again, "
                                    "ClaraLLM.from_json(text, clara=model) or store=store")
        return super().from_dict(data, **kwargs)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=context_window(self.clara.lm) or 2048,
            num_output=self.max_new_tokens or self.clara.config.max_new_tokens,
            model_name=self.model_name,
            is_chat_model=True,
        )

    def _pieces(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> tuple[Iterator[str], Reading]:
        """The answer's text pieces and what the generator read: the documents passed, by text or
        by id (the call's ``document_ids``, else its messages'), and ``max_tokens`` for this call."""
        texts = [_text(d) for d in passed_documents(kwargs.get("documents") or [])]
        return self._answer(_as_pairs(messages), messages, texts, kwargs, self.max_new_tokens)

    def _extras(self, reading: Reading, text: str) -> dict[str, Any]:
        """A response's report of what the generator read, and its usage where LlamaIndex's token
        counter reads it (it counted the documents' text, read as far fewer memory tokens)."""
        return {"additional_kwargs": {"clara": reading.summary()}, "raw": {"usage": self._usage(reading, text)}}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    # The async methods generate on worker threads, a token per call, so that the event loop is not
    # held meanwhile and a cancelled call stops generating (one call for the whole answer went on to
    # its last token); they call the undecorated parts, whose decorated sync methods would fire
    # every callback again.
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        pieces, reading = await asyncio.to_thread(self._pieces, [_user(prompt)], kwargs)
        text = "".join([piece async for piece in off_the_loop(pieces)])
        return CompletionResponse(text=text, **self._extras(reading, text))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return off_the_loop(await asyncio.to_thread(self._stream_complete, prompt, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        pieces, reading = await asyncio.to_thread(self._pieces, messages, kwargs)
        text = "".join([piece async for piece in off_the_loop(pieces)])
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                            **self._extras(reading, text))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return off_the_loop(await asyncio.to_thread(self._stream_chat, messages, kwargs))

    # refused before any generation: the answer, parsed as JSON after it, failed on "Could not extract json"
    def structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_STRUCTURED_OUTPUT)

    async def astructured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_STRUCTURED_OUTPUT)

    def stream_structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_STRUCTURED_OUTPUT)

    async def astream_structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_STRUCTURED_OUTPUT)

    def as_structured_llm(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_STRUCTURED_OUTPUT)

    def _complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        pieces, reading = self._pieces([_user(prompt)], kwargs)
        text = "".join(pieces)
        return CompletionResponse(text=text, **self._extras(reading, text))

    def _stream_complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponseGen:
        pieces, reading = self._pieces([_user(prompt)], kwargs)
        return _accumulated(pieces, lambda text, delta: CompletionResponse(text=text, delta=delta,
                                                                           **self._extras(reading, text)))

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        pieces, reading = self._pieces(messages, kwargs)
        text = "".join(pieces)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                            **self._extras(reading, text))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        pieces, reading = self._pieces(messages, kwargs)
        return _accumulated(pieces, lambda text, delta: ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, **self._extras(reading, text)))


def _accumulated(pieces: Iterator[str], response: Callable[[str, str], T]) -> Iterator[T]:
    """A response (text so far, delta) per piece, and one for an empty answer too: LlamaIndex's
    callbacks end on the last response."""
    text = ""
    for piece in pieces:
        text += piece
        yield response(text, piece)
    if not text:
        yield response("", "")


async def off_the_loop(items: Iterator[T]) -> AsyncIterator[T]:
    """A generator's items for async callers: each is made on a worker thread, so that the
    event loop is not held while the generator runs."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item


def _user(prompt: str) -> ChatMessage:
    """A completion prompt as the one user message it is read as."""
    return ChatMessage(role=MessageRole.USER, content=prompt)


def _as_pairs(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """(role, text) of each message; an image, a file or a tool call, which the generator cannot
    read, is refused rather than dropped (the answer was as if it had never been sent)."""
    for number, message in enumerate(messages):
        unread = [type(block).__name__ for block in message.blocks
                  if not isinstance(block, (TextBlock, ThinkingBlock, CachePoint))]  # a caching mark holds nothing
        if unread or message.additional_kwargs.get("tool_calls"):
            raise InvalidInputError(f"ClaraLLM reads text only: message {number} holds "
                                    f"{', '.join(unread or ['tool_calls'])}")
    return [(chat_role(MessageRole(m.role).value), m.content or "") for m in messages]


def _text(document: object) -> object:
    """A passed document's text: a node's or a scored node's content (``get_content()``, as
    LlamaIndex's synthesizers read it), anything else as it is, for the core to check."""
    if isinstance(document, NodeWithScore):
        document = document.node
    return document.get_content() if isinstance(document, BaseNode) else document
