"""ClaraVectorStore: LangChain's VectorStore over a CLaRa MemoryStore."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from langchain_core.vectorstores import VectorStore

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoredDocument, store_folder
from clara_plugins.adapter_fields import LeftBehind
from clara_plugins.keys import ClaraKeys
from clara_plugins.pretrained import load_model
from clara_plugins.base_store import BaseMemoryStore, StoreLike, as_memory_store, check_store_model
from clara_plugins.errors import warn_bounded
from clara_plugins.filters import holds_no_condition, validate_filter

from .embeddings import ClaraEmbeddings, EmbeddingsKeys


def to_document(stored: StoredDocument) -> Document:
    """A stored document as LangChain's; one the LlamaIndex store wrote keeps its node in the
    metadata (``_node_content``, with ids beside it), and comes back with the node's own."""
    metadata = stored.metadata
    try:
        node = json.loads(metadata["_node_content"]) if isinstance(metadata.get("_node_content"), str) else None
    except (ValueError, RecursionError):  # not a node after all: as stored
        node = None
    if isinstance(node, dict) and isinstance(node.get("metadata"), dict):
        metadata = node["metadata"]
    return Document(page_content=stored.text, metadata=metadata, id=stored.id)


def refuse_unknown(method: str, kwargs: dict[str, Any], honoured: tuple[str, ...] = ()) -> None:
    """Refuse what a call cannot honour rather than ignore it: a ``score_threshold`` given to a
    plain similarity search, another store's ``where``; a delete that ignored its filter deleted
    every document. ``verbose`` (a retriever's ``invoke`` passes it on) and the ``honoured``
    names (FAISS's ``fetch_k`` for a plain search: a filtered search here is exact, so every
    match is a candidate) pass."""
    unknown = sorted(set(kwargs) - {"verbose", *honoured})
    if unknown:
        hint = (" (a score threshold: similarity_search_with_relevance_scores, or a retriever's "
                "search_type='similarity_score_threshold')" if "score_threshold" in kwargs else "")
        raise TypeError(f"{method} got arguments it does not take: {', '.join(unknown)}{hint}")


def _model_and_keys(model: ClaraModel | Embeddings | None,
                    embedding: Embeddings | ClaraModel | None) -> tuple[ClaraModel, EmbeddingsKeys | None]:
    """ClaraEmbeddings stand for CLaRa's own keys (no second encoder); no model means the shipped
    one. An embedding alone in the model's place is read as LangChain's stores take it
    (``InMemoryVectorStore(embedding)``, ``FAISS.load_local(folder, embeddings)``)."""
    if isinstance(model, Embeddings) and embedding is None:
        model, embedding = None, model
    if isinstance(embedding, ClaraModel) and model in (None, embedding):  # from_texts(texts, model): its second place
        model, embedding = embedding, None
    if embedding is not None and not isinstance(embedding, Embeddings):  # refused before the shipped model loads
        raise InvalidInputError(f"embedding must be a LangChain Embeddings, got {type(embedding).__name__} (the CLaRa "
                                "model is model=)")
    if isinstance(embedding, ClaraEmbeddings):
        if model is not None and embedding.model is not model:  # its keys would be ignored for the model's
            raise InvalidInputError("the ClaraEmbeddings given beside model= are of another model: pass one of them")
        return embedding.model, None
    return (model if model is not None else load_model()), (EmbeddingsKeys(embedding) if embedding else None)


def _check_store_matches(store: BaseMemoryStore, model: ClaraModel | None, embedding: Embeddings | None,
                         settings: dict[str, object]) -> None:
    """A store brings its own model, keys and settings: a model, embedding or setting given
    beside it that is not its own would go unused, and the search would not be the one asked for."""
    check_store_model(store, model, **settings)
    own = (getattr(store.keys, "embeddings", None) is embedding
           or (isinstance(embedding, ClaraEmbeddings) and embedding.model is store.model
               and isinstance(store.keys, ClaraKeys)))
    if embedding is not None and not own:
        raise InvalidInputError(f"store searches with its own keys ({store.keys.signature().get('kind')}), not "
                                f"{type(embedding).__name__}: pass the store alone, or build one with this embedding")


class ClaraVectorStore(VectorStore):
    """Documents compressed into CLaRa memory tokens, searchable from LangChain.

    By default a query is encoded by CLaRa's query reasoner and compared with the documents'
    memory tokens; pass ``embedding`` to search with any LangChain ``Embeddings`` instead.
    Without a model or a store the shipped default model is loaded. ``filter`` takes the
    metadata filter language of ``clara_plugins.filters``. Scores are cosines; relevance
    scores (``score_threshold``) are ranked against the store's own document pairs
    (``MemoryStore.relevance``): 0.5 is as close as a typical pair of stored documents.
    ``store`` picks the backend: a local ``MemoryStore`` by default, or e.g.
    ``store=MilvusMemoryStore(model, uri)`` to keep the documents in Milvus (or a LlamaIndex
    ``ClaraVectorStore``, to share its nodes).
    """

    def __init__(
        self,
        model: ClaraModel | Embeddings | None = None,  # an embedding alone may come first: _model_and_keys
        embedding: Embeddings | ClaraModel | None = None,
        *,
        store: StoreLike | None = None,
        index: str | None = None,
        batch_size: int | None = None,
        memory_dtype: str | None = None,
    ) -> None:
        # MemoryStore's defaults where None
        settings = {"index": index, "batch_size": batch_size, "memory_dtype": memory_dtype}
        if store is None:
            model, keys = _model_and_keys(model, embedding)
            store = MemoryStore(model, keys, **{name: value for name, value in settings.items() if value is not None})
        else:  # either framework's ClaraVectorStore too, as ChatClara takes it
            store = as_memory_store(store)
            _check_store_matches(store, model, embedding, settings)
        self.store = store

    def __reduce__(self) -> tuple:
        """Unpickled (a process pool's worker, ``ray.put``) as a ``LeftBehind`` that refuses any
        use, as LlamaIndex's store is: its store and model stay in this process (the pickling
        failed on the store's lock, a bare TypeError)."""
        return LeftBehind, (type(self).__name__,)

    def __copy__(self) -> ClaraVectorStore:
        """Itself, as a deep copy is: it holds nothing but its store, which copies share (copied
        through ``__reduce__``, a retriever's copy held a ``LeftBehind``)."""
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ClaraVectorStore:
        return self

    @property
    def memory_store(self) -> BaseMemoryStore:
        """The core store (also ``store``): what ChatClara and ClaraRetriever read from."""
        return self.store

    @property
    def embeddings(self) -> Embeddings | None:
        """What computes this store's keys: ClaraEmbeddings for CLaRa's own."""
        keys = self.store.keys
        if isinstance(keys, EmbeddingsKeys):
            return keys.embeddings
        return ClaraEmbeddings(keys.model) if isinstance(keys, ClaraKeys) else None

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Compress and store the texts (an id already stored is replaced); one id per text is
        returned. A blank text has nothing to read: it is left out, with a warning (a document stored
        under its id before is kept)."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, got one str: wrap it in a list")
        # batch_size: LangChain's index() passes it; the store compresses in its own batches
        refuse_unknown("add_texts", kwargs, honoured=("batch_size",))  # metadata= stored nothing
        texts = list(texts)
        if texts:  # an empty list stands for none, as in LangChain's own stores
            ids, metadatas = ids or None, metadatas or None
        if isinstance(ids, (list, tuple)):  # None where LangChain lets the store name it; the store checks the rest
            ids = [uuid.uuid4().hex if doc_id is None else doc_id for doc_id in ids]
        if not texts and not ids and not metadatas:  # as LangChain's own stores do; the store checks the rest
            return []
        blank = {n for n, text in enumerate(texts) if isinstance(text, str) and not text.strip()}
        if not blank or any(given is not None and len(given) != len(texts) for given in (ids, metadatas)):
            return self.store.upsert(texts, ids, metadatas, show_progress=show_progress)
        # a loader's blank page (an image-only PDF page) has nothing to read: it is left out, as
        # LlamaIndex's store leaves out a blank node, and the others go in (it failed the whole batch)
        warn_bounded(f"{len(blank)} of {len(texts)} texts are blank and are not stored (first: texts[{min(blank)}]); "
                     "a document stored under one of their ids before is kept", stacklevel=2)
        kept = [n for n in range(len(texts)) if n not in blank]
        named = self.store.upsert([texts[n] for n in kept], None if ids is None else [ids[n] for n in kept],
                                  None if metadatas is None else [metadatas[n] for n in kept],
                                  show_progress=show_progress) if kept else []
        # one id per text, as the caller pairs them: a blank one's own, or a new one that names nothing stored
        returned = list(ids) if ids is not None else [uuid.uuid4().hex for _ in texts]
        for n, doc_id in zip(kept, named):
            returned[n] = doc_id
        return returned

    def delete(self, ids: list[str] | None = None, filter: dict | None = None, **kwargs: Any) -> bool:
        """Delete by id (unknown ids are ignored) or by metadata filter; with neither, delete
        everything. Another argument is refused: ignored, it deleted everything."""
        refuse_unknown("delete", kwargs)
        if ids is not None and filter is not None:
            raise InvalidInputError("delete takes ids or a filter, not both")
        if filter is not None:
            validate_filter(filter)
            if holds_no_condition(filter):  # built from an empty selection, it deleted every document
                raise InvalidInputError("a filter without a condition selects every document: call delete() to "
                                        "delete them all")
        if ids is None:
            self.store.delete_where(filter)
        else:
            self.store.delete(ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [to_document(d) for d in self.store.get(ids)]

    def similarity_search(
        self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to the query, best first."""
        refuse_unknown("similarity_search", kwargs, honoured=("fetch_k",))
        return [(to_document(d), score) for d, score in self.store.search(query, k, filter)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[Document]:
        refuse_unknown("similarity_search_by_vector", kwargs, honoured=("fetch_k",))
        return [to_document(d) for d, _ in self.store.search_by_key(embedding, k, filter)]

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
        filter: dict | None = None, **kwargs: Any,
    ) -> list[Document]:
        """k of the fetch_k most similar documents, chosen for similarity and diversity."""
        refuse_unknown("max_marginal_relevance_search", kwargs)
        results = self.store.search(query, k, filter, lambda_mult=lambda_mult, fetch_k=fetch_k)
        return [to_document(d) for d, _ in results]

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
        filter: dict | None = None, **kwargs: Any,
    ) -> list[Document]:
        refuse_unknown("max_marginal_relevance_search_by_vector", kwargs)
        results = self.store.search_by_key(embedding, k, filter, lambda_mult=lambda_mult, fetch_k=fetch_k)
        return [to_document(d) for d, _ in results]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return self.store.relevance

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Every score of the result ranked against one calibration of the store (LangChain's asks
        for one document's at a time, and a write between two sampled the calibration anew)."""
        results = self.similarity_search_with_score(query, k, **kwargs)
        relevances = self.store.relevances([score for _, score in results])
        return [(document, relevance) for (document, _), relevance in zip(results, relevances)]

    async def _asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        # the scores' calibration is sampled anew after a write (from disk, or a Milvus query)
        return await run_in_executor(None, self._similarity_search_with_relevance_scores, query, k, **kwargs)

    def save_local(self, folder: str | Path) -> None:
        """Persist without pickle (JSON, numpy shards, faiss index files)."""
        if not isinstance(self.store, MemoryStore):
            raise NotImplementedError(f"a {type(self.store).__name__} keeps its documents in its database: "
                                      "there is no folder to save")
        self.store.save(folder)

    @classmethod
    def load_local(
        cls, folder: str | Path, model: ClaraModel | Embeddings | None = None, embedding: Embeddings | None = None, *,
        allow_dangerous_deserialization: bool = False,
    ) -> ClaraVectorStore:
        """Open a saved store; it must be read with the model (and embedding) that wrote it.
        ``allow_dangerous_deserialization``, which FAISS's ``load_local`` asks for, is taken and
        changes nothing: no file of a store is unpickled."""
        store_folder.current_generation(Path(folder))  # no store there: refused before the shipped model loads
        model, keys = _model_and_keys(model, embedding)
        return cls(store=MemoryStore.load(folder, model, keys))

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | ClaraModel | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        model: ClaraModel | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> ClaraVectorStore:
        store = cls(model, embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids, show_progress=show_progress)
        return store

    @classmethod
    def from_documents(
        cls, documents: list[Document], embedding: Embeddings | None = None, **kwargs: Any
    ) -> ClaraVectorStore:
        """Like ``from_texts``: no embedding means CLaRa's own keys, no model the shipped one."""
        return super().from_documents(documents, embedding, **kwargs)

    @classmethod
    async def afrom_texts(
        cls, texts: list[str], embedding: Embeddings | None = None, metadatas: list[dict] | None = None,
        *, ids: list[str] | None = None, **kwargs: Any,
    ) -> ClaraVectorStore:
        """``from_texts`` off the event loop, with its defaults (LangChain's needs an embedding)."""
        return await super().afrom_texts(texts, embedding, metadatas, ids=ids, **kwargs)

    @classmethod
    async def afrom_documents(
        cls, documents: list[Document], embedding: Embeddings | None = None, **kwargs: Any
    ) -> ClaraVectorStore:
        """``from_documents`` off the event loop, with its defaults."""
        return await super().afrom_documents(documents, embedding, **kwargs)
