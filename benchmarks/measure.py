"""Measuring helpers shared by the benchmarks: bytes on disk and latency percentiles."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the files under ``folder`` whose names match ``pattern``."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """p50 and p95 of timings in seconds, in milliseconds."""
    return {"p50": round(1000 * statistics.median(seconds), 1),
            "p95": round(1000 * float(np.percentile(seconds, 95)), 1)}
