"""Measuring helpers shared by the benchmarks: bytes on disk, latency percentiles, peak memory."""

from __future__ import annotations

import resource
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


def peak_rss_mb() -> int:
    """This process's peak resident memory in MiB.

    Linux's ``VmHWM`` starts afresh when a process execs; ``ru_maxrss`` does not, so a spawned
    child would report at least the RSS its parent had when it forked. Elsewhere ``ru_maxrss``
    (KiB on Linux, bytes on macOS; only Linux has the file) is the measure there is."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
