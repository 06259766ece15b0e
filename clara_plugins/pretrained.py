"""The trained checkpoint shipped inside the package (fp16 adapters, 28 MiB at CR16).

It belongs to the offline default backbone, SmolLM2-135M-Instruct; ``docs/model-card.md``
says how it was trained and what it scores. ``clara ask``, ``clara index``, ``clara eval``,
``clara bench`` and the examples load it when no checkpoint is named.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .config import DEFAULT_BASE_MODEL, ClaraConfig
from .model import ClaraModel

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def default_checkpoint(compression_rate: int = 16) -> Path | None:
    """The shipped checkpoint for the default backbone at this rate, or None when none ships."""
    folder = CHECKPOINTS / f"smollm2-135m-instruct-cr{compression_rate}"
    return folder if (folder / "clara_config.json").is_file() else None


def load_model(
    checkpoint: str | Path | None = None,
    *,
    base_model: str | os.PathLike[str] | None = None,
    compression_rate: int | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
) -> ClaraModel:
    """The named checkpoint; else the shipped one when the backbone is the default; else a
    fresh (untrained) model on ``base_model``. ``compression_rate`` reads a checkpoint at
    another rate than its own (``ClaraModel.from_pretrained``), or sets a fresh model's (16);
    ``dtype`` is as ``ClaraModel``'s ("auto": see ``backbone.resolve_dtype``)."""
    rate = ClaraConfig.compression_rate if compression_rate is None else compression_rate
    if checkpoint is None and base_model in (None, DEFAULT_BASE_MODEL):
        checkpoint = default_checkpoint(rate) or default_checkpoint()
    if checkpoint is not None:
        return ClaraModel.from_pretrained(checkpoint, base_model=base_model, compression_rate=compression_rate,
                                          device=device, dtype=dtype)
    config = ClaraConfig(base_model=base_model or DEFAULT_BASE_MODEL, compression_rate=rate)
    warnings.warn(f"no trained checkpoint for {config.base_model}: the adapters are untrained, so answers "
                  "from memory tokens mean nothing yet (train one with `clara train`)", stacklevel=2)
    return ClaraModel(config, device=device, dtype=dtype)
