"""ClaraRetriever: the query reasoner's top-k as a LlamaIndex retriever."""

from __future__ import annotations

import asyncio

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters, VectorStoreQuery

from clara_plugins.base_store import as_memory_store
from clara_plugins.checks import check_positive_int

from .vector_store import ClaraVectorStore


class ClaraRetriever(BaseRetriever):
    """Nodes whose memory tokens best match the question, with their cosine scores.

    ``vector_store`` is a ClaraVectorStore, a memory store (the one behind a ClaraVectorStore,
    its ``client``, or a MilvusMemoryStore), or LangChain's ClaraVectorStore; any but the first
    is wrapped in a ClaraVectorStore, which sets LlamaIndex's ``Settings`` as one built by hand
    does (see ClaraVectorStore). ``similarity_top_k`` defaults to the model's
    ``generation_top_k`` as it is at each query: the documents the generator reads.
    """

    def __init__(self, vector_store: object, similarity_top_k: int | None = None,
                 filters: MetadataFilters | None = None) -> None:
        super().__init__()
        if not isinstance(vector_store, ClaraVectorStore):
            vector_store = ClaraVectorStore(store=as_memory_store(vector_store))
        self.vector_store = vector_store
        self._top_k: int | None = None
        if similarity_top_k is not None:
            self.similarity_top_k = similarity_top_k
        self.filters = filters

    @property
    def similarity_top_k(self) -> int:
        """The nodes a query returns: the one given, else the model's ``generation_top_k`` now (read
        once at construction, it kept the old k after the model's changed, which the LLM reads)."""
        return self._top_k or self.vector_store.client.model.config.generation_top_k

    @similarity_top_k.setter
    def similarity_top_k(self, value: int) -> None:
        check_positive_int("similarity_top_k", value)
        self._top_k = value

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = VectorStoreQuery(query_str=query_bundle.query_str, similarity_top_k=self.similarity_top_k,
                                 filters=self.filters)
        result = self.vector_store.query(query)
        return [NodeWithScore(node=node, score=score) for node, score in zip(result.nodes, result.similarities)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)  # the event loop goes on meanwhile
