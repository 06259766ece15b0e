"""The trained checkpoints shipped inside the package (fp16 adapters, a few MB each).

``clara ask``, the examples and ``clara bench`` load them when no checkpoint is named and
the base model is the offline default.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def default_checkpoint(compression_rate: int = 16) -> Path | None:
    """The shipped checkpoint for SmolLM2-135M-Instruct at this rate, or None if there is none."""
    folder = CHECKPOINTS / f"smollm2-135m-instruct-cr{compression_rate}"
    return folder if (folder / "clara_config.json").exists() else None
