"""Retrieval keys: what the store's faiss index searches.

CLaRa's own key is the document's flattened memory (cosine against the query reasoner's
flattened memory of the question). Any other encoder of texts can supply keys instead,
e.g. a LangChain ``Embeddings``; the memories are still kept for generation.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .model import ClaraModel


class KeyEncoder(Protocol):
    """Turns documents and queries into vectors compared by cosine."""

    #: True when a document's key is its flattened memory, so the store need not keep both.
    keys_are_memories: bool

    def signature(self) -> dict:
        """What must match for stored keys to be comparable with new query keys."""

    def document_keys(self, texts: list[str]) -> np.ndarray:
        """[n_texts, dim] float32 keys (unused when keys_are_memories)."""

    def query_keys(self, queries: list[str]) -> np.ndarray:
        """[n_queries, dim] float32 keys."""


class ClaraKeys:
    """The paper's retrieval: query-reasoner memories against document memories."""

    keys_are_memories = True

    def __init__(self, model: ClaraModel) -> None:
        self.model = model

    def signature(self) -> dict:
        return {"kind": "clara-memories"}

    def document_keys(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError("CLaRa keys are the stored memories themselves")

    def query_keys(self, queries: list[str]) -> np.ndarray:
        return self.model.encode_queries(queries).flatten(1).float().cpu().numpy()


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows (zero rows stay zero), so inner product is cosine."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
