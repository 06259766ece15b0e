"""CLaRa: documents compressed into continuous memory tokens, retrieved and answered from by one LM.

The names below load on first use, so that ``clara --help`` and the configs need no torch
(and MilvusMemoryStore, from the ``[milvus]`` extra, loads pymilvus only when used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "CheckpointError": ".errors",
    "ClaraConfig": ".config",
    "ClaraModel": ".model",
    "CompressedDocuments": ".model",
    "InvalidInputError": ".errors",
    "MemoryStore": ".store",
    "MilvusMemoryStore": ".milvus_store",
    "StoreError": ".errors",
    "StoredDocument": ".base_store",
    "TrainConfig": ".config",
    "cosine_scores": ".retrieval",
    "straight_through_topk": ".retrieval",
    "top_k": ".retrieval",
}

# MilvusMemoryStore loads by name alone: a star import without the [milvus] extra failed on it
__all__ = [
    "CheckpointError", "ClaraConfig", "ClaraModel", "CompressedDocuments", "InvalidInputError", "MemoryStore",
    "StoreError", "StoredDocument", "TrainConfig", "cosine_scores", "straight_through_topk", "top_k",
]

if TYPE_CHECKING:
    from .config import ClaraConfig, TrainConfig
    from .errors import CheckpointError, InvalidInputError, StoreError
    from .model import ClaraModel, CompressedDocuments
    from .retrieval import cosine_scores, straight_through_topk, top_k
    from .milvus_store import MilvusMemoryStore as MilvusMemoryStore  # exported, though not in __all__
    from .base_store import StoredDocument
    from .store import MemoryStore


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'clara_plugins' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
