"""ClaraRetriever: the query reasoner's top-k over a MemoryStore, as a LangChain retriever."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, field_validator

from clara_plugins.adapter_fields import PositiveCount
from clara_plugins.base_store import StoreLike, as_memory_store

from .vectorstores import refuse_unknown, to_document


class ClaraRetriever(BaseRetriever):
    """Retrieve documents whose memory tokens best match the question.

    ``store`` is a ClaraVectorStore or the memory store behind one. Each Document keeps its
    store id, so ``ChatClara`` can answer from the stored memory tokens without compressing
    the text again. The cosine score is in ``metadata["score"]`` of a copy; the stored
    metadata is not changed.
    """

    # a misspelt field is refused, not dropped (search_kwargs={"k": 1} returned generation_top_k documents)
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    store: StoreLike  # the core store, once validated
    k: PositiveCount = None  # documents returned (default: generation_top_k, what ChatClara reads)
    filter: dict | None = None

    @field_validator("store", mode="before")
    @classmethod
    def _core_store(cls, store: Any) -> Any:
        return as_memory_store(store)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None,
        filter: dict | None = None, **kwargs: Any,
    ) -> list[Document]:
        refuse_unknown("ClaraRetriever", kwargs)
        if k is None:
            k = self.k if self.k is not None else self.store.model.config.generation_top_k
        results = self.store.search(query, k, filter if filter is not None else self.filter)  # which refuses k < 1
        documents = []
        for stored, score in results:
            document = to_document(stored)
            document.metadata = {**document.metadata, "score": score}
            documents.append(document)
        return documents

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None,
        filter: dict | None = None, **kwargs: Any,
    ) -> list[Document]:
        """The search in a worker thread, with the call's ``k`` and ``filter`` (LangChain's
        default passes neither)."""
        return await run_in_executor(None, self._get_relevant_documents, query, run_manager=run_manager.get_sync(),
                                     k=k, filter=filter, **kwargs)
