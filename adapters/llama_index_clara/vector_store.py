"""ClaraVectorStore: LlamaIndex's vector store protocol over a CLaRa MemoryStore.

It stores text (nodes come back whole) and takes the query string rather than a query
embedding (``is_embedding_query=False``): the query reasoner encodes the question and is
compared with the documents' memory tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
from pydantic import PrivateAttr

from clara_plugins import ClaraModel, MemoryStore, StoredDocument

from .embedding import ClaraEmbedding

_OPERATORS = {FilterOperator.EQ: "$eq", FilterOperator.NE: "$ne", FilterOperator.IN: "$in",
              FilterOperator.NIN: "$nin"}


def translate_filters(filters: MetadataFilters | None) -> dict | None:
    """LlamaIndex MetadataFilters -> the store's filter dictionary (==, !=, in, nin; and, or)."""
    if filters is None or not filters.filters:
        return None
    parts = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            parts.append(translate_filters(item))
        elif isinstance(item, MetadataFilter) and item.operator in _OPERATORS:
            parts.append({item.key: {_OPERATORS[item.operator]: item.value}})
        else:
            raise NotImplementedError(f"filter operator {item.operator!r} is not supported; "
                                      f"use one of {[op.value for op in _OPERATORS]}")
    if filters.condition not in (FilterCondition.AND, FilterCondition.OR, None):
        raise NotImplementedError(f"filter condition {filters.condition!r} is not supported; use and/or")
    return {"$or" if filters.condition == FilterCondition.OR else "$and": parts}


class ClaraVectorStore(BasePydanticVectorStore):
    """Nodes compressed into CLaRa memory tokens, retrieved by CLaRa's query reasoner.

    Pass ``embed_model=store.embed_model`` to ``VectorStoreIndex``: it compresses each node
    once, and the store keeps those memory tokens instead of compressing again.
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False

    _store: MemoryStore = PrivateAttr()
    _embed_model: ClaraEmbedding = PrivateAttr()

    def __init__(self, model: ClaraModel | None = None, *, store: MemoryStore | None = None,
                 index: str = "flat", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if store is None:
            if model is None:
                raise ValueError("ClaraVectorStore needs a ClaraModel (model=...) or a MemoryStore (store=...)")
            store = MemoryStore(model, index=index)
        self._store = store
        self._embed_model = ClaraEmbedding(clara=store.model)

    @classmethod
    def class_name(cls) -> str:
        return "ClaraVectorStore"

    @property
    def client(self) -> MemoryStore:
        return self._store

    @property
    def embed_model(self) -> ClaraEmbedding:
        """An embedding model that hands its compressed nodes to this store."""
        return self._embed_model

    def add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        if not nodes:
            return []
        contents = [node.get_content(metadata_mode=MetadataMode.EMBED) for node in nodes]
        memories = self._embed_model.take_memories(contents)
        return self._store.upsert(
            [node.get_content(metadata_mode=MetadataMode.NONE) for node in nodes],
            ids=[node.node_id for node in nodes],
            metadatas=[node_to_metadata_dict(node, remove_text=True, flat_metadata=False) for node in nodes],
            memories=memories,
        )

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of a source document."""
        self._store.delete(self._store.ids_where({"ref_doc_id": ref_doc_id}))

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        self._store.delete(self._select(node_ids, filters))

    def get_nodes(self, node_ids: list[str] | None = None,
                  filters: MetadataFilters | None = None) -> list[BaseNode]:
        return [self._to_node(d) for d in self._store.get(self._select(node_ids, filters))]

    def clear(self) -> None:
        self._store.delete(self._store.all_ids())

    def _select(self, node_ids: list[str] | None, filters: MetadataFilters | None) -> list[str]:
        where = translate_filters(filters)
        ids = self._store.all_ids() if node_ids is None else list(node_ids)
        if where is None:
            return ids
        allowed = set(self._store.ids_where(where))
        return [i for i in ids if i in allowed]

    @staticmethod
    def _to_node(stored: StoredDocument) -> BaseNode:
        node = metadata_dict_to_node(stored.metadata, text=stored.text)
        node.embedding = None
        return node

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if not query.query_str:
            raise ValueError("ClaraVectorStore searches with the query text (query_str), not an embedding")
        where = translate_filters(query.filters)
        if query.node_ids:  # rank everything that passes the filter, keep the wanted nodes
            wanted = set(query.node_ids)
            hits = self._store.search(query.query_str, max(1, len(self._store)), where)
            results = [(d, s) for d, s in hits if d.id in wanted][: query.similarity_top_k]
        else:
            results = self._store.search(query.query_str, query.similarity_top_k, where)
        return VectorStoreQueryResult(
            nodes=[self._to_node(d) for d, _ in results],
            similarities=[score for _, score in results],
            ids=[d.id for d, _ in results],
        )

    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Save the store into the folder ``persist_path`` (JSON, numpy, faiss files)."""
        self._store.save(persist_path)

    @classmethod
    def from_persist_path(cls, persist_path: str | Path, model: ClaraModel) -> "ClaraVectorStore":
        return cls(store=MemoryStore.load(persist_path, model))
