"""ClaraVectorStore: LangChain's VectorStore over a CLaRa MemoryStore."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoredDocument
from clara_plugins.dense import DenseRetriever


class EmbeddingsKeys:
    """Retrieval keys from any LangChain ``Embeddings`` instead of the query reasoner."""

    keys_are_memories = False

    def __init__(self, embeddings: Embeddings) -> None:
        self.embeddings = embeddings

    def signature(self) -> dict:
        return {"kind": "langchain-embeddings", "class": type(self.embeddings).__name__}

    def document_keys(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embeddings.embed_documents(texts), dtype=np.float32)

    def query_keys(self, queries: list[str]) -> np.ndarray:
        return np.asarray([self.embeddings.embed_query(q) for q in queries], dtype=np.float32)


def to_document(stored: StoredDocument) -> Document:
    return Document(page_content=stored.text, metadata=stored.metadata, id=stored.id)


class ClaraVectorStore(VectorStore):
    """Documents compressed into CLaRa memory tokens, searchable from LangChain.

    By default a query is encoded by CLaRa's query reasoner and compared with the documents'
    memory tokens; pass ``embedding`` to search with any LangChain ``Embeddings`` instead.
    ``filter`` takes the metadata filter language of ``clara_plugins.filters``.
    """

    def __init__(
        self,
        model: ClaraModel | None = None,
        embedding: Embeddings | None = None,
        *,
        store: MemoryStore | None = None,
        index: str = "flat",
        batch_size: int = 8,
    ) -> None:
        if store is None:
            if model is None:
                raise ValueError("ClaraVectorStore needs a ClaraModel (model=...) or a MemoryStore (store=...)")
            store = MemoryStore(model, EmbeddingsKeys(embedding) if embedding else None, index, batch_size)
        self.store = store
        self._embedding = embedding

    @property
    def embeddings(self) -> Embeddings | None:
        return self._embedding

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str | None] | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, got one str: wrap it in a list")
        texts = list(texts)
        if ids is not None:
            ids = [doc_id or uuid.uuid4().hex for doc_id in ids]
        return self.store.upsert(texts, ids, metadatas, show_progress=show_progress)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete by id (unknown ids are ignored); with no ids, delete everything."""
        self.store.delete(self.store.all_ids() if ids is None else ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [to_document(d) for d in self.store.get(ids)]

    def similarity_search(
        self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to the query, best first."""
        return [(to_document(d), score) for d, score in self.store.search(query, k, filter)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict | None = None, **kwargs: Any
    ) -> list[Document]:
        return [to_document(d) for d, _ in self.store.search_by_key(np.asarray(embedding), k, filter)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda cosine: (1.0 + cosine) / 2.0

    def save_local(self, folder: str | Path) -> None:
        """Persist without pickle (JSON, numpy shards, faiss index files)."""
        self.store.save(folder)

    @classmethod
    def load_local(
        cls, folder: str | Path, model: ClaraModel, embedding: Embeddings | None = None
    ) -> "ClaraVectorStore":
        keys = EmbeddingsKeys(embedding) if embedding else None
        return cls(embedding=embedding, store=MemoryStore.load(folder, model, keys))

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        model: ClaraModel | None = None,
        **kwargs: Any,
    ) -> "ClaraVectorStore":
        store = cls(model, embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


class DenseEmbeddings(Embeddings):
    """A sentence-transformers model as LangChain ``Embeddings`` (the text-RAG baseline's)."""

    def __init__(self, retriever: DenseRetriever | None = None) -> None:
        self.retriever = retriever or DenseRetriever()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.retriever.embed_documents(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.retriever.embed_queries([text])[0].tolist()
