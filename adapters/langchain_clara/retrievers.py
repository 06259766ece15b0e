"""ClaraRetriever: the query reasoner's top-k over a MemoryStore, as a LangChain retriever."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from clara_plugins import MemoryStore

from .vectorstores import to_document


class ClaraRetriever(BaseRetriever):
    """Retrieve documents whose memory tokens best match the question.

    Each Document keeps its store id, so ``ChatClara`` can answer from the stored memory
    tokens without compressing the text again. The cosine score is in ``metadata["score"]``
    of a copy; the stored metadata is not changed.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: MemoryStore
    k: int = 4
    filter: dict | None = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None,
        filter: dict | None = None, **kwargs: Any,
    ) -> list[Document]:
        results = self.store.search(query, k or self.k, filter if filter is not None else self.filter)
        documents = []
        for stored, score in results:
            document = to_document(stored)
            document.metadata = {**document.metadata, "score": score}
            documents.append(document)
        return documents
