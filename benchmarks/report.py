"""Writing one benchmark run: JSON (everything), a Markdown table, and two PNG plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from clara_plugins.atomic import write_file_atomically  # noqa: E402

STAGES = ("index", "retrieve", "generate")


def _cell(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _f1_cell(row: dict) -> str:
    """F1 with its 95 % bootstrap interval over the questions: a sample of a few hundred
    questions moves F1 by several points, and the table should say so."""
    low, high = row["f1_interval"]
    return f"{row['f1']:.1f} ({low:.1f}–{high:.1f})"


def _not_held_out(trained_on: str) -> str:
    """The table's caveat: only the rows whose encoder or reader trained on the questions."""
    rows = "its end-to-end rows are" if trained_on == "query reasoner" else "its rows are"
    return f"; the shipped checkpoint's {trained_on} trained on these questions, so {rows} not held out"


def _run_settings(report: dict) -> str:
    """The base model, answer length, torch threads and dense model a run used (older reports
    lack some), so that a table read alone says what it measured."""
    bench, systems = report["benchmark"], report["systems"]
    bases = {r["base_model"] for r in systems if "base_model" in r}
    dense = "dense_model" in bench and any(r["retriever"] == "dense" for r in systems)
    parts = [f"base model {bases.pop()}" if len(bases) == 1 else "",
             f"answers of up to {bench['max_new_tokens']} tokens" if "max_new_tokens" in bench else "",
             f"{bench['threads']} torch threads" if "threads" in bench else "",
             f"dense model {bench['dense_model']}" if dense else "",
             f"query instruction {bench['query_instruction']!r}" if dense and bench.get("query_instruction") else "",
             f"passage instruction {bench['passage_instruction']!r}" if dense and bench.get("passage_instruction")
             else ""]
    return "".join(f"{part}; " for part in parts if part)


def _checkpoint_cell(path: str) -> str:
    """A checkpoint's folder name, with its run's where it is clara train's ``checkpoint`` (two
    runs' read alike)."""
    folder = Path(path)
    return f"{folder.parent.name}/{folder.name}" if folder.name == "checkpoint" and folder.parent.name else folder.name


def markdown_table(report: dict) -> str:
    """The results table of one run, with the sample it was measured on."""
    bench = report["benchmark"]
    lines = [
        f"**{bench['dataset']}** ({bench['setting']}, {bench['sample']} questions, seed {bench['seed']}, "
        f"pools of {bench['pool_size']} passages, k={bench['k']}, {bench['mode']} mode; "
        f"{_run_settings(report)}commit {report['commit']}, {report['machine']['cpus']} CPUs)"
        + (f"; recall over the {bench['recall_questions']} questions " + (
            "with a supporting passage (one their pool lacks counts as not found)"
            # reports written before the thirty-eighth session divided by the gold passages a pool held
            if bench.get("recall_counts_missing_gold") else "whose pool holds a gold passage")
           if "recall_questions" in bench else "")
        + ("" if bench.get("held_out") is not False else _not_held_out(bench.get("trained_on", "query reasoner"))),
        "",
        "| system | framework | checkpoint | EM | F1 (95 % interval) | cover-EM | R@1 | R@3 | R@5 | context positions "
        "| index p50 ms | retrieve p50 ms | first token p50 ms | generate p50 / p95 ms "
        "| question to first token / answer p50 ms | answer tokens | docs/s | index bytes/doc | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reused = set(bench.get("reused_systems", ()))
    for r in report["systems"]:
        latency = r["latency_ms"]
        checkpoint = _checkpoint_cell(r["checkpoint"]) if r["checkpoint"] else (
            "untrained" if r["retriever"] == "clara" else "plain backbone")
        lines.append(
            f"| {r['name']}{' (kept from an earlier run)' if r['name'] in reused else ''} | {r['framework']} | {checkpoint} | {_cell(r['em'])} | {_f1_cell(r)} "
            f"| {_cell(r['cover_em'])} | {_cell(r['recall@1'])} | {_cell(r['recall@3'])} | {_cell(r['recall@5'])} "
            f"| {_cell(r['context_positions'], 0)} | {_cell(latency['index']['p50'], 0)} "
            f"| {_cell(latency['retrieve']['p50'], 0)} | {_cell(latency['first_token']['p50'], 0)} "
            f"| {_cell(latency['generate']['p50'], 0)} / {_cell(latency['generate']['p95'], 0)} "
            f"| {_cell(latency['question_to_first_token']['p50'], 0)} / {_cell(latency['question_to_answer']['p50'], 0)} "
            f"| {_cell(r['output_tokens'])} "
            f"| {_cell(r['docs_per_second'])} | {_cell(r['index_bytes_per_doc'])} | {_cell(r['peak_rss_mb'])} |")
    if report["headline"]:
        lines += ["", "Side by side: " + ", ".join(f"{k} = {v}" for k, v in report["headline"].items())
                  # a rerun keeps the systems an earlier run finished: their timings are that run's
                  + (f" (timings of {', '.join(sorted(reused))} from an earlier run of the same commit and "
                     "machine: a ratio with one of them pairs two runs)" if reused else "")]
    return "\n".join(lines) + "\n"


def png_bytes(figure: plt.Figure) -> bytes:
    """The figure as PNG bytes, written atomically by its caller (a kill left a cut-short plot)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _quality_plot(report: dict) -> bytes:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in report["systems"]:
        axis.scatter(r["context_positions"], r["f1"], s=40)
        axis.annotate(r["name"], (r["context_positions"], r["f1"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("context positions fed to the generator (log)")
    axis.set_ylabel("F1")
    axis.set_title(f"{report['benchmark']['dataset']}: quality vs. context length")
    return png_bytes(figure)


def _latency_plot(report: dict) -> bytes:
    systems = report["systems"]
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(systems) + 1.5))
    left = [0.0] * len(systems)
    names = [r["name"] for r in systems]
    for stage in STAGES:
        widths = [r["latency_ms"][stage]["p50"] for r in systems]
        axis.barh(names, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    axis.invert_yaxis()
    axis.set_xlabel("each stage's p50 latency, ms, stacked (index = offline work)")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(f"{report['benchmark']['dataset']}: latency per stage")
    return png_bytes(figure)


def write_report(report: dict, folder: Path, stem: str) -> list[Path]:
    """``stem``.json, .md, _quality.png and _latency.png in ``folder``; returns the paths.

    Every file is made in memory before any is written, and each replaces its old copy
    atomically: a report that fails to render leaves the last one as it was, and a killed run
    leaves each file whole, old or new."""
    contents = {f"{stem}.json": (json.dumps(report, indent=2) + "\n").encode(),
                f"{stem}.md": markdown_table(report).encode(),
                f"{stem}_quality.png": _quality_plot(report),
                f"{stem}_latency.png": _latency_plot(report)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        write_file_atomically(folder / name, lambda handle, data=data: handle.write(data), binary=True)
    return [folder / name for name in contents]
