"""ClaraEmbedding: CLaRa's retrieval keys as a LlamaIndex embedding model."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import torch
from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import ConfigDict, Field, computed_field, model_validator

from clara_plugins import ClaraModel, InvalidInputError, StoreError
from clara_plugins.adapter_fields import LeftBehind
from clara_plugins.checkpoint import check_compressor, compressor_signature
from clara_plugins.errors import warn_bounded
from clara_plugins.keys import ClaraKeys, normalize_rows
from clara_plugins.model import compress_in_parts
from clara_plugins.pretrained import load_model

# Memory tokens remembered per model until a ClaraVectorStore takes them. An IngestionPipeline
# embeds every node before its store takes any: 1 GiB holds 58,000 CR16 passages of SmolLM2.
_KEEP_BYTES = 2**30
_untaken: WeakKeyDictionary[ClaraModel, OrderedDict[str, torch.Tensor]] = WeakKeyDictionary()
_takers: WeakSet[ClaraModel] = WeakSet()  # the models of the ClaraVectorStores made so far
_untaken_lock = threading.Lock()


class ClaraEmbedding(BaseEmbedding):
    """The keys ClaraVectorStore searches, for any LlamaIndex vector store to hold.

    A text's vector is the retrieval key of its memory tokens (rounded to fp16, as a
    MemoryStore keeps them), a query's that of the query reasoner's memory of it; both have
    unit norm, so ``SimpleVectorStore`` or any other cosine store ranks as a ClaraVectorStore
    with the default flat float16 index does. A vector holds ``hidden`` values with the mean key (576 for the default model) and
    n_mem x hidden with the flattened one. Without a model the shipped default one is loaded.

    ``VectorStoreIndex`` embeds every node before it hands the node to its vector store, so
    once a ClaraVectorStore of the same model exists, the memory tokens computed here are
    remembered (per model, the last ``_KEEP_BYTES`` of them, whichever store the index writes to) and
    the store takes them instead of compressing the text again. Before any such store exists,
    nothing is kept.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # an object, not a setting: left out of to_json and repr; the shipped default model where none is given
    clara: ClaraModel | None = Field(default=None, exclude=True, repr=False)
    model_name: str = "clara-memory-tokens"

    @model_validator(mode="after")
    def _default_model(self) -> ClaraEmbedding:
        """Without a model the shipped default one, as the other CLaRa classes load it (a bare
        "clara Field required" before)."""
        if self.clara is None:
            self.clara = load_model()
        return self

    @classmethod
    def class_name(cls) -> str:
        return "ClaraEmbedding"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> ClaraEmbedding:
        """Settings written by ``to_dict``/``to_json`` with their model passed again: the dump
        holds only its signature, and read alone the shipped checkpoint embedded unsaid, with
        vectors no store of the written model's matches."""
        if {**data, **kwargs}.get("clara") is None:
            raise InvalidInputError("a ClaraEmbedding's settings hold no CLaRa model: pass it again, "
                                    "ClaraEmbedding.from_json(text, clara=model)")
        embedding = super().from_dict(data, **kwargs)
        written = data.get("clara_model")
        if isinstance(written, dict):  # compared as a store compares them: one checkpoint in another dtype matches
            current = embedding.clara_model
            try:
                check_compressor(written, current, "a store of these settings", remedy="pass the model they were "
                                 "written with")
            except StoreError as error:
                raise InvalidInputError(str(error)) from None
            if written.get("retrieval_key") != current["retrieval_key"]:
                raise InvalidInputError(f"a store of these settings keys documents by the {written.get('retrieval_key')!r} "
                                        "retrieval key: pass the model they were written with")
        return embedding

    def __reduce__(self) -> tuple:  # it hands its memory tokens to the store in this process
        return LeftBehind, (type(self).__name__,)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> ClaraEmbedding:
        """A deep copy (a vector store's, an IngestionPipeline's) shares the model: copied, its
        weights were duplicated, and the memory tokens it computed reached no store."""
        memo = {} if memo is None else memo
        memo.setdefault(id(self.clara), self.clara)
        return super().__deepcopy__(memo)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def clara_model(self) -> dict:
        """The CLaRa model in the settings (an ingestion cache keys on them): what fixes a text's
        vector, its compressor (weights included, trained or not) and its retrieval key."""
        return {**compressor_signature(self.clara), "retrieval_key": self.clara.config.retrieval_key}

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        """A text of whitespace alone (a blank node without metadata) has nothing to compress:
        its vector is ``ClaraKeys.blank_key``. ClaraVectorStore stores no node whose own text
        is blank."""
        # the texts come in batches of embed_batch_size (the store's batch size, for the store's own)
        keys, memories = ClaraKeys(self.clara).keys_and_memories(texts, batch_size=self.embed_batch_size)
        forgotten = 0
        with _untaken_lock:
            if self.clara in _takers and len(memories):  # else no store of this model would ever take them
                untaken = _untaken.setdefault(self.clara, OrderedDict())
                for text, memory in zip([text for text in texts if text.strip()], memories):
                    untaken[text] = memory.clone()  # a row of its own: a view held the whole batch
                    untaken.move_to_end(text)
                while len(untaken) > max(1, _KEEP_BYTES // memories[0].nbytes):
                    untaken.popitem(last=False)
                    forgotten += 1
        if forgotten:
            warn_bounded(f"{forgotten} texts' memory tokens were forgotten before a ClaraVectorStore took them "
                         f"(it keeps {_KEEP_BYTES / 2**30:g} GiB): the store compresses those texts again; "
                         "add the nodes in smaller batches (texts this embedding serves for another store or "
                         "a splitter are kept too, once a ClaraVectorStore of the model exists)", stacklevel=2)
        return keys.tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        # one batch, not one compression per text, on a worker thread: the event loop goes on meanwhile
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def _get_query_embedding(self, query: str) -> list[float]:
        return normalize_rows(ClaraKeys(self.clara).query_keys([query]))[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)


def expect_takers(model: ClaraModel) -> None:
    """A ClaraVectorStore of this model will take the memory tokens its embeddings compute."""
    with _untaken_lock:
        _takers.add(model)


def forget_memories(model: ClaraModel, texts: list[str]) -> None:
    """Drop the memory tokens kept for texts no store will take (nodes a store leaves out): kept,
    they held their share of ``_KEEP_BYTES`` until a warning counted them as forgotten."""
    with _untaken_lock:
        untaken = _untaken.get(model, OrderedDict())
        for text in texts:
            untaken.pop(text, None)


def take_memories(model: ClaraModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """Memory tokens [n, n_mem, hidden] (fp16) of the texts: those a ClaraEmbedding of this
    model computed are handed over and forgotten, the rest are compressed now (``batch_size``
    at a time)."""
    with _untaken_lock:
        untaken = _untaken.get(model, OrderedDict())
        remembered = {text: untaken.pop(text) for text in dict.fromkeys(texts) if text in untaken}
    missing = [text for text in dict.fromkeys(texts) if text not in remembered]
    if missing:
        # nodes embedded elsewhere, or forgotten before the store took them: a bar past one batch
        compressed = compress_in_parts(model, missing, batch_size, show_progress=len(missing) > batch_size,
                                       stacklevel=4)
        remembered.update(zip(missing, torch.from_numpy(compressed)))
    return torch.stack([remembered[text] for text in texts])
