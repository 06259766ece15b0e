"""BaseMemoryStore: what the adapters, the generator's context and training ask of a store of
CLaRa memories (a local ``MemoryStore``, a Milvus collection), and the checks every store shares."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike

from .checks import check_fraction, check_positive_int, check_texts, unicode_problem
from .errors import InvalidInputError
from .filters import Filter, validate_filter
from .found import found_text
from .keys import ClaraKeys, KeyEncoder, check_clara_model, normalize_rows
from .model import ClaraModel, as_memories, compress_in_parts, fp16_memories, refuse_text_reader

FETCH_K = 20  # the nearest documents a diverse (MMR) search re-ranks, unless told
CALIBRATION_SAMPLE = 256  # documents whose pairwise cosines calibrate relevance


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

    def __deepcopy__(self, memo: dict[int, Any]) -> BaseMemoryStore:
        """Itself: a store is shared state (its documents, a lock, a server's connection), as a
        database client is, so a deep copy of what holds it (a retriever, a chain) shares it;
        copied, its lock failed the copy."""
        return self

    def __copy__(self) -> BaseMemoryStore:
        return self  # as a deep copy: shared state, not refused as a pickling

    def __reduce__(self) -> tuple:
        """Refused by name: its lock failed the pickling with a bare TypeError."""
        raise TypeError(f"a {type(self).__name__} is not pickled: save it (MemoryStore.save) and load it where it is "
                        "used, or reach one Milvus collection from each process")

    def __init__(self, model: ClaraModel, keys: KeyEncoder | None, batch_size: int) -> None:
        check_positive_int("batch_size", batch_size)  # before a first upsert compresses nothing
        check_clara_model(model)
        refuse_text_reader(model, "its generator reads text, and its compressor was not trained with it; a store "
                                  "needs a CLaRa checkpoint")  # refused by the CLI alone, its stores passed for CLaRa's
        if keys is not None and not isinstance(keys, KeyEncoder):
            hint = ": the index kind is index=" if isinstance(keys, str) else ""
            raise InvalidInputError(f"keys must be a KeyEncoder (e.g. ClaraKeys), got a {type(keys).__name__}{hint}")
        if keys is not None and keys.keys_are_memories and not isinstance(keys, ClaraKeys):  # its searches failed
            raise InvalidInputError(f"{type(keys).__name__} sets keys_are_memories, which only ClaraKeys computes "
                                    "(from the stored memories): another key encoder sets it False")
        if isinstance(keys, ClaraKeys) and keys.model is not model:  # one model's queries against another's memories
            raise InvalidInputError("keys are ClaraKeys of another model than the store's: pass the store's model to "
                                    "both, or no keys")
        self.model = model
        self.keys = keys if keys is not None else ClaraKeys(model)
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

    def delete_where(self, where: Filter | None = None, ids: Collection[str] | None = None) -> None:
        """Remove the documents whose metadata satisfies a filter (without one, every document),
        among ``ids`` where given, chosen and removed in one hold of the lock: deleted by ids read
        before, a document another thread had meanwhile replaced by one the filter does not
        select was lost."""
        wanted = None if ids is None else id_list(ids, "ids", ordered=False)
        with self._lock:
            self.delete(self._chosen(where, wanted))

    def get_where(self, where: Filter | None = None, ids: Collection[str] | None = None) -> list[StoredDocument]:
        """The documents whose metadata satisfies a filter (without one, every document), among
        ``ids`` where given (in their order), chosen and read in one hold of the lock: read by ids
        chosen before, a document another thread had meanwhile replaced by one the filter does
        not select was returned."""
        wanted = None if ids is None else id_list(ids, "ids", ordered=False)
        with self._lock:
            return self.get(self._chosen(where, wanted))

    def _chosen(self, where: Filter | None, wanted: list[str] | None) -> list[str]:
        """(Under the lock) the ids among ``wanted``, or every stored one, that ``where`` selects."""
        if where is None:  # the ids alone, not a listing of every stored one
            return self.all_ids() if wanted is None else wanted
        return self.ids_where(where, wanted)

    @abstractmethod
    def get(self, ids: Sequence[str]) -> list[StoredDocument]:
        """Documents in the order asked; ids that are not stored are skipped."""

    @abstractmethod
    def stored_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the store holds, without reading their texts (a resumed index asks
        for a corpus' worth)."""

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
    def ids_where(self, where: Filter, among: Collection[str] | None = None) -> list[str]:
        """Ids of the documents whose metadata satisfies a filter: of every stored one, or of
        those ``among`` these ids (in their order), the filter read for them alone (read for
        every row, a LlamaIndex ``get_nodes`` of a few node ids with filters cost 0.3 s at a
        million documents)."""

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
        self, key: ArrayLike | torch.Tensor, k: int = 4, where: Filter | None = None, *,
        ids: Collection[str] | None = None,
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
        return self.relevances([cosine])[0]

    def relevances(self, cosines: Sequence[float]) -> list[float]:
        """``relevance`` of each cosine of one result, all ranked against one calibration (a
        write between two of them sampled it anew, and a closer document could rank as less
        relevant)."""
        with self._lock:
            if self._pair_cosines is None:
                self._pair_cosines = self._sample_pair_cosines()
            pairs = self._pair_cosines
        if not len(pairs):  # within [0, 1]: a float32 self-cosine can be 1.0000001
            return [min(1.0, max(0.0, (1.0 + cosine) / 2.0)) for cosine in cosines]
        ranks = np.searchsorted(pairs, np.asarray(cosines, dtype=np.float64), side="left")
        return (ranks / len(pairs)).tolist()

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
            try:  # as UTF-8, as a file or Milvus keeps it: a lone surrogate is no character
                kept.append(json.loads(json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode("utf-8")))
            except (TypeError, ValueError) as error:
                raise InvalidInputError(f"metadata of {doc_id!r} is not JSON-serialisable: {error}") from error
            if kept[-1] != metadata:
                raise InvalidInputError(f"metadata of {doc_id!r} would change when saved as JSON: use string keys "
                                        "and lists, not tuples")
        return texts, ids, kept

    def _compressed(self, texts: list[str], memories: torch.Tensor | None, show_progress: bool) -> np.ndarray:
        """fp16 memories [n, n_mem, hidden] of the texts: a copy of ``memories`` when given (a
        caller may refill its buffer for the next group; stored rows never change), else
        compressed now (``compress_in_parts``)."""
        if memories is None:
            return compress_in_parts(self.model, texts, self.batch_size, show_progress, stacklevel=4)
        if len(memories := as_memories(memories, "memories")) != len(texts):
            raise InvalidInputError(f"got {len(memories)} precomputed memories for {len(texts)} texts")
        shape = (self.model.config.n_mem_tokens, self.model.hidden_size)
        if tuple(memories.shape[1:]) != shape:  # another rate's or model's: the generator would read them wrongly
            raise InvalidInputError(f"memories of shape {tuple(memories.shape[1:])} do not match this model's "
                                    f"{shape} (n_mem_tokens, hidden)")
        return fp16_memories(memories).copy()


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


@runtime_checkable
class HoldsMemoryStore(Protocol):
    """A framework's CLaRa vector store, which wraps a memory store."""

    @property
    def memory_store(self) -> BaseMemoryStore: ...


# what a store= argument takes: the users of either framework pass the store they hold
StoreLike = BaseMemoryStore | HoldsMemoryStore


def as_memory_store(value: object) -> BaseMemoryStore:
    """A memory store (MemoryStore, MilvusMemoryStore) given as it is, or the one a framework's
    CLaRa vector store wraps (every such store exposes it as ``memory_store``), so that users
    can pass whichever they hold."""
    inner = value if isinstance(value, BaseMemoryStore) else getattr(value, "memory_store", None)
    if not isinstance(inner, BaseMemoryStore):
        raise TypeError(f"store must be a MemoryStore or a CLaRa vector store (or a MilvusMemoryStore), "
                        f"got {type(value).__name__}")
    return inner


def calibration_rows(count: int) -> np.ndarray:
    """Positions of the documents whose pairs calibrate ``relevance``: at most CALIBRATION_SAMPLE,
    spread evenly over ``count`` (the first ones alone were one source's, indexed source by source)."""
    return np.unique(np.linspace(0, count - 1, min(count, CALIBRATION_SAMPLE)).astype(np.int64))


def last_of_each(ids: Sequence[str]) -> list[int]:
    """Positions of the documents an upsert keeps: an id given twice keeps its last one."""
    return list({doc_id: i for i, doc_id in enumerate(ids)}.values())


def query_vector(key: ArrayLike | torch.Tensor, size: int) -> np.ndarray:
    """A search key as a unit-norm float32 vector, refused unless it has the store's key size
    and finite values, not all zero (either scored every document alike, and the first stored
    came back as the nearest)."""
    if isinstance(key, torch.Tensor):  # one that carries gradients, lives on a GPU, or is bf16 (numpy has none) too
        key = key.detach().cpu()
        key = (key.float() if key.dtype == torch.bfloat16 else key).numpy()
    array = np.asarray(key)
    if array.dtype.kind not in "iuf":  # None read as one value, a string failed in numpy, complex lost its part
        raise InvalidInputError(f"the search key must hold real numbers, got {array.dtype} {key!r:.60}")
    array = array.astype(np.float64).reshape(1, -1)
    largest = np.abs(array).max() if array.size else 0.0
    if np.isfinite(largest) and largest > 0:  # scaled first: a finite float64 key past float32's range overflowed
        array = array / largest
    query = normalize_rows(array)[0]
    if query.size != size:
        raise InvalidInputError(f"the search key has {query.size} values, the store's keys have {size}")
    if not np.isfinite(query).all():
        raise InvalidInputError("the search key holds NaN or infinite values")
    if not query.any():
        raise InvalidInputError("the search key is all zeros (an embedding that knew no word of the query?)")
    return query


def pair_cosines(keys: np.ndarray) -> np.ndarray:
    """Sorted cosines between distinct rows of unit-norm keys [n, dim] (none for fewer than two)."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.float32)
    return np.sort((keys @ keys.T)[np.triu_indices(len(keys), 1)])


def check_known(ids: Sequence[str], known: Collection[str]) -> None:
    """Refuse ids a store does not hold, naming the first few."""
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise InvalidInputError(f"unknown document ids: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")


def check_search(k: int, where: Filter | None, lambda_mult: float, fetch_k: int) -> tuple[int, int]:
    """Refuse bad search arguments before any work is done; returns k and fetch_k as Python
    ints, which faiss and Milvus need (a numpy integer fails there)."""
    check_positive_int("k", k)  # a numpy integer too
    check_positive_int("fetch_k", fetch_k)
    check_fraction("lambda_mult", lambda_mult)
    if where is not None:
        validate_filter(where)
    return int(k), int(fetch_k)


def id_list(ids: object, what: str, ordered: bool = True) -> list[str]:
    """A list of ids: from a sequence where their order matters, else from any collection (a
    set...); a lone string is refused, since iterating it would name its letters, and a dict,
    whose keys would be taken for ids (a filter given as ``delete``'s ids deleted a "source")."""
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Sequence if ordered else Collection):
        kind = "list" if ordered else "collection"
        raise InvalidInputError(f"{what} must be a {kind} of ids, got {type(ids).__name__} {ids!r:.60}")
    ids = list(ids)
    odd = next((doc_id for doc_id in ids if not isinstance(doc_id, str)), None)
    if odd is not None:  # the local store ignored it as unknown, Milvus failed on it
        raise InvalidInputError(f"{what} are strings, got {type(odd).__name__} {odd!r:.60}")
    broken = next((doc_id for doc_id in ids if unicode_problem(doc_id)), None)
    if broken is not None:  # Milvus failed on it with a bare codec error
        raise InvalidInputError(f"{what} must be valid Unicode, got {broken!r:.60} ({unicode_problem(broken)})")
    return ids
