"""Retrieval keys: what the store's faiss index searches, and how results are diversified.

CLaRa's own key is computed from the document's memory (its mean vector, or the memory
flattened: ``ClaraConfig.retrieval_key``), compared by cosine with the same key of the query
reasoner's memory of the question. Any other encoder of texts can supply keys instead, e.g. a
LangChain ``Embeddings``; the memories are still kept for generation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .checks import check_texts
from .errors import InvalidInputError
from .model import ClaraModel, compress_in_parts
from .retrieval import retrieval_keys


@runtime_checkable
class KeyEncoder(Protocol):
    """Turns documents and queries into vectors compared by cosine."""

    #: True when a document's key is computed from its memory, so the store need not keep both.
    keys_are_memories: bool

    def signature(self) -> dict:
        """What must match for stored keys to be comparable with new query keys."""

    def document_keys(self, texts: list[str]) -> np.ndarray:
        """[n_texts, dim] float32 keys (the store does not ask when keys_are_memories)."""

    def query_keys(self, queries: list[str]) -> np.ndarray:
        """[n_queries, dim] float32 keys."""


def check_clara_model(model: object) -> None:
    """Refuse what is not a ClaraModel by name, before a first use fails on a missing attribute
    (LangChain's convention passes an embedding, or a checkpoint path, where the model goes)."""
    if not isinstance(model, ClaraModel):
        hint = (": pass its model, or an embedding's keys as keys=" if hasattr(model, "embed_query") else
                ": load a checkpoint with clara_plugins.pretrained.load_model" if isinstance(model, str) else "")
        raise InvalidInputError(f"model must be a ClaraModel, got a {type(model).__name__}{hint}")


class ClaraKeys:
    """The paper's retrieval: the query reasoner's memories against document memories."""

    keys_are_memories = True

    def __init__(self, model: ClaraModel) -> None:
        check_clara_model(model)
        self.model = model
        self.kind = model.config.retrieval_key  # fixed here: a store's index and its query keys must agree

    @property
    def dimensions(self) -> int:
        """Values per key: hidden for the mean key, n_mem x hidden for flattened memories."""
        return self.blocks * self.model.hidden_size

    @property
    def blocks(self) -> int:
        """Memory vectors laid end to end in one key: n_mem for flattened memories, else 1."""
        return self.model.config.n_mem_tokens if self.kind == "flat" else 1

    def signature(self) -> dict:
        # flattened keys kept the signature stores were written with before the mean key existed
        return {"kind": "clara-memories"} if self.kind == "flat" else {"kind": "clara-memories", "key": self.kind}

    def document_keys(self, texts: list[str]) -> np.ndarray:
        """The keys a MemoryStore would hold for these texts (for vector stores of other
        libraries); a blank text (a reader's empty page) has nothing to compress, and gets
        ``blank_key``."""
        return self.keys_and_memories(texts)[0]

    def keys_and_memories(self, texts: list[str], batch_size: int = 8) -> tuple[np.ndarray, torch.Tensor]:
        """``document_keys``, and the float16 CPU memories [filled, n_mem, hidden] of the texts
        that are not blank, in their order (for a store that takes them later), compressed as a
        store's upsert compresses them."""
        texts = check_texts(texts, "texts", blanks=True)
        filled = [text for text in texts if text.strip()]
        # a bar past one batch: a framework store embeds a whole corpus in one call
        memories = compress_in_parts(self.model, filled, batch_size, show_progress=len(filled) > batch_size,
                                     stacklevel=4)
        keys = np.tile(self.blank_key, (len(texts), 1))
        if filled:
            keys[[i for i, text in enumerate(texts) if text.strip()]] = self.memory_keys(memories)
        return keys, torch.from_numpy(memories)

    @property
    def blank_key(self) -> np.ndarray:
        """A blank text's key: the first unit vector (a zero one would make cosine stores divide by zero)."""
        key = np.zeros(self.dimensions, dtype=np.float32)
        key[0] = 1.0
        return key

    def memory_keys(self, memories: np.ndarray) -> np.ndarray:
        """The keys [n, dim] of memories [n, n_mem, hidden], as the store searches them."""
        return memory_keys(memories, self.kind)

    def query_keys(self, queries: list[str]) -> np.ndarray:
        return retrieval_keys(self.model.encode_queries(queries), self.kind).cpu().numpy()


def memory_keys(memories: np.ndarray, kind: str) -> np.ndarray:
    """Unit-norm float32 keys [n, dim] of memories [n, n_mem, hidden] (``retrieval_keys`` in numpy)."""
    return retrieval_keys(torch.from_numpy(np.ascontiguousarray(memories)), kind).numpy()


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows (zero rows stay zero), so inner product is cosine. The norms are
    summed in float64: in float32 a row past 1e19 overflowed to zero and one below 1e-19 kept its
    tiny length."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))[:, None]
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def row_dots(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Each row's dot product with a vector (a cosine, for unit-norm ones), by einsum: a matrix
    product's blocking rounds a row by its place, so copies of one key scored a last bit apart,
    and ties came out of stored order."""
    return np.einsum("ij,j->i", rows, vector)


def maximal_marginal_relevance(query: np.ndarray, keys: np.ndarray, k: int, lambda_mult: float) -> list[int]:
    """Indices of k rows of ``keys``, picked one at a time for relevance and diversity.

    The first is the row most similar to the query; each next one maximises
    ``lambda_mult * cosine(row, query) - (1 - lambda_mult) * max cosine(row, rows picked)``,
    so 1 ranks by similarity alone and 0 by diversity alone. Rows and query are unit-norm.
    """
    # as the store scores (with a matrix product, of three copies of one document the last came first)
    relevance = row_dots(keys, query)
    picked = [int(np.argmax(relevance))]
    closest = row_dots(keys, keys[picked[0]])  # each row's highest cosine to a picked row
    while len(picked) < min(k, len(keys)):
        score = lambda_mult * relevance - (1.0 - lambda_mult) * closest
        score[picked] = -np.inf
        picked.append(int(np.argmax(score)))
        closest = np.maximum(closest, row_dots(keys, keys[picked[-1]]))
    return picked
