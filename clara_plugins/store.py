"""MemoryStore: documents kept as CLaRa memory tokens, searchable with faiss, saved without pickle.

Per document the store keeps its text, its metadata, its memory tokens (the generator's input:
fp16, or int8 with one scale per memory vector) and a retrieval key. CLaRa's key is the
normalised mean (or flattened) memory, so it is computed from the memory when needed, never
stored twice. Other key encoders' keys are stored beside the memories.

On disk a store is a folder of generations. ``CURRENT`` names the live one; each generation
holds ``store.json`` (format, memory dtype, compressor signature, shard lists),
``records-*.json`` shards (ids, texts, metadata), ``memories-*.npy`` shards (memory-mappable;
with ``scales-*.npy`` for int8) and, for approximate indexes, faiss's own ``index.faiss`` (with
the compact index's ``index-centre.npy`` and ``index-projection.npy``). Stores of format 2 (one
``records.json``) still load; format 1's (before int8 memories) signed their compressor as no
version since does, and are refused by name. A save
writes a new generation aside and then flips ``CURRENT`` with one atomic rename, so a crash
mid-save leaves the previous generation loadable, and readers of the previous generation keep
working while a writer saves. Shards whose rows are unchanged since the store's last save or
load are hard-linked from that generation, not written again: files in a generation are never
changed once written. Writers take turns (a lock file); ``store.json`` holds the SHA-256 of
every other file, checked at load.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import numbers
import os
import re
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm
from numpy.typing import DTypeLike

from .atomic import hold_lock, sync_entry, sync_tree, write_file_atomically, write_text_atomically
from .backbone import fingerprint_mismatch
from .checkpoint import compressor_signature
from .checks import check_positive_int, check_texts
from .errors import InvalidInputError, StoreError
from .jsonfiles import read_json
from .compact import MIN_ROWS, RETRAIN_GROWTH, TRAINING_ROWS, CompactIndex, dequantize, quantize
from .config import INDEX_KINDS, MEMORY_DTYPES
from .filters import Filter, matches, validate_filter
from .found import find_documents, found_lookup, found_text
from .keys import ClaraKeys, KeyEncoder, maximal_marginal_relevance, normalize_rows
from .model import ClaraModel

FORMAT = "clara-memory-store/3"
FORMAT_2 = "clara-memory-store/2"  # every record in one records.json, written again at each save
FORMAT_1 = "clara-memory-store/1"  # its compressor signature hashed fp32 weights: refused
FETCH_K = 20  # the nearest documents a diverse (MMR) search re-ranks, unless told
SHARD_ROWS = 4096  # rows per file on disk, and per batch when keys are computed
CALIBRATION_SAMPLE = 256  # documents whose pairwise cosines calibrate relevance
# candidates the compact index hands over per result, re-scored exactly: at 1M synthetic
# passages 20 found 94.4 % of the exact top 10 in 25 ms p95, 40 found 96.0 % in 36 ms
# (docs/benchmarks, store_scale)
RESCORE_FACTOR = 40
# hnsw: faiss' default breadth of search (16) found 74 % of the exact top 10 among 10k CLaRa
# keys, 128 found 96 % at 0.5 ms a query (docs/benchmarks, store_scale); construction as faiss'
HNSW_EF_SEARCH = 128
_GENERATION = re.compile(r"^gen-(\d{6})$")
_STORE_ENTRY = re.compile(r"^(gen-\d{6}|\.staging-[0-9a-f]{32}|\.lock|\.CURRENT(\.[0-9a-f]{16})?\.(tmp|new))$")  # besides CURRENT
_STORE_FILE = re.compile(r"^(records(-\d{5})?\.json|index\.faiss|index-(centre|projection)\.npy|"
                         r"(memories|scales|keys)-\d{5}\.npy)$")
# header field: the names of its shard files
_SHARD_FILES = {"memory_shards": "memories-{:05d}.npy", "scale_shards": "scales-{:05d}.npy",
                "key_shards": "keys-{:05d}.npy", "record_shards": "records-{:05d}.json"}


@dataclasses.dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    metadata: dict[str, Any]


class BaseMemoryStore(ABC):
    """What the adapters, the generator's context and training ask of a store of CLaRa
    memories, so that any backend serves them all: ``MemoryStore`` (memory and a folder) or
    ``milvus_store.MilvusMemoryStore`` (a Milvus collection).

    A subclass keeps per document its text, metadata, memory tokens and a unit-norm key, and
    sets ``_pair_cosines`` to None whenever its documents change.
    """

    def __init__(self, model: ClaraModel, keys: KeyEncoder | None, batch_size: int) -> None:
        check_positive_int("batch_size", batch_size)  # before a first upsert compresses nothing
        self.model = model
        self.keys = keys or ClaraKeys(model)
        self.batch_size = batch_size
        self._lock = threading.RLock()
        self._pair_cosines: np.ndarray | None = None  # see relevance; None when stale
        self.instance_id = uuid.uuid4().hex  # names this store object, e.g. in a chat model's cache key
        self.revision = 0  # counts this object's writes: a chat model's cached answer never outlives one

    def _changed(self) -> None:
        """Note a write (under the lock): the calibration of relevance is stale, and so is an
        answer cached before it."""
        self._pair_cosines = None
        self.revision += 1

    @abstractmethod
    def __len__(self) -> int:
        """The number of stored documents."""

    @abstractmethod
    def upsert(self, texts: Sequence[str], ids: Sequence[str] | None = None,
               metadatas: Sequence[dict[str, Any]] | None = None, show_progress: bool = False,
               memories: torch.Tensor | None = None) -> list[str]:
        """Compress and add documents; an id already stored is replaced. Returns the ids."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; ids that are not stored are ignored."""

    @abstractmethod
    def get(self, ids: Sequence[str]) -> list[StoredDocument]:
        """Documents in the order asked; ids that are not stored are skipped."""

    @abstractmethod
    def memories(self, ids: Sequence[str]) -> torch.Tensor:
        """Memory tokens [len(ids), n_mem, hidden] (float32) for the generator."""

    def memories_as_found(self, found: Sequence[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
        """The memory tokens [n_mem, hidden] of each (id, text as a prompt held it) pair whose
        document still holds that text, each read with its text: a document deleted or
        rewritten since it was found is left out (its text is read instead)."""
        stored = self._texts_and_memories(list(dict.fromkeys(doc_id for doc_id, _ in found)))
        return {(doc_id, text): stored[doc_id][1] for doc_id, text in found
                if doc_id in stored and found_text(stored[doc_id][0]) == text}

    def _texts_and_memories(self, ids: list[str]) -> dict[str, tuple[str, torch.Tensor]]:
        """Each stored id's text and memory tokens, read in one hold of the lock."""
        with self._lock:
            documents = self.get(ids)
            try:
                memories = self.memories([document.id for document in documents]) if documents else []
            except InvalidInputError:  # a store written from outside this object: deleted in between
                return {}
        return {document.id: (document.text, memory) for document, memory in zip(documents, memories)}

    @abstractmethod
    def ids_where(self, where: Filter) -> list[str]:
        """Ids of the documents whose metadata satisfies a filter."""

    @abstractmethod
    def ids_for_texts(self, texts: Sequence[str]) -> list[str | None]:
        """The stored id of each exact text, or None."""

    @abstractmethod
    def documents_in(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text``, as a prompt
        holds it (``found_text``: the whitespace around it may be trimmed)."""

    @abstractmethod
    def all_ids(self) -> list[str]:
        """Every stored id."""

    @abstractmethod
    def search_by_key(
        self, key: np.ndarray, k: int = 4, where: Filter | None = None, *, ids: Collection[str] | None = None,
        lambda_mult: float = 1.0, fetch_k: int = FETCH_K,
    ) -> list[tuple[StoredDocument, float]]:
        """Like ``search`` for a query key computed elsewhere."""

    @abstractmethod
    def _sample_pair_cosines(self) -> np.ndarray:
        """Sorted cosines between distinct documents of a sample spread over the store."""

    def search(
        self, query: str, k: int = 4, where: Filter | None = None, *, ids: Collection[str] | None = None,
        lambda_mult: float = 1.0, fetch_k: int = FETCH_K,
    ) -> list[tuple[StoredDocument, float]]:
        """The k documents most similar to the query (cosine), best first.

        ``where`` filters by metadata; ``ids`` keeps only those documents as candidates.
        ``lambda_mult`` below 1 trades similarity for diversity: the ``fetch_k`` most similar
        documents are re-ranked by maximal marginal relevance (0: the most diverse; see
        ``keys.maximal_marginal_relevance``). Scores stay the cosines to the query.
        """
        check_texts([query], "query")
        check_search(k, where, lambda_mult, fetch_k)  # before the query is encoded
        return self.search_by_key(self.keys.query_keys([query])[0], k, where, ids=ids,
                                  lambda_mult=lambda_mult, fetch_k=fetch_k)

    def relevance(self, cosine: float) -> float:
        """A query-document cosine as a relevance in [0, 1]: the fraction of pairs of stored
        documents that are less similar to each other than the query is to this document.

        Raw cosines of CLaRa keys do not spread over [-1, 1] (the keys share directions, so
        unrelated texts can score high), and their range differs from model to model. Ranked
        against the store's own document pairs, 0.5 means as similar as a typical pair of
        stored documents and 0.95 closer than 95% of them, whatever the model. The pairs come
        from at most CALIBRATION_SAMPLE documents spread evenly over the store, recomputed
        after any change. With fewer than two documents there is nothing to rank against and
        the relevance is ``(1 + cosine) / 2``.
        """
        with self._lock:
            if self._pair_cosines is None:
                self._pair_cosines = self._sample_pair_cosines()
            pairs = self._pair_cosines
        if not len(pairs):
            return (1.0 + cosine) / 2.0
        return float(np.searchsorted(pairs, cosine, side="left")) / len(pairs)

    def _checked(
        self, texts: Sequence[str], ids: Sequence[str] | None, metadatas: Sequence[dict[str, Any]] | None,
    ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """Texts, ids (new ones where none are given) and metadatas of an upsert, refused
        unless every document would come back as given."""
        texts = check_texts(texts, "texts")
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else id_list(ids, "ids")
        if metadatas is not None:
            if isinstance(metadatas, (str, bytes)) or not isinstance(metadatas, Sequence):
                raise InvalidInputError(f"metadatas must be a list of dicts, one per text, got a "
                                        f"{type(metadatas).__name__}")
            odd = [m for m in metadatas if m is not None and not isinstance(m, Mapping)]
            if odd:
                raise InvalidInputError(f"metadatas must be a list of dicts, one per text, got an item {odd[0]!r:.40}")
        metadatas = [{} for _ in texts] if metadatas is None else [dict(m or {}) for m in metadatas]
        if not len(ids) == len(metadatas) == len(texts):
            raise InvalidInputError(f"got {len(texts)} texts, {len(ids)} ids and {len(metadatas)} metadatas")
        kept = []  # JSON copies: a caller changing a nested value later changes nothing stored
        for doc_id, metadata in zip(ids, metadatas):
            if not doc_id:  # id_list has checked they are strings
                raise InvalidInputError(f"document ids must be non-empty strings, got {doc_id!r}")
            try:
                kept.append(json.loads(json.dumps(metadata, allow_nan=False)))
            except (TypeError, ValueError) as error:
                raise InvalidInputError(f"metadata of {doc_id!r} is not JSON-serialisable: {error}") from error
            if kept[-1] != metadata:
                raise InvalidInputError(f"metadata of {doc_id!r} would change when saved as JSON: use string keys "
                                        "and lists, not tuples")
        return texts, ids, kept

    def _compressed(self, texts: list[str], memories: torch.Tensor | None, show_progress: bool) -> np.ndarray:
        """fp16 memories [n, n_mem, hidden] of the texts: a copy of ``memories`` when given (a
        caller may refill its buffer for the next group; stored rows never change), else
        compressed now."""
        given = memories is not None
        if not given:
            memories = self.model.compress(texts, self.batch_size, show_progress).memories
        elif len(memories) != len(texts):
            raise InvalidInputError(f"got {len(memories)} precomputed memories for {len(texts)} texts")
        shape = (self.model.config.n_mem_tokens, self.model.hidden_size)
        if tuple(memories.shape[1:]) != shape:  # another rate's or model's: the generator would read them wrongly
            raise InvalidInputError(f"memories of shape {tuple(memories.shape[1:])} do not match this model's "
                                    f"{shape} (n_mem_tokens, hidden)")
        memories = memories.to(torch.float16).cpu()
        if not torch.isfinite(memories).all():
            raise InvalidInputError("memories must be finite numbers within fp16's range (±65,504)")
        return memories.numpy().copy() if given else memories.numpy()


class MemoryStore(BaseMemoryStore):
    """Upsert, delete, get and search documents compressed by one ClaraModel.

    ``index`` is ``"flat"`` (exact inner product on unit-norm keys), ``"hnsw"`` (approximate)
    or ``"ivfpq"``, the compact index for large corpora: product-quantised keys
    (``compact.CompactIndex``, 128 bytes per document at CR16) whose best ``rescore_factor`` x k
    candidates are re-scored exactly from the stored memories; below ``compact.MIN_ROWS``
    documents it searches exactly, and it learns again whenever the store has doubled since it
    last learned. ``memory_dtype`` is ``"float16"`` (the memories as
    compressed) or ``"int8"`` (half the bytes, one scale per memory vector; see ``compact``).
    """

    def __init__(
        self,
        model: ClaraModel,
        keys: KeyEncoder | None = None,
        index: str = "flat",
        batch_size: int = 8,
        *,
        memory_dtype: str = "float16",
    ) -> None:
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of {INDEX_KINDS}")
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"unknown memory_dtype {memory_dtype!r}; choose one of {MEMORY_DTYPES}")
        super().__init__(model, keys, batch_size)
        self.index_kind = index
        self.memory_dtype = memory_dtype
        self.rescore_factor = RESCORE_FACTOR
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._metadatas: list[dict[str, Any]] = []
        self._where: list[tuple[int, int]] = []  # row -> (chunk, offset in chunk)
        self._memory_chunks: list[np.ndarray] = []  # [rows, n_mem, hidden], fp16 or int8
        self._scale_chunks: list[np.ndarray] = []  # int8 only: float32 [rows, n_mem]
        self._key_chunks: list[np.ndarray] = []  # fp32 [rows, dim]; unused when keys are memories
        self._row_of: dict[str, int] = {}
        self._ram_rows = self._dead_ram_rows = 0  # rows of the chunks held in RAM; of them, replaced or deleted
        self._index: faiss.Index | CompactIndex | None = None  # over all rows, in order; None when stale
        self._ids_by_text: dict[str, str] | None = None  # with _found: see _text_lookup
        self._found: tuple[dict[str, str], dict[str, list[str]]] = ({}, {})
        self._saved: _SavedGeneration | None = None  # the generation last saved or loaded; see save
        # each store folder's generation this store last read or wrote: its name and its header's SHA-256
        self._generation_in: dict[Path, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    # -------------------------------------------------------------- writing

    def upsert(
        self,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        metadatas: Sequence[dict[str, Any]] | None = None,
        show_progress: bool = False,
        memories: torch.Tensor | None = None,
    ) -> list[str]:
        """Compress and add documents; an id already stored is replaced. Returns the ids.

        ``memories`` [n, n_mem, hidden] skips compression when they were computed already.
        Everything is validated and compressed before the store changes, so bad input
        leaves the stored documents as they were.
        """
        texts, ids, metadatas = self._checked(texts, ids, metadatas)
        memories = self._compressed(texts, memories, show_progress)
        scales = None
        if self.memory_dtype == "int8":
            memories, scales = quantize(memories)
        keys = None if self.keys.keys_are_memories else self._document_keys(texts)
        with self._lock:
            self._check_key_size(keys)
            chunk, first_new_row, replaced = len(self._memory_chunks), len(self._ids), False
            self._memory_chunks.append(memories)
            self._ram_rows += len(memories)
            if scales is not None:
                self._scale_chunks.append(scales)
            if keys is not None:
                self._key_chunks.append(keys)
            for offset, (doc_id, text, metadata) in enumerate(zip(ids, texts, metadatas)):
                row = self._row_of.get(doc_id)
                if row is None:
                    self._row_of[doc_id] = len(self._ids)
                    self._ids.append(doc_id)
                    self._texts.append(text)
                    self._metadatas.append(metadata)
                    self._where.append((chunk, offset))
                else:
                    self._count_dead(row)
                    self._texts[row], self._metadatas[row], self._where[row] = text, metadata, (chunk, offset)
                    replaced = True
            self._ids_by_text = None
            self._changed()
            self._extend_index(first_new_row, replaced)
            if replaced:
                self._drop_dead_rows()
        return ids

    def _extend_index(self, first_new_row: int, replaced: bool) -> None:
        """Add appended rows to a built index, so that a large hnsw or ivfpq index is not built
        again for a few new documents; replaced rows make it stale (rebuilt at the next search),
        and so does a store outgrowing the exact search of small ivfpq stores, or the rows its
        compact index learned from (a corpus indexed in order would otherwise be quantised by
        codebooks learned from its first group alone)."""
        if isinstance(self._index, CompactIndex):
            outgrown = len(self._ids) >= RETRAIN_GROWTH * self._index.trained_over
        else:
            outgrown = self.index_kind == "ivfpq" and len(self._ids) >= MIN_ROWS
        if replaced or outgrown:
            self._index = None
        elif self._index is not None and len(self._ids) > first_new_row:
            self._index.add(self._row_keys(range(first_new_row, len(self._ids))))

    def _document_keys(self, texts: list[str]) -> np.ndarray:
        """Unit-norm keys from an encoder outside CLaRa, checked before the store changes: one
        finite row per text (fewer rows left the new documents out of the index and every later
        save failing)."""
        keys = np.asarray(self.keys.document_keys(texts), dtype=np.float32)
        if keys.ndim != 2 or len(keys) != len(texts) or not np.isfinite(keys).all():
            problem = "values that are not finite" if keys.shape[:1] == (len(texts),) and keys.ndim == 2 else \
                f"an array of shape {keys.shape}"
            raise StoreError(f"the key encoder returned {problem} for {len(texts)} texts; expected one finite "
                             "key per text")
        return normalize_rows(keys)

    def _check_key_size(self, keys: np.ndarray | None) -> None:
        """Keys of an embedding model outside CLaRa must keep their size (memories are checked
        against the model before)."""
        if keys is not None and self._key_chunks and keys.shape[1] != self._key_chunks[0].shape[1]:
            raise StoreError(f"keys of size {keys.shape[1]} do not match the store's {self._key_chunks[0].shape[1]}")

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; ids that are not stored are ignored."""
        ids = id_list(ids, "ids", ordered=False)
        with self._lock:
            doomed = {self._row_of[i] for i in ids if i in self._row_of}
            if not doomed:
                return
            for row in doomed:
                self._count_dead(row)
            keep = [row for row in range(len(self._ids)) if row not in doomed]
            self._ids = [self._ids[r] for r in keep]
            self._texts = [self._texts[r] for r in keep]
            self._metadatas = [self._metadatas[r] for r in keep]
            self._where = [self._where[r] for r in keep]
            self._row_of = {doc_id: row for row, doc_id in enumerate(self._ids)}
            self._index = self._ids_by_text = None
            self._changed()
            self._drop_dead_rows()

    def _count_dead(self, row: int) -> None:
        """Note that a row's memories are no longer read: replaced, or its document deleted."""
        if not isinstance(self._memory_chunks[self._where[row][0]], np.memmap):
            self._dead_ram_rows += 1

    def _drop_dead_rows(self) -> None:
        """Pack the chunks held in RAM anew once half their rows or more are the memories of
        replaced or deleted documents (and there are SHARD_ROWS such rows or more), so that a
        long-running store's RAM follows its live documents. Memory-mapped chunks (a loaded
        generation) cost no RAM and keep their places. Chunks are replaced, never changed in
        place (see save)."""
        if self._dead_ram_rows < max(self._ram_rows - self._dead_ram_rows, SHARD_ROWS):
            return
        in_ram = [not isinstance(chunk, np.memmap) for chunk in self._memory_chunks]
        live = [row for row, (chunk, _) in enumerate(self._where) if in_ram[chunk]]
        where = [self._where[row] for row in live]
        for chunks in (self._memory_chunks, self._scale_chunks, self._key_chunks):
            if chunks:  # scales (int8) and keys (a separate key encoder) are chunked as the memories are
                packed = _gather(chunks, where) if where else None
                # an emptied chunk keeps its number, so that the other rows' places stay valid; a new
                # empty array, since a view (chunk[:0]) would keep the whole buffer alive
                chunks[:] = [np.empty((0, *chunk.shape[1:]), chunk.dtype) if ram else chunk
                             for chunk, ram in zip(chunks, in_ram)]
                if packed is not None:
                    chunks.append(packed)
        for offset, row in enumerate(live):
            self._where[row] = (len(self._memory_chunks) - 1, offset)
        self._ram_rows, self._dead_ram_rows = len(live), 0

    # -------------------------------------------------------------- reading

    def get(self, ids: Sequence[str]) -> list[StoredDocument]:
        """Documents in the order asked; ids that are not stored are skipped."""
        ids = id_list(ids, "ids")
        with self._lock:
            return [self._document(self._row_of[i]) for i in ids if i in self._row_of]

    def _document(self, row: int) -> StoredDocument:
        return StoredDocument(self._ids[row], self._texts[row], copy.deepcopy(self._metadatas[row]))

    def memories(self, ids: Sequence[str]) -> torch.Tensor:
        """Memory tokens [len(ids), n_mem, hidden] (float32) for the generator."""
        ids = id_list(ids, "ids")
        with self._lock:
            unknown = [i for i in ids if i not in self._row_of]
            if unknown:
                raise InvalidInputError(f"unknown document ids: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
            rows = [self._row_of[i] for i in ids]
            if not rows:
                return torch.zeros(0, self.model.config.n_mem_tokens, self.model.hidden_size)
            return torch.from_numpy(np.asarray(self._memory_rows(rows), dtype=np.float32))

    def ids_where(self, where: Filter) -> list[str]:
        """Ids of the documents whose metadata satisfies a filter."""
        validate_filter(where)
        with self._lock:
            return [doc_id for doc_id, meta in zip(self._ids, self._metadatas) if matches(meta, where)]

    def ids_for_texts(self, texts: Sequence[str]) -> list[str | None]:
        """The stored id of each exact text, or None: lets a generator reuse stored memories."""
        with self._lock:
            self._text_lookup()
            return [self._ids_by_text.get(text) for text in texts]

    def documents_in(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text`` as a prompt
        holds it (``found_text``), in order and without overlaps (the longest document wins at a
        position).

        Lets a prompt of any layout read its stored documents from memory tokens. Documents
        shorter than MIN_FOUND_CHARS (trimmed) are not looked for: too short to be told from prose.
        """
        with self._lock:
            self._text_lookup()
            return find_documents(text, *self._found)

    def _text_lookup(self) -> None:
        """Build, once per change, the id of each exact text and what ``documents_in`` looks for."""
        if self._ids_by_text is None:
            self._ids_by_text = {text: doc_id for doc_id, text in zip(self._ids, self._texts)}
            self._found = found_lookup(self._ids_by_text)

    def all_ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    # ------------------------------------------------------------- searching

    def search_by_key(
        self, key: np.ndarray, k: int = 4, where: Filter | None = None, *, ids: Collection[str] | None = None,
        lambda_mult: float = 1.0, fetch_k: int = FETCH_K,
    ) -> list[tuple[StoredDocument, float]]:
        """Like ``search`` for a query key computed elsewhere."""
        k, fetch_k = check_search(k, where, lambda_mult, fetch_k)
        wanted = None if ids is None else set(id_list(ids, "ids", ordered=False))
        query = normalize_rows(np.asarray(key, dtype=np.float32).reshape(1, -1))[0]
        with self._lock:
            if not self._ids:
                return []
            size = self._key_size()
            if query.size != size:
                raise InvalidInputError(f"the search key has {query.size} values, the store's keys have {size}")
            diverse = lambda_mult < 1.0
            rows, scores = self._nearest(query, max(k, fetch_k) if diverse else k, where, wanted)
            if diverse and len(rows):
                chosen = maximal_marginal_relevance(query, self._row_keys(rows), k, lambda_mult)
                rows, scores = rows[chosen], scores[chosen]
            return [(self._document(int(r)), float(s)) for r, s in zip(rows[:k], scores[:k])]

    def _nearest(self, query: np.ndarray, n: int, where: Filter | None,
                 ids: set[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the n candidates most similar to the query, best first, and their cosines."""
        if where is None and ids is None:
            index = self._ensure_index()
            if isinstance(index, CompactIndex):
                return self._best(index.candidates(query, n * self.rescore_factor), query, n)
            scores, rows = index.search(query[None], min(n, len(self._ids)))
            found = rows[0] >= 0
            return rows[0][found], scores[0][found]
        # exact search over the candidates
        rows = np.array([row for row, (doc_id, metadata) in enumerate(zip(self._ids, self._metadatas))
                         if (ids is None or doc_id in ids) and (where is None or matches(metadata, where))],
                        dtype=np.int64)
        return self._best(rows, query, n)

    def _best(self, rows: np.ndarray, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n of ``rows`` most similar to the query, best first, with their exact cosines;
        scored SHARD_ROWS at a time so that a large candidate set never holds all its keys."""
        if not len(rows):
            return rows, np.zeros(0, dtype=np.float32)
        scores = np.concatenate([self._row_keys(rows[start:start + SHARD_ROWS]) @ query
                                 for start in range(0, len(rows), SHARD_ROWS)])
        best = np.argsort(-scores, kind="stable")[:n]
        return rows[best], scores[best]

    def _sample_pair_cosines(self) -> np.ndarray:
        """Sorted cosines between distinct documents of an evenly spread sample."""
        count = len(self._ids)
        rows = np.unique(np.linspace(0, count - 1, min(count, CALIBRATION_SAMPLE)).astype(np.int64))
        if len(rows) < 2:
            return np.zeros(0, dtype=np.float32)
        keys = self._row_keys(rows)
        return np.sort((keys @ keys.T)[np.triu_indices(len(rows), 1)])

    def _memory_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Memories [len(rows), n_mem, hidden] of rows: fp16 as stored, or int8 dequantised to float32."""
        where = [self._where[r] for r in rows]
        memories = _gather(self._memory_chunks, where)
        if self.memory_dtype == "int8":
            return dequantize(memories, _gather(self._scale_chunks, where))
        return memories

    def _row_keys(self, rows: Sequence[int]) -> np.ndarray:
        if self.keys.keys_are_memories:
            return self.keys.memory_keys(self._memory_rows(rows))
        return _gather(self._key_chunks, [self._where[r] for r in rows])

    def _key_size(self) -> int:
        """Values per key, known without computing one (the hot path of every search)."""
        return self.keys.dimensions if self.keys.keys_are_memories else self._key_chunks[0].shape[1]

    def _ensure_index(self) -> faiss.Index | CompactIndex:
        """The search index over every row, rebuilt after any change; keys are added SHARD_ROWS
        at a time, so that building never holds every key of a large store at once."""
        if self._index is None:
            count = len(self._ids)
            dim = self._key_size() if count else 1
            if self.index_kind == "ivfpq" and count >= MIN_ROWS:
                sample = np.unique(np.linspace(0, count - 1, min(count, TRAINING_ROWS)).astype(np.int64))
                blocks = self.keys.blocks if self.keys.keys_are_memories else 1
                index = CompactIndex.trained(self._row_keys(sample), blocks, trained_over=count)
            elif self.index_kind == "hnsw":
                index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efSearch = HNSW_EF_SEARCH
            else:
                index = faiss.IndexFlatIP(dim)
            for start in range(0, count, SHARD_ROWS):
                index.add(self._row_keys(range(start, min(start + SHARD_ROWS, count))))
            self._index = index
        return self._index

    # --------------------------------------------------------------- saving

    def save(self, folder: str | Path) -> Path:
        """Write a new generation of the store and make it current. Returns its folder.

        Shards whose rows are unchanged since this store last saved to or loaded from the
        folder are hard-linked from that generation rather than written again, so that a
        corpus indexed in groups (``index_documents``) writes each shard about once.
        """
        folder = Path(folder)
        check_store_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # one writer at a time, and the snapshot taken once it is this one's turn: a snapshot
        # taken before the wait could be written after a newer save and undo it
        with hold_lock(folder / ".lock"):
            with self._lock:  # a consistent snapshot; chunks are never changed in place, so the writing can wait
                snapshot = _Snapshot(
                    where=np.array(self._where, dtype=np.int64).reshape(-1, 2),
                    chunks={"memory_shards": list(self._memory_chunks), "scale_shards": list(self._scale_chunks),
                            "key_shards": [] if self.keys.keys_are_memories else list(self._key_chunks)},
                    records={"ids": list(self._ids), "texts": list(self._texts), "metadatas": list(self._metadatas)},
                )
                index = _SavedIndex.of(self._ensure_index()) if len(self._ids) and self.index_kind != "flat" else None
                previous = self._saved
            self._check_no_other_save(folder)
            generation, header = self._write_generation(folder, snapshot, previous, index)
            self._saved = _SavedGeneration.of(generation, snapshot.where, header)
            self._generation_in[folder.resolve()] = _stamp(generation)
        return generation

    def _check_no_other_save(self, folder: Path) -> None:
        """Refuse to save over a generation another writer saved since this store last read or
        wrote the folder: its documents are not in this store, and the save would drop them."""
        known = self._generation_in.get(folder.resolve())
        if known is None or not (folder / "CURRENT").is_file():
            return
        current = _stamp(folder / _current_generation(folder))
        if current != known:  # a name alone: the folder wiped and saved again restarts at gen-000001
            raise StoreError(f"{folder} was saved by another writer since this store read it ({current[0]}, not "
                             f"the {known[0]} it knows): load it again and repeat the changes, or save to another "
                             "folder")

    def _write_generation(self, folder: Path, snapshot: _Snapshot, previous: _SavedGeneration | None,
                          index: _SavedIndex | None) -> tuple[Path, dict]:
        for leftover in folder.glob(".staging-*"):  # a crashed writer's; no other writer holds the lock
            if _STORE_ENTRY.match(leftover.name):  # only the store's own names, never a file beside it
                shutil.rmtree(leftover, ignore_errors=True)
        staging = folder / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        checksums: dict[str, str] = {}
        unchanged = previous.unchanged_shards(folder, snapshot.where) if previous is not None else set()
        header = {
            "format": FORMAT,
            "count": len(snapshot.records["ids"]),
            "index": self.index_kind,
            "compressor": compressor_signature(self.model),
            "keys": self.keys.signature(),
            "memory_dtype": self.memory_dtype,
            **{field: _write_shards(staging, field, len(snapshot.where) if chunks else 0,
                                    _array_writer(chunks, snapshot.where), previous, unchanged, checksums)
               for field, chunks in snapshot.chunks.items()},
            "record_shards": _write_shards(staging, "record_shards", len(snapshot.where),
                                           _records_writer(snapshot.records), previous, unchanged, checksums),
        }
        if index is not None:
            index.write(staging)
            if index.trained_over is not None:
                header["index_trained_over"] = index.trained_over
        for path in sorted(staging.iterdir()):
            if path.name not in checksums:
                checksums[path.name] = _sha256(path)
        header["sha256"] = dict(sorted(checksums.items()))
        _write_json(staging / "store.json", header)
        generations = _generations(folder)
        readers_on = _current_generation(folder) if (folder / "CURRENT").exists() else None
        name = f"gen-{(generations[-1] + 1) if generations else 1:06d}"
        sync_tree(staging)  # its hard links and entries too: CURRENT must never name a generation not on disk
        os.replace(staging, folder / name)
        sync_entry(folder)
        write_text_atomically(folder / "CURRENT", name + "\n")
        for old in (f"gen-{number:06d}" for number in generations):
            if old != readers_on:  # the generation CURRENT named stays for readers still on it
                shutil.rmtree(folder / old, ignore_errors=True)
        return folder / name, header

    @classmethod
    def load(
        cls, folder: str | Path, model: ClaraModel, keys: KeyEncoder | None = None, batch_size: int = 8
    ) -> "MemoryStore":
        """Open the current generation; memories stay on disk, memory-mapped.

        Every file is checked against the checksum written with it, and no path may lead
        outside the store's folder.
        """
        folder = Path(folder)
        while True:
            name = _current_generation(folder)
            try:
                return cls._open_generation(folder, folder / name, model, keys, batch_size)
            except (StoreError, FileNotFoundError):
                if _current_generation(folder) == name:
                    raise
                # writers saved twice meanwhile and removed this generation: open the new one

    @classmethod
    def _open_generation(cls, folder: Path, generation: Path, model: ClaraModel, keys: KeyEncoder | None,
                         batch_size: int) -> "MemoryStore":
        header, memory_dtype = _read_store_header(generation)
        store = cls(model, keys, header["index"], batch_size, memory_dtype=memory_dtype)
        check_compressor(header["compressor"], compressor_signature(model), folder)
        saved, current = header["keys"], store.keys.signature()
        # a store of embedding keys saved before the embedding's model was recorded names its class alone
        if saved != current and saved != {name: value for name, value in current.items() if name != "model"}:
            raise StoreError(f"{folder} was indexed with keys {saved}, not {current}: "
                             "load a model with the same retrieval_key, or the same key encoder")
        _verify_files(generation, header)  # after the header's checks: hashing a large store takes minutes
        count = header["count"]
        record_shards = header.get("record_shards", [])
        if header["format"] != FORMAT:  # formats 1 and 2: every record in one file
            record_shards = [{"file": "records.json", "rows": count}]
        elif [shard["rows"] for shard in record_shards] != [shard["rows"] for shard in header["memory_shards"]]:
            # a save links record shards by the memory shards' rows: they must match row for row
            raise StoreError(f"{generation}/store.json: the record shards do not hold the memory shards' rows")
        records = _read_records(generation, record_shards)
        if len(records["ids"]) != count:
            raise StoreError(f"{generation}: the record shards hold {len(records['ids'])} documents, expected {count}")
        store._memory_chunks = _read_shards(generation, header["memory_shards"], np.dtype(memory_dtype))
        store._scale_chunks = _read_shards(generation, header.get("scale_shards", []), np.float32)
        expected = [m.shape[:2] for m in store._memory_chunks] if memory_dtype == "int8" else []
        if [s.shape for s in store._scale_chunks] != expected:
            raise StoreError(f"{generation}: the scale shards do not match the {memory_dtype} memory shards")
        store._key_chunks = _read_shards(generation, header["key_shards"], np.float32)
        store._ids, store._texts, store._metadatas = records["ids"], records["texts"], records["metadatas"]
        store._where = [(c, o) for c, shard in enumerate(store._memory_chunks) for o in range(len(shard))]
        if len(store._where) != count:
            raise StoreError(f"{generation}: memory shards hold {len(store._where)} rows, expected {count}")
        store._row_of = {doc_id: row for row, doc_id in enumerate(store._ids)}
        store._saved = _SavedGeneration.of(generation, np.array(store._where, dtype=np.int64).reshape(-1, 2), header)
        store._generation_in[folder.resolve()] = _stamp(generation)
        if "index.faiss" in header["sha256"]:
            compact = "index-projection.npy" in header["sha256"]
            # stores saved before the field existed: unknown, so the next upsert makes the index learn again
            trained_over = header.get("index_trained_over", 0) if compact else None
            store._index = _read_index(generation, count, trained_over)
        return store


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What a save writes, taken under the store's lock: each row's (chunk, offset) [rows, 2],
    the chunk lists by header field, and the records."""

    where: np.ndarray
    chunks: dict[str, list[np.ndarray]]
    records: dict[str, list]


@dataclasses.dataclass(frozen=True)
class _SavedGeneration:
    """A generation this store wrote or read, and where each of its rows came from then: a
    shard whose rows still come from the same places holds the same bytes."""

    folder: Path
    where: np.ndarray
    shard_rows: list[int]
    checksums: dict[str, str]

    @classmethod
    def of(cls, folder: Path, where: np.ndarray, header: dict) -> "_SavedGeneration":
        return cls(folder.resolve(), where, [shard["rows"] for shard in header["memory_shards"]],
                   dict(header["sha256"]))

    def unchanged_shards(self, store_folder: Path, where: np.ndarray) -> set[int]:
        """The full shards of a save of ``where`` into ``store_folder`` that this generation
        already holds."""
        if self.folder.parent != store_folder.resolve():
            return set()
        try:  # the generation may have been removed, and another store's saved under its name
            header = read_json(self.folder / "store.json", StoreError)
        except StoreError:
            return set()
        if not isinstance(header, dict) or header.get("sha256") != self.checksums:
            return set()
        return {number for number, rows in enumerate(self.shard_rows)
                if rows == SHARD_ROWS and (number + 1) * SHARD_ROWS <= len(where)
                and np.array_equal(where[number * SHARD_ROWS:(number + 1) * SHARD_ROWS],
                                   self.where[number * SHARD_ROWS:(number + 1) * SHARD_ROWS])}

    def link(self, name: str, target: Path) -> bool:
        """Hard-link one of this generation's files; False where it is gone (another writer
        removed the generation) or the file system has no hard links."""
        try:
            os.link(self.folder / name, target)
        except OSError:
            return False
        return True


def _gather(chunks: list[np.ndarray], where: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Rows of chunked arrays, each given as (chunk, offset in chunk), in the order given."""
    where = np.asarray(where, dtype=np.int64).reshape(-1, 2)
    first = chunks[where[0, 0]]
    out = np.empty((len(where), *first.shape[1:]), dtype=first.dtype)
    for chunk in np.unique(where[:, 0]):
        selected = where[:, 0] == chunk
        out[selected] = chunks[chunk][where[selected, 1]]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _SavedIndex:
    """The index as a save writes it, taken under the store's lock while upserts may go on
    adding rows to the store's own: faiss's serialized bytes (the file itself, where a second
    index object built from them held the same rows again), and a compact index's centre,
    projection and training size, which are never changed in place."""

    data: np.ndarray  # uint8, the index.faiss file
    centre: np.ndarray | None = None  # these three for a compact index only
    projection: np.ndarray | None = None
    trained_over: int | None = None

    @classmethod
    def of(cls, index: faiss.Index | CompactIndex) -> "_SavedIndex":
        if isinstance(index, CompactIndex):
            return cls(faiss.serialize_index(index.codes), index.centre, index.projection, index.trained_over)
        return cls(faiss.serialize_index(index))

    def write(self, folder: Path) -> None:
        if self.trained_over is not None:
            _write_array(folder / "index-centre.npy", self.centre)
            _write_array(folder / "index-projection.npy", self.projection)
        with open(folder / "index.faiss", "wb") as handle:
            self.data.tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())


def _read_index(generation: Path, count: int, trained_over: int | None) -> faiss.Index | CompactIndex:
    """The saved index; a compact one (``trained_over``: the rows its keys were drawn from) with
    its centre and projection."""
    path = generation / "index.faiss"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise StoreError(f"{path} is corrupted: faiss could not read it ({error})") from error
    if index.ntotal != count:
        raise StoreError(f"{path} indexes {index.ntotal} documents, expected {count}")
    if trained_over is None:
        return index
    centre = _read_array(generation / "index-centre.npy", np.float32)
    projection = _read_array(generation / "index-projection.npy", np.float32)
    try:
        return CompactIndex(centre, projection, index, trained_over)
    except ValueError as error:
        raise StoreError(f"{generation}: the compact index's files do not fit together: {error}") from error


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
        handle.flush()
        os.fsync(handle.fileno())


def _read_array(path: Path, dtype: DTypeLike, mmap_mode: str | None = None) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise StoreError(f"{path} is missing or corrupted: {error}") from error
    if array.dtype != dtype:
        raise StoreError(f"{path} holds {array.dtype}, expected {np.dtype(dtype)}")
    return array


def _write_shards(staging: Path, field: str, count: int, write: Callable[[Path, slice], None],
                  previous: _SavedGeneration | None, unchanged: set[int], checksums: dict[str, str]) -> list[dict]:
    """The header ``field``'s shards of SHARD_ROWS of the ``count`` rows: those numbered in
    ``unchanged`` are linked from the previous generation (with their checksums) where the file
    system allows it, the others written with ``write(path, rows)``."""
    shards = []
    for number, start in enumerate(range(0, count, SHARD_ROWS)):
        file, rows = _SHARD_FILES[field].format(number), slice(start, min(start + SHARD_ROWS, count))
        if number in unchanged and previous.link(file, staging / file):
            checksums[file] = previous.checksums[file]
        else:
            write(staging / file, rows)
        shards.append({"file": file, "rows": rows.stop - rows.start})
    return shards


def _array_writer(chunks: list[np.ndarray], where: np.ndarray) -> Callable[[Path, slice], None]:
    """Writes the rows of chunked arrays (memories, scales or keys) as one .npy shard."""
    return lambda path, rows: _write_array(path, _gather(chunks, where[rows]))


def _records_writer(records: dict[str, list]) -> Callable[[Path, slice], None]:
    """Writes the ids, texts and metadata of the rows as one JSON shard: a shard whose rows kept
    their places holds the same records, since a changed record is a replaced row."""
    return lambda path, rows: _write_json(path, {field: values[rows] for field, values in records.items()})


def _read_records(generation: Path, shards: list[dict]) -> dict[str, list]:
    """The ids, texts and metadata of every row, from the record shards in order."""
    records: dict[str, list] = {"ids": [], "texts": [], "metadatas": []}
    for shard in shards:
        part = read_json(generation / shard["file"], StoreError)
        if not isinstance(part, dict) or not records.keys() <= part.keys():
            raise StoreError(f"{generation / shard['file']} does not hold ids, texts and metadatas")
        if not len(part["ids"]) == len(part["texts"]) == len(part["metadatas"]) == shard["rows"]:
            raise StoreError(f"{generation / shard['file']} does not hold {shard['rows']} documents")
        for field, values in records.items():
            values.extend(part[field])
    return records


def _read_shards(folder: Path, shards: list[dict], dtype: DTypeLike) -> list[np.ndarray]:
    arrays = []
    for shard in shards:
        array = _read_array(folder / shard["file"], dtype, mmap_mode="r")
        if len(array) != shard["rows"]:
            raise StoreError(f"{folder / shard['file']} holds {len(array)} rows, expected {shard['rows']}")
        arrays.append(array)
    return arrays


def check_store_folder(folder: Path) -> None:
    """Refuse a folder a store cannot be saved to without harm to files it did not write: a save
    replaces ``CURRENT`` and removes older ``gen-*`` folders. A folder holding only what a save
    killed before its first ``CURRENT`` left (``.lock``, ``.staging-*``, ``gen-*``,
    ``.CURRENT.*.tmp``) is the store's."""
    if (folder / "CURRENT").exists():
        _current_generation(folder)  # names a generation of a store, or the error says what it names
    elif folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if not _STORE_ENTRY.match(p.name))
        if others:
            raise StoreError(f"{folder} holds files but no CLaRa memory store ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): choose an empty or new folder")
    elif folder.exists():
        raise StoreError(f"{folder} is a file, not a folder for a CLaRa memory store")


def check_store_model(store: BaseMemoryStore, model: object, **settings: object) -> None:
    """A framework store given both a memory store and a model: the store brings its own model,
    and another beside it would go unused. So would the store's own ``settings`` (index kind,
    batch size), given here when the caller set them (None when not)."""
    if model is not None and model is not store.model:
        raise InvalidInputError("model is not the model of store: pass the store alone, or build one with this model")
    given = [name for name, value in settings.items() if value is not None]
    if given:
        raise InvalidInputError(f"{', '.join(given)} would go unused beside store=, which was built with its own: "
                                "pass the store alone, or build it with these settings")


def as_memory_store(value: object) -> BaseMemoryStore:
    """A memory store (MemoryStore, MilvusMemoryStore) given as it is, or the one a framework's
    CLaRa vector store wraps (every such store exposes it as ``memory_store``), so that users
    can pass whichever they hold."""
    inner = value if isinstance(value, BaseMemoryStore) else getattr(value, "memory_store", None)
    if not isinstance(inner, BaseMemoryStore):
        raise TypeError(f"store must be a MemoryStore or a CLaRa vector store (or a MilvusMemoryStore), "
                        f"got {type(value).__name__}")
    return inner


def store_settings(folder: Path) -> dict[str, str]:
    """The index kind and memory dtype a saved store was made with, read without a model."""
    header, memory_dtype = _read_store_header(folder / _current_generation(folder))
    return {"index": header["index"], "memory_dtype": memory_dtype}


def _read_store_header(generation: Path) -> tuple[dict, str]:
    """A generation's ``store.json``, checked for its format, and the memory dtype it gives."""
    header = read_json(generation / "store.json", StoreError)
    found = header.get("format") if isinstance(header, dict) else None
    if found == FORMAT_1:  # any model, its own checkpoint too, would be refused as "another compressor"
        raise StoreError(f"{generation}/store.json is of format {FORMAT_1!r}, whose compressor signature no "
                         "version since can check: index its documents again")
    if found not in (FORMAT, FORMAT_2):
        raise StoreError(f"{generation}/store.json is not a store header of format {FORMAT!r} or {FORMAT_2!r} "
                         f"(its format: {str(found)[:80]!r})")
    memory_dtype = header.get("memory_dtype")
    if memory_dtype not in MEMORY_DTYPES:
        raise StoreError(f"{generation}/store.json gives the memory dtype {str(memory_dtype)[:80]!r}, "
                         f"not one of {MEMORY_DTYPES}")
    return header, memory_dtype


def _current_generation(folder: Path) -> str:
    """The generation folder ``CURRENT`` names; never a path outside the store."""
    pointer = folder / "CURRENT"
    if not pointer.is_file():
        raise StoreError(f"{folder} is not a CLaRa memory store: CURRENT is missing or not a file")
    name = pointer.read_text().strip()
    if not _GENERATION.match(name):
        raise StoreError(f"{pointer} names {name[:80]!r}, not a generation folder of this store")
    return name


def _stamp(generation: Path) -> tuple[str, str]:
    """What tells a generation from another of the same name: the name and its header's SHA-256
    (the header holds every other file's)."""
    return generation.name, _sha256(generation / "store.json")


def _sha256(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def _verify_files(generation: Path, header: dict) -> None:
    """Every file the header lists must be a plain name in the generation and match its
    checksum; every shard must be listed."""
    checksums = header.get("sha256")
    if not isinstance(checksums, dict):
        raise StoreError(f"{generation}/store.json lists no checksums")
    shards = []
    for field, names in _SHARD_FILES.items():
        listed = header.get(field, [])
        for number, shard in enumerate(listed if isinstance(listed, list) else [None]):
            name = names.format(number)
            rows = shard.get("rows") if isinstance(shard, dict) else None
            if not isinstance(shard, dict) or shard.get("file") != name or type(rows) is not int or rows < 0:
                raise StoreError(f"{generation}/store.json lists {str(shard)[:80]!r} as shard {number} of {field}, "
                                 f"which is not {name} with its row count")
            shards.append(name)
    if header.get("format") != FORMAT:
        shards.append("records.json")  # the records of formats 1 and 2, in one file
    for name in checksums:
        if not isinstance(name, str) or not _STORE_FILE.match(name):
            raise StoreError(f"{generation}/store.json names the file {str(name)[:80]!r}, which is not a store file")
    unlisted = [name for name in shards if name not in checksums]
    if unlisted:
        raise StoreError(f"{generation}/store.json has no checksum for {unlisted[0]}")
    missing = [generation / name for name in checksums if not (generation / name).is_file()]
    if missing:
        raise StoreError(f"{missing[0]} is missing")
    size = sum((generation / name).stat().st_size for name in checksums)
    with tqdm(total=size, unit="B", unit_scale=True, desc="checking the store's files",
              disable=size < 1 << 30) as progress:  # shown for stores of a GiB or more
        for name, expected in checksums.items():
            if _sha256(generation / name, progress) != expected:
                raise StoreError(f"{generation / name} is corrupted: its checksum does not match the one "
                                 "written with it")


def _write_json(path: Path, value: Any) -> None:
    write_file_atomically(path, lambda handle: json.dump(value, handle))


def _generations(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _GENERATION.match(p.name)))


def check_compressor(stored: dict, current: dict, folder: str | Path) -> None:
    """Refuse to mix memories from different compressors."""
    stored = {"memory_design": ["tokens", "mean", -1, False], **stored}  # stores older than the setting
    for key in ("compression_rate", "doc_max_length", "memory_shape", "memory_design"):
        if stored.get(key) != current.get(key):
            hint = f" (load the model at compression rate {stored.get(key)})" if key == "compression_rate" else ""
            raise StoreError(f"{folder} was written with {key}={stored.get(key)}, this model has "
                             f"{current.get(key)}{hint}")
    problem = fingerprint_mismatch(stored["base_model_fingerprint"], current["base_model_fingerprint"])
    if problem:
        raise StoreError(f"{folder} was written by another base model: {problem}")
    if stored.get("encoder_sha256") != current.get("encoder_sha256"):
        raise StoreError(f"{folder} was written by another compressor (different encoder adapter weights)")


def check_search(k: int, where: Filter | None, lambda_mult: float, fetch_k: int) -> tuple[int, int]:
    """Refuse bad search arguments before any work is done; returns k and fetch_k as Python
    ints, which faiss and Milvus need (a numpy integer fails there)."""
    check_positive_int("k", k)  # a numpy integer too
    check_positive_int("fetch_k", fetch_k)
    if isinstance(lambda_mult, bool) or not isinstance(lambda_mult, numbers.Real) or not 0.0 <= lambda_mult <= 1.0:
        raise InvalidInputError(f"lambda_mult must be a number from 0 to 1, got {lambda_mult!r}")
    if where is not None:
        validate_filter(where)
    return int(k), int(fetch_k)


def id_list(ids: object, what: str, ordered: bool = True) -> list[str]:
    """A list of ids: from a sequence where their order matters, else from any collection (a
    set...); a lone string is refused, since iterating it would name its letters."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence if ordered else Collection):
        kind = "list" if ordered else "collection"
        raise InvalidInputError(f"{what} must be a {kind} of ids, got {type(ids).__name__} {ids!r:.60}")
    ids = list(ids)
    odd = next((doc_id for doc_id in ids if not isinstance(doc_id, str)), None)
    if odd is not None:  # the local store ignored it as unknown, Milvus failed on it
        raise InvalidInputError(f"{what} are strings, got {type(odd).__name__} {odd!r:.60}")
    return ids
