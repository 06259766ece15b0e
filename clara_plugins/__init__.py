"""CLaRa: documents compressed into continuous memory tokens, retrieved and answered from by one LM."""

from .config import ClaraConfig
from .errors import CheckpointError, InvalidInputError, StoreError
from .model import ClaraModel, CompressedDocuments
from .retrieval import cosine_scores, straight_through_topk
from .store import MemoryStore, StoredDocument

__all__ = [
    "CheckpointError",
    "ClaraConfig",
    "ClaraModel",
    "CompressedDocuments",
    "InvalidInputError",
    "MemoryStore",
    "StoreError",
    "StoredDocument",
    "cosine_scores",
    "straight_through_topk",
]
