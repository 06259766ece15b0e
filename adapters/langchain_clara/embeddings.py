"""CLaRa's retrieval keys as LangChain ``Embeddings``, and any ``Embeddings`` as a store's keys."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

from clara_plugins import ClaraModel
from clara_plugins.keys import ClaraKeys, normalize_rows
from clara_plugins.pretrained import load_model


class ClaraEmbeddings(Embeddings):
    """The keys ClaraVectorStore searches, for any LangChain vector store to hold.

    A document's vector is the retrieval key of its memory tokens (rounded to fp16, as a
    MemoryStore keeps them), a query's that of the query reasoner's memory of it; both have
    unit norm, so a store ranking by cosine or inner product (``InMemoryVectorStore``, faiss,
    ...) ranks as a ClaraVectorStore with the default flat float16 index does. A vector holds ``hidden`` values with the mean key
    (576 for the default model) and n_mem x hidden with the flattened one. Without a model the
    shipped default one is loaded.
    """

    def __init__(self, model: ClaraModel | None = None) -> None:
        self.model = model if model is not None else load_model()
        self._keys = ClaraKeys(self.model)

    def __deepcopy__(self, memo: dict[int, Any]) -> ClaraEmbeddings:
        """Itself: it keeps no state but its model's, which a deep copy of what holds it (a
        retriever's ``model_copy(deep=True)``) duplicated."""
        return self

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not isinstance(texts, (str, bytes, list, tuple)) and isinstance(texts, Iterable):
            texts = list(texts)  # a generator's or a Series' texts; a lone string is refused by the check
        return self._keys.document_keys(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return normalize_rows(self._keys.query_keys([text]))[0].tolist()


class EmbeddingsKeys:
    """Retrieval keys from any LangChain ``Embeddings`` instead of the query reasoner."""

    keys_are_memories = False

    def __init__(self, embeddings: Embeddings) -> None:
        self.embeddings = embeddings

    def signature(self) -> dict:
        """The embedding's class and, where it names one, its model (by its last path part, so
        that a local copy opens from any folder): two sentence-transformers of one class and
        width would otherwise open each other's stores."""
        model = next((value for name in ("model_name", "model", "model_id")
                      if isinstance(value := getattr(self.embeddings, name, None), str)), None)
        return {"kind": "langchain-embeddings", "class": type(self.embeddings).__name__,
                **({"model": PurePath(model).name} if model else {})}

    def document_keys(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embeddings.embed_documents(texts), dtype=np.float32)

    def query_keys(self, queries: list[str]) -> np.ndarray:
        return np.asarray([self.embeddings.embed_query(q) for q in queries], dtype=np.float32)
