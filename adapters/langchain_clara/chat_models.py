"""ChatClara: a LangChain chat model that reads documents from CLaRa memory tokens.

Any prompt works: the whole conversation (system, human and AI messages) is the prompt, and
wherever it contains the text of a document held by ``store`` that text is read from the
stored memory tokens, in place (``clara_plugins.context`` states the rule). Documents can
also be passed explicitly, as store ids (``chat.invoke(q, document_ids=[...])``,
``chat.bind(document_ids=[...])`` or a message's ``additional_kwargs``) or as texts or
LangChain Documents (``documents=[...]``): those missing from the prompt go into a
``Background:`` block at the start of the last human message, whose text follows ``Question:`` (a block
the message holds takes them first). With more than ``k`` documents the
query reasoner keeps the best ``k``.

Each response's ``response_metadata["clara"]`` says how many documents were read as memory
tokens (from the store, or compressed on the spot) and how many positions the generator saw;
``stats`` keeps the running totals.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel, agenerate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from pydantic import model_validator

from clara_plugins.adapter_fields import PositiveCount, ReaderFields, check_greedy
from clara_plugins.checkpoint import adapters_sha256
from clara_plugins.errors import InvalidInputError
from clara_plugins.config import ANSWER_TEMPLATE, SYSTEM_PROMPT
from clara_plugins.context import Reading, chat_role, passed_documents

# The layout the generator was trained on: with documents from the store as {context}, the
# prompt is exactly CLaRa's answering prompt.
CLARA_PROMPT = ChatPromptTemplate.from_messages(
    [("system", SYSTEM_PROMPT), ("human", ANSWER_TEMPLATE.format(documents="{context}", question="{question}"))]
)


def format_documents(documents: Sequence[Document]) -> str:
    """Retrieved Documents as one blank-line-separated context."""
    return "\n\n".join(document.page_content for document in documents)


class ChatClara(ReaderFields, BaseChatModel):
    """Answer from CLaRa memory tokens inside any prompt, streaming, with usage metadata.

    ``clara`` defaults to the store's model, or to the shipped default checkpoint; ``store``
    takes a ``clara_plugins.MemoryStore`` or ``MilvusMemoryStore``, or either framework's
    ``ClaraVectorStore``. With an LLM cache, an answer read with a store is keyed by that store
    object and the changes made through it: it is served again within the process, not after
    the store is opened anew. Other clients' writes to a shared Milvus collection do not reach
    the key, so an answer cached there can outlive them: leave the cache off for such a store.
    """

    model_name: str = "clara"
    max_tokens: PositiveCount = None  # answer length limit (default: the model's max_new_tokens)
    stop: list[str] | None = None
    streaming: bool = False  # invoke streams to the callbacks, as LangChain's chat models do when it is set
    _call_options: ClassVar[tuple[str, ...]] = ("stream", "temperature")  # LangChain's, besides the readers' own

    @model_validator(mode="before")
    @classmethod
    def _known_settings(cls, values: Any) -> Any:
        """Refuse a setting ChatClara does not have (LangChain's base drops it: ChatClara(model=m)
        answered from the shipped checkpoint), but the settings LangChain gives every chat model,
        which a local greedy generator has no use for; a temperature above 0 it cannot honour."""
        if isinstance(values, dict):
            unknown = sorted(set(values) - set(cls.model_fields) - set(_STANDARD_SETTINGS))
            if unknown:
                raise ValueError(f"ChatClara has no setting {', '.join(unknown)} (the CLaRa model is clara=)")
            check_greedy("ChatClara", values.get("temperature"))
        return values

    @property
    def _llm_type(self) -> str:
        return "clara-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        config = self.clara.config
        return {"model_name": self.model_name, "checkpoint": self.clara.name_or_path,
                # every setting: unsaved models of one base model and rate answered from one cache key
                "config": config.to_dict(),
                "base_model": config.base_model,
                # one checkpoint answers otherwise in bfloat16 (a GPU's "auto") than in float32
                "dtype": str(self.clara.lm.dtype),
                "compression_rate": config.compression_rate, "k": self.k or config.generation_top_k,
                "max_tokens": self.max_tokens or config.max_new_tokens,
                "default_stop": self.stop,  # "stop" is the call's own stop in LangChain's cache key
                # the store decides which prompt text is read as memory tokens: a cached answer
                # is never served for another store object's reading, nor after it changed
                "store": None if self.store is None else f"{self.store.instance_id}@{self.store.revision}"}

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """The cache key: the settings, and the weights (a checkpoint saved again under its
        folder answers anew, and unsaved models by their adapters), hashed only where a cache
        asks (every call hashed an unsaved model's adapters, 58 MB for SmolLM2's)."""
        for name in ("documents", "document_ids"):
            if isinstance(kwargs.get(name), Iterator):  # keyed by its address, which the next iterator reuses
                raise InvalidInputError(f"with an LLM cache, pass {name} as a list: an iterator is read once, and "
                                        "keyed the cache by its address alone (another call's answer was served)")
        weights = self.clara.weights_sha256 or adapters_sha256(self.clara)
        return f"{super()._get_llm_string(stop, **kwargs)}---weights={weights}"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = {"ls_provider": "clara", "ls_model_name": kwargs.get("model", self.model_name),
                  # a call's own cap, as the answer is cut at it
                  "ls_model_type": "chat", "ls_max_tokens": kwargs.get("max_tokens", self.max_tokens)}
        stops = self.stop if stop is None else stop
        if stops:
            params["ls_stop"] = stops
        return params

    # ------------------------------------------------------------ the prompt

    def _pieces(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> tuple[Iterator[str], Reading]:
        """The answer's text pieces, cut at stop sequences, and what the generator read."""
        passed = passed_documents(kwargs.get("documents") or [])
        texts = [d.page_content if isinstance(d, Document) else d for d in passed]
        stops = (self.stop if stop is None else stop) or []  # a call's own, [] too, replaces the default
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):  # "User:" cut at any letter
            raise InvalidInputError(f"stop must be a list of non-empty strings, got {stops!r}")
        pairs = [(_role(m), _text(m, number)) for number, m in enumerate(messages)]
        pieces, reading = self._answer(pairs, messages, texts, kwargs, self.max_tokens)
        return _cut_at_stops(pieces, stops), reading

    def get_token_ids(self, text: str) -> list[int]:
        """The generator's own tokens (LangChain's default tokenizer is GPT-2's, a download):
        what ``trim_messages`` and ``get_num_tokens`` count, as ``usage_metadata`` counts an
        answer's (its input counts a document's memory positions, not its text, so trimming by
        text errs on the safe side); a ``custom_get_token_ids`` given comes first, as for any
        LangChain model."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.clara.tokenizer(text, add_special_tokens=False)["input_ids"]

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        raise NotImplementedError("ChatClara cannot call tools: CLaRa's generator was trained to answer "
                                  "questions from documents, not to emit tool calls")

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ChatClara has no structured output: CLaRa's generator answers in free "
                                  "text and was not trained to follow a schema")

    def _metadata(self, reading: Reading) -> dict[str, Any]:
        return {"model_name": self.model_name, "clara": reading.summary()}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        pieces, reading = self._pieces(messages, stop, kwargs)
        text = "".join(pieces)
        message = AIMessage(content=text, usage_metadata=self._usage(reading, text),
                            response_metadata=self._metadata(reading))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # the stream's pieces, each made on a worker thread: a cancelled call stops generating
        # (LangChain's default ran _generate in one, which went on to the answer's last token)
        return await agenerate_from_stream(self._astream(messages, stop, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        pieces, reading = self._pieces(messages, stop, kwargs)
        text = ""
        for piece in pieces:
            text += piece
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=self._usage(reading, text),
            response_metadata=self._metadata(reading), chunk_position="last",
        ))


# what LangChain's standard tests give every chat model; accepted and not read, but for a
# temperature above 0, which is refused
_STANDARD_SETTINGS = ("temperature", "timeout", "max_retries", "api_key")


def _role(message: BaseMessage) -> str:
    """The chat-template role of a LangChain message (their chunks too); a ChatMessage's role
    is read as ClaraLLM reads it (``chat_role``), and tool and function results as user text."""
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    return chat_role(message.role) if isinstance(message, ChatMessage) else "user"


def _text(message: BaseMessage, number: int) -> str:
    """A message's text; an image, a file or a tool call, which the generator cannot read, is
    refused rather than dropped (the answer was as if it had never been sent)."""
    blocks = message.content if isinstance(message.content, list) else []
    unread = [block.get("type", "?") for block in blocks
              if isinstance(block, dict) and block.get("type") not in ("text", "reasoning", "thinking")]
    if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls  # unparsed arguments
                                           or message.additional_kwargs.get("function_call")):  # OpenAI's older form
        unread.append("tool_call")
    if unread:
        raise InvalidInputError(f"ChatClara reads text only: message {number} holds {', '.join(unread)}")
    return message.text


def _cut_at_stops(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Pass text through until a stop sequence appears, and cut it where the earliest one
    starts, however the text comes in pieces; hold back what could start one. The answer ends
    without trailing whitespace (as ``generate``'s), so a stop that ends in whitespace is not
    found when the generator wrote it last: "France." is no ". " stop."""
    if not stops:
        yield from pieces
        return
    buffer = ""
    for piece in pieces:
        buffer += piece
        found, unfinished = _first_stop(buffer, stops), _first_unfinished_stop(buffer, stops)
        # a stop found ends the text, unless one that starts earlier may still finish ("</answer"
        # of "</answer>" before the "answer" found: one piece per character cut at "Paris</")
        if found is not None and (unfinished is None or found <= unfinished):
            if buffer[:found]:
                yield buffer[:found]
            return
        safe = min(x for x in (found, unfinished, len(buffer)) if x is not None)
        if safe:
            yield buffer[:safe]
            buffer = buffer[safe:]
    found = _first_stop(buffer, stops)
    if buffer[:found]:
        yield buffer[:found]


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence in ``text`` starts."""
    return min((text.find(s) for s in stops if s in text), default=None)


def _first_unfinished_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence that ``text`` ends inside of starts ("Paris</ans" for
    "</answer>")."""
    longest = max(len(s) for s in stops)
    return next((start for start in range(max(0, len(text) - longest + 1), len(text))
                 if any(len(s) > len(text) - start and s.startswith(text[start:]) for s in stops)), None)
