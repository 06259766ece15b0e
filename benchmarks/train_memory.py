"""A training stage's peak memory and speed for several splits of the same optimizer step,
side by side in one run. A split is ROWSxMICRO: ``32x1`` is one micro-batch of 32 rows, ``8x4``
four micro-batches of 8 rows, gradients accumulated. Each split trains in a child process of
this slim one (torch is not imported here), so each peak RSS (Linux ``ru_maxrss``) is its own.

    python -m clara_benchmarks.train_memory runs/default/rows/retrieval.jsonl --stage retrieval \\
        --init clara_plugins/checkpoints/smollm2-135m-instruct-cr16 --steps 8 --splits 32x1 8x4 16x2 \\
        --out docs/benchmarks/train_memory_retrieval.json

The JSON keeps every number and the machine; a Markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from clara_plugins.atomic import write_text_atomically
from clara_plugins.checks import check_output_path, positive_int
from clara_plugins.jsonfiles import read_jsonl

from .measure import environment, maxrss_bytes


def _split(text: str) -> tuple[int, int]:
    """``8x4`` -> (8 rows a micro-batch, 4 micro-batches)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"a split is ROWSxMICRO with two positive integers, like 8x4, got {text!r}")
    return int(parts[0]), int(parts[1])


def _measure(split: tuple[int, int], args: argparse.Namespace, folder: Path) -> dict:
    """Train ``args.steps`` steps with one split in a child process: its peak RSS and timings."""
    batch_size, grad_accum = split
    output = folder / f"{batch_size}x{grad_accum}"
    command = [sys.executable, "-m", "clara_plugins.cli", "train", "--stage", args.stage, "--data", args.data,
               "--output", str(output), "--init", args.init, "--steps", str(args.steps),
               "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--lr", str(args.lr),
               "--save-every", str(args.steps), "--device", "cpu"]
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        killed = " (killed by a signal: out of memory?)" if child.returncode < 0 else ""
        raise RuntimeError(f"{' '.join(command)} failed with status {child.returncode}{killed}")
    log = read_jsonl(output / "log.jsonl")
    return {"batch_size": batch_size, "grad_accum": grad_accum,
            "peak_rss_gib": round(maxrss_bytes(usage.ru_maxrss) / 2**30, 2),
            "train_seconds": log[-1]["seconds"], "seconds_per_step": round(log[-1]["seconds"] / len(log), 1),
            "last_step": {k: v for k, v in log[-1].items() if k not in ("seconds", "lr")}}


def _table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| rows a micro-batch × micro-batches | peak RSS, GiB | × first | s / step | × first | last step's loss |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['batch_size']} × {r['grad_accum']} | {r['peak_rss_gib']} | "
                     f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f} | {r['seconds_per_step']} | "
                     f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} | {r['last_step']['loss']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="the stage's JSONL rows")
    parser.add_argument("--stage", default="retrieval")
    parser.add_argument("--init", required=True, help="the checkpoint every split starts from")
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--splits", nargs="+", action="extend", type=_split,
                        help="ROWSxMICRO: rows a micro-batch x micro-batches a step, the same product for all "
                        "(default 32x1 8x4)")
    parser.add_argument("--out", required=True, help="JSON file; the table goes beside it as .md")
    args = parser.parse_args(argv)
    args.splits = args.splits or [(32, 1), (8, 4)]
    sizes = {rows * micro for rows, micro in args.splits}
    if len(set(args.splits)) < len(args.splits):  # one folder each: the second found the first's run finished
        parser.error("--splits: each split once")
    if len(sizes) != 1:
        parser.error(f"every split must make the same optimizer step, got {sorted(sizes)} rows")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.error(f"--out: no folder {out.parent}")
    if out.suffix != ".json":  # the table goes to the .md beside it: an --out of x.md lost the JSON, x.y wrote x.md
        parser.error(f"--out {out}: name a .json file (the table goes beside it as .md)")
    check_output_path(out.with_suffix(".md"), args.data)
    check_output_path(out, args.data)
    with tempfile.TemporaryDirectory(prefix="clara-train-memory-") as folder:
        results = [_measure(split, args, Path(folder)) for split in args.splits]
    summary = {"stage": args.stage, "data": args.data, "init": args.init, "steps": args.steps, "lr": args.lr,
               "results": results, "environment": environment()}
    write_text_atomically(out, json.dumps(summary, indent=2) + "\n")
    write_text_atomically(out.with_suffix(".md"), f"# `{args.stage}` stage: {args.steps} steps of {sizes.pop()} rows\n\n"
                          + _table(results))
    print(_table(results))


if __name__ == "__main__":
    main()
