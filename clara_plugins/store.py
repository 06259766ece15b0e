"""MemoryStore: documents kept as CLaRa memory tokens, searchable with faiss, saved without pickle.

Per document the store keeps its text, its metadata, its memory tokens (the generator's input:
fp16, or int8 with one scale per memory vector) and a retrieval key. CLaRa's key is the
normalised mean (or flattened) memory, so it is computed from the memory when needed, never
stored twice. Other key encoders' keys are stored beside the memories. ``save`` and ``load``
go through a folder of generations (``store_folder``).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

from . import store_folder
from .atomic import uninterrupted
from .base_store import (FETCH_K, BaseMemoryStore, StoredDocument, calibration_rows, check_known, check_search,
                         id_list, last_of_each, pair_cosines, query_vector)
from .checkpoint import check_compressor, compressor_signature
from .checks import check_positive_int, check_texts
from .compact import MIN_ROWS, RETRAIN_GROWTH, TRAINING_ROWS, CompactIndex, dequantize, quantize
from .config import INDEX_KINDS, MEMORY_DTYPES
from .errors import StoreError
from .filters import Filter, matcher, validate_filter
from .found import TextLookup
from .keys import KeyEncoder, maximal_marginal_relevance, normalize_rows, row_dots
from .model import ClaraModel

# candidates the compact index hands over per result, re-scored exactly: at 1M synthetic
# passages 20 found 94.4 % of the exact top 10 in 25 ms p95, 40 found 96.0 % in 36 ms
# (docs/benchmarks, store_scale)
RESCORE_FACTOR = 40
# hnsw: faiss' default breadth of search (16) found 74 % of the exact top 10 among 10k CLaRa
# keys, 128 found 96 % at 0.5 ms a query (docs/benchmarks, store_scale); construction as faiss'.
# A search asking for more documents searches as broadly as it asks.
HNSW_EF_SEARCH = 128
_LOAD_TRIES = 5  # generations a load starts over on while writers remove the one it reads


class MemoryStore(BaseMemoryStore):
    """Upsert, delete, get and search documents compressed by one ClaraModel.

    ``index`` is ``"flat"`` (exact inner product on unit-norm keys), ``"hnsw"`` (approximate)
    or ``"ivfpq"``, the compact index for large corpora: product-quantised keys
    (``compact.CompactIndex``, 128 bytes per document at CR16) whose best ``rescore_factor`` x k
    candidates are re-scored exactly from the stored memories (an attribute of this object,
    not saved: a loaded store starts from ``RESCORE_FACTOR``; an hnsw store's ``ef_search``,
    its graph search's breadth, likewise from ``HNSW_EF_SEARCH``); below ``compact.MIN_ROWS``
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
        self._rescore_factor = RESCORE_FACTOR
        self._ef_search = HNSW_EF_SEARCH
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
        self._keys_made = 0  # by filtered searches since the index was last built: see _candidate_keys
        self._lookup: TextLookup | None = None  # of the stored texts: built when first asked, then kept up
        self._saved: store_folder.SavedGeneration | None = None  # the generation last saved or loaded; see save
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
        texts, given, metadatas = self._checked(texts, ids, metadatas)
        memories = self._compressed(texts, memories, show_progress)
        # an id given twice keeps its last document (its second copy replaced the first: a built
        # hnsw index was dropped, and the first copy's memories held as a dead row)
        ids, kept = given, last_of_each(given)
        if len(kept) < len(given):
            texts, ids, metadatas = ([values[i] for i in kept] for values in (texts, given, metadatas))
            memories = memories[kept]
        scales = None
        if self.memory_dtype == "int8":
            memories, scales = quantize(memories)
        keys = None if self.keys.keys_are_memories else self._document_keys(texts)
        with self._lock, uninterrupted():
            self._check_key_size(keys)
            lookup, self._lookup = self._lookup, None  # kept up at the end, once the write is whole
            chunk, first_new_row, replaced = len(self._memory_chunks), len(self._ids), []  # rows, with their texts
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
                    replaced.append((row, self._texts[row]))
                    self._texts[row], self._metadatas[row], self._where[row] = text, metadata, (chunk, offset)
            self._changed()
            self._extend_index(first_new_row, [row for row, _ in replaced])
            if replaced:
                self._drop_dead_rows()
            self._keep_lookup(lookup, [(self._ids[row], text) for row, text in replaced], list(zip(ids, texts)))
        return given

    def _keep_lookup(self, lookup: TextLookup | None, removed: list[tuple[str, str]],
                     written: list[tuple[str, str]]) -> None:
        """Bring the text lookup a write took at its start up to date, once the rest of the write is
        done: the (id, text) pairs deleted or replaced, and those written. A write that failed
        before, or here, leaves none, built again when next asked."""
        if lookup is not None:
            lookup.remove(removed)
            lookup.add(written)
            self._lookup = lookup

    def _extend_index(self, first_new_row: int, replaced: list[int]) -> None:
        """Add appended rows to a built index, so that a large hnsw or ivfpq index is not built
        again for a few new documents, and write the keys of replaced rows over their old ones in
        a flat index (built again at the next search, one replaced document cost 35 s at a
        million). Replaced rows make any other index stale (rebuilt at the next search), and so
        does a store outgrowing the exact search of small ivfpq stores, or the rows its compact
        index learned from (a corpus indexed in order would otherwise be quantised by codebooks
        learned from its first group alone)."""
        if isinstance(self._index, CompactIndex):
            outgrown = len(self._ids) >= RETRAIN_GROWTH * self._index.trained_over
        else:
            outgrown = self.index_kind == "ivfpq" and len(self._ids) >= MIN_ROWS
        if outgrown or (replaced and not isinstance(self._index, faiss.IndexFlat)):
            self._index = None
        elif self._index is not None:
            try:  # a shard at a time, as it is built; an index left short would be searched and saved short
                if replaced:  # the flat index's own rows, in place
                    keys = faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * self._index.d)
                    keys.reshape(self._index.ntotal, self._index.d)[replaced] = self._row_keys(replaced)
                for start in range(first_new_row, len(self._ids), store_folder.SHARD_ROWS):
                    self._index.add(self._row_keys(range(start, min(start + store_folder.SHARD_ROWS, len(self._ids)))))
            except BaseException:
                self._index = None  # rebuilt at the next search or save
                raise

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
        with self._lock, uninterrupted():
            doomed = {self._row_of[i] for i in ids if i in self._row_of}
            if not doomed:
                return
            gone = [(self._ids[row], self._texts[row]) for row in doomed]
            lookup, self._lookup = self._lookup, None  # kept up at the end, once the delete is whole
            for row in doomed:
                self._count_dead(row)
            keep = [row for row in range(len(self._ids)) if row not in doomed]
            self._ids = [self._ids[r] for r in keep]
            self._texts = [self._texts[r] for r in keep]
            self._metadatas = [self._metadatas[r] for r in keep]
            self._where = [self._where[r] for r in keep]
            self._row_of = {doc_id: row for row, doc_id in enumerate(self._ids)}
            self._index = self._index_without(sorted(doomed))
            self._changed()
            self._drop_dead_rows()
            self._keep_lookup(lookup, gone, [])

    def _index_without(self, rows: list[int]) -> faiss.Index | None:
        """A built flat index with the deleted rows' keys taken out, the rows after them moving up
        as the store's do (built again from every key, one document's delete took 35 s at a
        million); any other is None, built at the next search: an hnsw graph cannot lose a node,
        and a compact index's fast-scan codes keep the removed rows' bytes in their last block,
        which the next added rows' codes were mixed with."""
        if not isinstance(self._index, faiss.IndexFlat):
            return None
        self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64)))
        return self._index

    def _count_dead(self, row: int) -> None:
        """Note that a row's memories are no longer read: replaced, or its document deleted."""
        if not isinstance(self._memory_chunks[self._where[row][0]], np.memmap):
            self._dead_ram_rows += 1

    def _drop_dead_rows(self) -> None:
        """Pack the chunks held in RAM anew once half their rows or more are the memories of
        replaced or deleted documents (and there are SHARD_ROWS such rows or more), so that a
        long-running store's RAM follows its live documents. Memory-mapped chunks (a loaded
        generation) cost no RAM and keep their places, and so do chunks whose rows all live (a
        store whose every document was replaced held its memories four times over while it
        copied the new chunk). Chunks are replaced, never changed in place (see save)."""
        if self._dead_ram_rows < max(self._ram_rows - self._dead_ram_rows, store_folder.SHARD_ROWS):
            return
        lives = Counter(chunk for chunk, _ in self._where)
        packs = [not isinstance(chunk, np.memmap) and lives[number] < len(chunk)
                 for number, chunk in enumerate(self._memory_chunks)]
        moved = [row for row, (chunk, _) in enumerate(self._where) if packs[chunk]]
        where = [self._where[row] for row in moved]
        stay = sum(lives[number] for number, chunk in enumerate(self._memory_chunks)
                   if not isinstance(chunk, np.memmap) and not packs[number])
        # scales (int8) and keys (a separate key encoder) are chunked as the memories are; every
        # packed array is gathered before any list changes (an out-of-memory midway emptied the
        # memories while the rows still pointed into them: no search or save worked again)
        lists = [chunks for chunks in (self._memory_chunks, self._scale_chunks, self._key_chunks) if chunks]
        gathered = [store_folder.gather(chunks, where) if where else None for chunks in lists]
        for chunks, moved_rows in zip(lists, gathered):
            # an emptied chunk keeps its number, so that the other rows' places stay valid (and
            # that no later chunk takes a number a saved generation's places name); one new empty
            # array for all, since a view (chunk[:0]) would keep the whole buffer alive, and one
            # array each grew a long-running store by a hundred bytes a write
            empty = np.empty((0, *chunks[0].shape[1:]), chunks[0].dtype)
            chunks[:] = [empty if pack or not len(chunk) else chunk for chunk, pack in zip(chunks, packs)]
            if moved_rows is not None:
                chunks.append(moved_rows)
        for offset, row in enumerate(moved):
            self._where[row] = (len(self._memory_chunks) - 1, offset)
        self._ram_rows, self._dead_ram_rows = stay + len(moved), 0

    # -------------------------------------------------------------- reading

    def get(self, ids: Sequence[str]) -> list[StoredDocument]:
        """Documents in the order asked; ids that are not stored are skipped."""
        ids = id_list(ids, "ids")
        with self._lock:
            return [self._document(self._row_of[i]) for i in ids if i in self._row_of]

    def stored_ids(self, ids: Sequence[str]) -> set[str]:
        ids = id_list(ids, "ids")
        with self._lock:
            return {i for i in ids if i in self._row_of}

    def _document(self, row: int) -> StoredDocument:
        return StoredDocument(self._ids[row], self._texts[row], copy.deepcopy(self._metadatas[row]))

    def memories(self, ids: Sequence[str]) -> torch.Tensor:
        """Memory tokens [len(ids), n_mem, hidden] (float32) for the generator."""
        ids = id_list(ids, "ids")
        with self._lock:
            check_known(ids, self._row_of)
            rows = [self._row_of[i] for i in ids]
            if not rows:
                return torch.zeros(0, self.model.config.n_mem_tokens, self.model.hidden_size)
            return torch.from_numpy(np.asarray(self._memory_rows(rows), dtype=np.float32))

    def ids_where(self, where: Filter, among: Collection[str] | None = None) -> list[str]:
        """Ids of the documents whose metadata satisfies a filter, of every stored one or of
        those ``among`` these ids (in their order)."""
        validate_filter(where)
        among = None if among is None else id_list(among, "among", ordered=False)
        with self._lock:
            keep = matcher(where)
            if among is None:
                return [doc_id for doc_id, meta in zip(self._ids, self._metadatas) if keep(meta)]
            return [doc_id for doc_id in among if doc_id in self._row_of and keep(self._metadatas[self._row_of[doc_id]])]

    def ids_for_texts(self, texts: Sequence[str]) -> list[str | None]:
        """The stored id of each exact text, or None: lets a generator reuse stored memories."""
        texts = check_texts(texts, "texts", blanks=True)  # as the Milvus store, which cannot query the rest
        with self._lock:
            return [self._text_lookup().id_of(text) for text in texts]

    def documents_in(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text`` as a prompt
        holds it (``found_text``), in order and without overlaps (the longest document wins at a
        position).

        Lets a prompt of any layout read its stored documents from memory tokens. Documents
        shorter than MIN_FOUND_CHARS (trimmed) are not looked for: too short to be told from prose.
        """
        with self._lock:
            return self._text_lookup().find(text)

    def _text_lookup(self) -> TextLookup:
        """The stored texts' lookup, built from the rows when first asked (a loaded store's)."""
        if self._lookup is None:
            self._lookup = TextLookup(zip(self._ids, self._texts))
        return self._lookup

    def all_ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    # ------------------------------------------------------------- searching

    def search_by_key(
        self, key: ArrayLike | torch.Tensor, k: int = 4, where: Filter | None = None, *,
        ids: Collection[str] | None = None,
        lambda_mult: float = 1.0, fetch_k: int = FETCH_K,
    ) -> list[tuple[StoredDocument, float]]:
        """Like ``search`` for a query key computed elsewhere."""
        k, fetch_k = check_search(k, where, lambda_mult, fetch_k)
        wanted = None if ids is None else set(id_list(ids, "ids", ordered=False))
        with self._lock:
            if not self._ids:
                if self.keys.keys_are_memories:  # a bad key is refused empty as full, as Milvus refuses it
                    query_vector(key, self.keys.dimensions)
                return []
            query = query_vector(key, self._key_size())
            diverse = lambda_mult < 1.0
            rows, scores = self._nearest(query, max(k, fetch_k) if diverse else k, where, wanted)
            if diverse and len(rows):
                chosen = maximal_marginal_relevance(query, self._candidate_keys(rows), k, lambda_mult)
                rows, scores = rows[chosen], scores[chosen]
            return [(self._document(int(r)), float(s)) for r, s in zip(rows[:k], scores[:k])]

    def _nearest(self, query: np.ndarray, n: int, where: Filter | None,
                 ids: set[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the n candidates most similar to the query, best first, and their cosines."""
        if where is None and ids is None:
            index = self._ensure_index()
            if isinstance(index, CompactIndex):
                return self._best(index.candidates(query, n * self._rescore_factor), query, n)
            count = len(self._ids)
            n = min(n, count)
            if n == count:  # every document: hnsw's graph missed some among many alike (150 copies: 239 of 250)
                return self._best(np.arange(count), query, n)
            # past the documents tied with the n-th (faiss kept any of them, the exact search the first
            # stored): twice n covers a corpus added twice, a range every document as good as the n-th
            fetched = min(2 * n, count)
            rows, scores = self._searched(index, query, fetched)
            # ties with the n-th past those fetched, or fewer than n (hnsw's graph missed some among many alike)
            while len(rows) < count and (len(rows) < n or scores[-1] >= scores[n - 1]):
                if isinstance(index, faiss.IndexFlat):  # one range: every document as good as the n-th
                    rows = index.range_search(query[None], float(np.nextafter(scores[n - 1], -np.inf)))[2]
                    break
                if fetched == count:  # the graph visited all it reaches: every row, exactly
                    rows = np.arange(count)
                    break
                fetched = min(2 * fetched, count)
                rows, scores = self._searched(index, query, fetched)
            return self._best(rows, query, n)  # scored as the exact search scores them
        # exact search over the candidates: those named (in stored order), or every document
        rows = range(len(self._ids)) if ids is None else sorted(self._row_of[i] for i in ids if i in self._row_of)
        if where is not None:
            keep = matcher(where)
            rows = [row for row in rows if keep(self._metadatas[row])]
        return self._best(np.array(rows, dtype=np.int64), query, n)

    def _searched(self, index: faiss.Index, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat or hnsw index's n nearest rows and their scores; hnsw visits efSearch nodes,
        whatever n: rows past them came back as -1, unreported."""
        breadth = faiss.SearchParametersHNSW(efSearch=max(self._ef_search, n)) if self.index_kind == "hnsw" else None
        scores, rows = index.search(query[None], n, params=breadth)
        found = rows[0] >= 0
        return rows[0][found], scores[0][found]

    def _best(self, rows: np.ndarray, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n of ``rows`` most similar to the query, best first, with their exact cosines;
        scored SHARD_ROWS at a time so that a large candidate set never holds all its keys."""
        if not len(rows):
            return rows, np.zeros(0, dtype=np.float32)
        scores = np.concatenate([row_dots(self._candidate_keys(rows[start:start + store_folder.SHARD_ROWS]), query)
                                 for start in range(0, len(rows), store_folder.SHARD_ROWS)])
        return _best_first(rows, scores, n)

    def _candidate_keys(self, rows: np.ndarray) -> np.ndarray:
        """The keys of rows to score: read from a built exact index that holds every row, where
        it keeps them smaller than the memories they are made of (a mean key: a filtered search
        read and averaged each candidate's 16 memory vectors), else made from the memories. The
        index holds the very keys ``_row_keys`` made, so the scores are the same.

        A flat index not built yet (a loaded store whose every search is filtered) is built once
        the keys made for filtered searches add up to the store's size, about what building costs:
        every broad filtered search made each match's key from its memories again."""
        index = self._index
        mean_keys = self.keys.keys_are_memories and self.keys.blocks == 1
        if mean_keys and index is None and self.index_kind == "flat":
            self._keys_made += len(rows)
            if self._keys_made >= len(self._ids):
                index = self._ensure_index()
        if mean_keys and isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)) and index.ntotal == len(self._ids):
            return index.reconstruct_batch(np.asarray(rows, dtype=np.int64))
        return self._row_keys(rows)

    def _sample_pair_cosines(self) -> np.ndarray:
        """Sorted cosines between distinct documents of an evenly spread sample."""
        count = len(self._ids)
        if count < 2:  # an empty store has no rows to read keys from
            return np.zeros(0, dtype=np.float32)
        return pair_cosines(self._row_keys(calibration_rows(count)))

    def _memory_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Memories [len(rows), n_mem, hidden] of rows: fp16 as stored, or int8 dequantised to float32."""
        where = [self._where[r] for r in rows]
        memories = store_folder.gather(self._memory_chunks, where)
        if self.memory_dtype == "int8":
            return dequantize(memories, store_folder.gather(self._scale_chunks, where))
        return memories

    def _row_keys(self, rows: Sequence[int]) -> np.ndarray:
        if self.keys.keys_are_memories:
            return self.keys.memory_keys(self._memory_rows(rows))
        return store_folder.gather(self._key_chunks, [self._where[r] for r in rows])

    @property
    def rescore_factor(self) -> int:
        """A compact index's candidates re-scored exactly, per document asked for."""
        return self._rescore_factor

    @rescore_factor.setter
    def rescore_factor(self, value: int) -> None:
        check_positive_int("rescore_factor", value)  # 0 or 0.5 failed inside faiss, at a search
        self._rescore_factor = int(value)

    @property
    def ef_search(self) -> int:
        """An hnsw index's search breadth: raise it for recall (0.66 of the exact top 10 at 1M
        passages at 128), lower it for speed; at least the documents asked for."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        check_positive_int("ef_search", value)
        self._ef_search = int(value)

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
            else:
                index = faiss.IndexFlatIP(dim)
            with tqdm(total=count, unit="doc", desc="building the search index",
                      disable=count < store_folder.PROGRESS_ROWS) as progress:  # minutes at a million
                for start in range(0, count, store_folder.SHARD_ROWS):
                    index.add(self._row_keys(range(start, min(start + store_folder.SHARD_ROWS, count))))
                    progress.update(min(store_folder.SHARD_ROWS, count - start))
            self._index, self._keys_made = index, 0
        return self._index

    # --------------------------------------------------------------- saving

    def save(self, folder: str | Path) -> Path:
        """Write a new generation of the store and make it current. Returns its folder.

        Shards whose rows are unchanged since this store last saved to or loaded from the
        folder are hard-linked from that generation rather than written again, so that a
        corpus indexed in groups (``index_documents``) writes each shard about once. A store
        that never read or wrote the folder replaces what another store saved there, as a
        framework's ``save_local`` or ``persist`` does; one that did is refused (``StoreError``)
        once another writer has saved there since.
        """
        folder = Path(folder)
        store_folder.check_store_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # one writer at a time, and the snapshot taken once it is this one's turn: a snapshot
        # taken before the wait could be written after a newer save and undo it
        with store_folder.writer_turn(folder):
            with self._lock:  # a consistent snapshot; chunks are never changed in place, so the writing can wait
                revision = self.revision
                snapshot = store_folder.Snapshot(
                    where=np.array(self._where, dtype=np.int64).reshape(-1, 2),
                    chunks={"memory_shards": list(self._memory_chunks), "scale_shards": list(self._scale_chunks),
                            "key_shards": [] if self.keys.keys_are_memories else list(self._key_chunks)},
                    records={"ids": list(self._ids), "texts": list(self._texts), "metadatas": list(self._metadatas)},
                )
                flat = not len(self._ids) or self.index_kind == "flat"
                index = None if flat else store_folder.SavedIndex.of(self._ensure_index())
                previous = self._saved
            self._check_no_other_save(folder)
            generation, header = store_folder.write_generation(folder, snapshot, previous, index, {
                "index": self.index_kind, "compressor": compressor_signature(self.model),
                "keys": self.keys.signature(), "memory_dtype": self.memory_dtype})
            with self._lock:
                # the store's own folder (not a backup's) and no other save recorded since (its rows
                # may be numbered anew): the rows read from the files, but those written meanwhile
                own = previous is None or previous.folder.parent == folder.resolve()
                if own and self._saved is previous:
                    try:
                        self._map(generation, header, None if self.revision == revision else snapshot)
                    except (OSError, StoreError) as error:  # they stay in RAM, recorded below
                        warnings.warn(f"the store keeps its memories in RAM, not read from {generation}: {error}",
                                      stacklevel=2)
                if self._saved is previous:
                    self._saved = store_folder.SavedGeneration.of(generation, snapshot.where, header)
            self._generation_in[folder.resolve()] = store_folder.stamp(generation)
        return generation

    def _map(self, generation: Path, header: dict, written: store_folder.Snapshot | None = None) -> None:
        """Hold the memories (and scales and keys) of a generation as its files, memory-mapped:
        what a load holds, and what a save to the store's folder switches to, so that a corpus
        indexed and saved in groups is not all held in RAM (18 GB at CR16 for a million
        passages). ``written``: what a save wrote, where the store changed while it wrote; the
        rows written meanwhile stay where they are (a store written during every save held every
        row written since its load in RAM, and the generation it loaded stayed mapped after a
        later save removed it). Every file is read and checked before the store changes."""
        memories = store_folder.read_shards(generation, header["memory_shards"], np.dtype(self.memory_dtype))
        shape = (self.model.config.n_mem_tokens, self.model.hidden_size)
        if any(m.shape[1:] != shape for m in memories):  # a bare AssertionError at the first search
            raise StoreError(f"{generation}: the memory shards hold rows of another shape than this model's {shape}")
        scales = store_folder.read_shards(generation, header.get("scale_shards", []), np.float32)
        expected = [m.shape[:2] for m in memories] if self.memory_dtype == "int8" else []
        if [s.shape for s in scales] != expected:
            raise StoreError(f"{generation}: the scale shards do not match the {self.memory_dtype} memory shards")
        keys = store_folder.read_shards(generation, header["key_shards"], np.float32)
        if not self.keys.keys_are_memories and ([len(k) for k in keys] != [len(m) for m in memories]
                                                or len({k.shape[1:] for k in keys}) > 1 or any(k.ndim != 2 for k in keys)):
            raise StoreError(f"{generation}/store.json: the key shards do not match the memory shards row for row, "
                             "with keys of one width")
        where = [(c, o) for c, shard in enumerate(memories) for o in range(len(shard))]
        if len(where) != header["count"]:
            raise StoreError(f"{generation}: memory shards hold {len(where)} rows, expected {header['count']}")
        places, kept = (where, []) if written is None else self._places_after(written, where, len(memories))
        held = [self._memory_chunks[chunk] for chunk in kept if not isinstance(self._memory_chunks[chunk], np.memmap)]
        chunks = [files + [old[chunk] for chunk in kept] if old else files for files, old in
                  ((memories, self._memory_chunks), (scales, self._scale_chunks), (keys, self._key_chunks))]
        self._memory_chunks, self._scale_chunks, self._key_chunks = chunks
        self._where = places
        self._ram_rows = sum(len(chunk) for chunk in held)
        self._dead_ram_rows = self._ram_rows - sum(not isinstance(self._memory_chunks[chunk], np.memmap)
                                                   for chunk, _ in places if chunk >= len(memories))
        self._saved = store_folder.SavedGeneration.of(generation, np.array(where, dtype=np.int64).reshape(-1, 2), header)

    def _places_after(self, written: store_folder.Snapshot, saved: list[tuple[int, int]],
                      files: int) -> tuple[list[tuple[int, int]], list[int]]:
        """Each row's (chunk, offset) once a save's ``files`` chunks lead the chunks: a row still
        where the save's snapshot found it is read from its ``saved`` place; one written since
        keeps its chunk, numbered after the files'. Returns the places and the chunks kept, in
        their new order."""
        row_written = {doc_id: row for row, doc_id in enumerate(written.records["ids"])}
        found_at = [tuple(place) for place in written.where.tolist()]
        kept: dict[int, int] = {}  # a chunk rows written since still read -> its place after the files
        places = []
        for doc_id, (chunk, offset) in zip(self._ids, self._where):
            row = row_written.get(doc_id)
            if row is not None and found_at[row] == (chunk, offset):
                places.append(saved[row])
            else:
                places.append((files + kept.setdefault(chunk, len(kept)), offset))
        return places, list(kept)

    def _check_no_other_save(self, folder: Path) -> None:
        """Refuse to save over a generation another writer saved since this store last read or
        wrote the folder: its documents are not in this store, and the save would drop them."""
        known = self._generation_in.get(folder.resolve())
        if known is None or not (folder / "CURRENT").is_file():
            return
        current = store_folder.stamp(folder / store_folder.current_generation(folder))
        if current != known:  # a name alone: the folder wiped and saved again restarts at gen-000001
            raise StoreError(f"{folder} was saved by another writer since this store read it ({current[0]}, not "
                             f"the {known[0]} it knows): load it again and repeat the changes, or save to another "
                             "folder")

    @classmethod
    def load(
        cls, folder: str | Path, model: ClaraModel, keys: KeyEncoder | None = None, batch_size: int = 8
    ) -> "MemoryStore":
        """Open the current generation; memories stay on disk, memory-mapped.

        Every file is checked against the checksum written with it, and no name the folder
        records may lead outside it.
        """
        folder = Path(folder)
        for _ in range(_LOAD_TRIES):
            name = store_folder.current_generation(folder)
            try:
                return cls._open_generation(folder, folder / name, model, keys, batch_size)
            except (StoreError, FileNotFoundError):
                if store_folder.current_generation(folder) == name:
                    raise
                # writers saved twice meanwhile and removed this generation: open the new one
        raise StoreError(f"{folder} was saved {_LOAD_TRIES} times over while it was read (a writer saving often, "
                         "such as clara index with a small --save-every): load it when the writer is done")

    @classmethod
    def _open_generation(cls, folder: Path, generation: Path, model: ClaraModel, keys: KeyEncoder | None,
                         batch_size: int) -> "MemoryStore":
        header, memory_dtype = store_folder.read_store_header(generation)
        store = cls(model, keys, header["index"], batch_size, memory_dtype=memory_dtype)
        check_compressor(header["compressor"], compressor_signature(model), folder)
        saved, current = header["keys"], store.keys.signature()
        # a store of embedding keys saved before the embedding's model was recorded names its class alone
        if saved != current and saved != {name: value for name, value in current.items() if name != "model"}:
            raise StoreError(f"{folder} was indexed with keys {saved}, not {current}: "
                             "load a model with the same retrieval_key, or the same key encoder")
        store_folder.verify_files(generation, header)  # after the header's checks: hashing a large store takes minutes
        count = header["count"]
        record_shards = header.get("record_shards", [])
        if header["format"] != store_folder.FORMAT:  # format 2: every record in one file
            record_shards = [{"file": "records.json", "rows": count}]
        elif [shard["rows"] for shard in record_shards] != [shard["rows"] for shard in header["memory_shards"]]:
            # a save links record shards by the memory shards' rows: they must match row for row
            raise StoreError(f"{generation}/store.json: the record shards do not hold the memory shards' rows")
        records = store_folder.read_records(generation, record_shards)
        if len(records["ids"]) != count:
            raise StoreError(f"{generation}: the record shards hold {len(records['ids'])} documents, expected {count}")
        store._map(generation, header)
        store._ids, store._texts, store._metadatas = records["ids"], records["texts"], records["metadatas"]
        store._row_of = {doc_id: row for row, doc_id in enumerate(store._ids)}
        store._generation_in[folder.resolve()] = store_folder.stamp(generation)
        if "index.faiss" in header["sha256"]:
            compact = "index-projection.npy" in header["sha256"]
            # stores saved before the field existed: unknown, so the next upsert makes the index learn again
            trained_over = header.get("index_trained_over", 0) if compact else None
            store._index = store_folder.read_index(generation, count, trained_over)
        return store


def _best_first(rows: np.ndarray, scores: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n best rows (all without n) and their scores, ties in row order: faiss' flat index
    gave tied rows last-added first and the exact search first-added first, so a filter that
    kept everything, or another k, changed which the generator read first."""
    order = np.lexsort((rows, -scores))[:n]
    return rows[order], scores[order]
