"""The pydantic fields the framework models that read memory tokens share.

LangChain's ChatClara and LlamaIndex's ClaraLLM are pydantic models of their frameworks; both
take a CLaRa model, a store and k, and count what their generator read. Their count settings
share one type, and what holds a model is unpickled as a ``LeftBehind`` that refuses any use. Both frameworks depend on
pydantic, so this module is imported by the adapters only, never by ``clara_plugins`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
                      model_validator)

from .base_store import BaseMemoryStore, StoreLike, as_memory_store, id_list
from .checks import check_positive_int
from .checkpoint import check_compressor, compressor_signature
from .context import Reader, Reading, ReadingStats, read_messages
from .model import ClaraModel
from .pretrained import load_model


def _positive_count(value: object, info: ValidationInfo) -> object:
    """A count setting, as the core checks one: a numpy integer too, not True (read as 1)."""
    if value is None:
        return None
    check_positive_int(info.field_name, value)
    return int(value)


PositiveCount = Annotated[int | None, BeforeValidator(_positive_count)]


class LeftBehind:
    """What an object that holds a CLaRa model (and a store) becomes in another process, where
    any use of it raises: the model stays in the process that made it. Refused at pickling,
    LlamaIndex took the field out of the component holding it (whose copy then asked
    ``Settings.llm``); refused at unpickling, a pool's worker died and its pipeline hung."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # what pickling and printing look up
            raise AttributeError(attribute)
        raise self._refusal()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refusal()

    def _refusal(self) -> TypeError:
        return TypeError(f"{self.name} was unpickled without the CLaRa model it held, which is not pickled: build it "
                         "again where it is used (a LlamaIndex IngestionPipeline: run it without num_workers)")


class ReaderFields(BaseModel):
    """A CLaRa model (by default the store's, or the shipped checkpoint), the store whose
    documents it reads as memory tokens, k, and the running reading totals."""

    # a misspelt setting is refused, not dropped (ClaraLLM(model=m) answered from the shipped
    # checkpoint); ChatClara's LangChain base drops them, and it refuses them itself
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    # objects, not settings: left out of model_dump and to_json (the cache key names them), and of
    # repr (LangChain hands every callback the repr: the whole torch model's, 10 KB on a 2-layer one)
    clara: ClaraModel | None = Field(default=None, exclude=True, repr=False)
    store: StoreLike | None = Field(default=None, exclude=True, repr=False)  # the core store, once validated
    k: PositiveCount = None  # documents read as memory tokens at most (default: generation_top_k)
    _reader: Reader = PrivateAttr()
    _call_options: ClassVar[tuple[str, ...]] = ()  # what a framework passes each call, besides the options read

    @field_validator("store", mode="before")
    @classmethod
    def _memory_store(cls, value: Any) -> BaseMemoryStore | None:
        return None if value is None else as_memory_store(value)

    @model_validator(mode="after")
    def _default_model(self) -> ReaderFields:
        if self.clara is None:
            self.clara = self.store.model if self.store is not None else load_model()
        elif self.store is not None and self.clara is not self.store.model:
            # its generator reads the store's memories: they must be of its own compressor (dtypes: compressor_signature)
            check_compressor(compressor_signature(self.store.model), compressor_signature(self.clara),
                             "the store beside clara")
        self._reader = Reader(type(self).__name__)
        return self

    def __copy__(self) -> ReaderFields:
        """A copy (``model_copy``) counts its own readings: pydantic copies private attributes
        shallowly, so a copy's readings were added to the original's totals."""
        copied = super().__copy__()
        copied._reader = Reader(type(self).__name__)
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> ReaderFields:
        """A deep copy (``model_copy(deep=True)``) shares the model and a rate limiter, as a copy
        does (the store shares itself): copied, the model's weights were duplicated, and a
        limiter's lock failed the copy. A copy the enclosing deep copy made already is kept."""
        memo = {} if memo is None else memo
        for shared in (self.clara, getattr(self, "rate_limiter", None)):
            memo.setdefault(id(shared), shared)
        copied = super().__deepcopy__(memo)
        copied._reader = Reader(type(self).__name__)
        return copied

    def _answer(self, pairs: list[tuple[str, str]], messages: Sequence[Any], texts: list[str], call: dict[str, Any],
                max_tokens: int | None) -> tuple[Iterator[str], Reading]:
        """The answer's text pieces and what the generator read: the (role, text) ``pairs``, the
        documents passed as ``texts`` or by id (the call's ``document_ids``, an empty list too,
        else the ``messages``' ``additional_kwargs``, which both frameworks' messages carry), at
        most the call's ``max_tokens``, else ``max_tokens``. Any other call option is refused
        (``doc_ids=`` read no document), but the framework's own ``_call_options``."""
        unknown = sorted(set(call) - {"documents", "document_ids", "max_tokens", *self._call_options})
        if unknown:
            raise TypeError(f"{type(self).__name__} reads no call option {', '.join(unknown)}; it reads documents, "
                            "document_ids and max_tokens")
        check_greedy(type(self).__name__, call.get("temperature"))
        ids = call["document_ids"] if call.get("document_ids") is not None else [  # "ab" read as "a" and "b"
            i for number, message in enumerate(messages)
            for i in id_list(message.additional_kwargs.get("document_ids", []), f"message {number}'s document_ids")]
        reading = read_messages(self.clara, pairs, self.store, texts, ids, self.k)
        limit = call.get("max_tokens")
        pieces = self.clara.stream(reading.prompt, reading.memories, max_tokens if limit is None else limit)
        self._reader.count(reading)  # once the generator took the prompt: a refused call read nothing
        return pieces, reading

    def _usage(self, reading: Reading, text: str) -> dict[str, int]:
        """The positions the generator read (a document's memory tokens, not its text) and the
        answer's length in tokens (its text tokenized again), as the frameworks' counters read them."""
        output = len(self.clara.tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"input_tokens": reading.positions, "output_tokens": output,
                "total_tokens": reading.positions + output}

    def __reduce__(self) -> tuple:
        return LeftBehind, (type(self).__name__,)

    @property
    def stats(self) -> ReadingStats:
        """Running totals of what the generator read over this object's calls."""
        return self._reader.stats


def check_greedy(reader: str, temperature: object) -> None:
    """Refuse a temperature above 0, set or asked at a call: the generator decodes greedily."""
    if temperature not in (None, 0):
        raise ValueError(f"{reader} decodes greedily: temperature must be 0, got {temperature!r}")
