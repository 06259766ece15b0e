"""``clara bench``: CLaRa against text RAG on the official QA sets, side by side in one run.

For every dataset, a seeded sample of questions is answered by every system (see
``systems.default_systems``), one system per process. Each question brings its own pool:
*Normal* gives ~20 candidates (the example's paragraphs, topped up with BM25-ranked passages
of other examples) from which each system retrieves its top-k; *Oracle* gives the 5
passages with the gold ones among them. Results go to ``--out`` as JSON (with machine,
versions, commit and seed), a Markdown table and two PNG plots.

    clara bench --quick                     # HotpotQA, 8 questions: minutes on 2 CPU cores
    clara bench --datasets hotpotqa nq --sample 100 --clara 16=PATH --text-ft PATH
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from clara_plugins.checkpoint import CONFIG_FILE, files_sha256, read_config, weight_files
from clara_plugins.checks import check_writable, non_negative_int, positive_int
from clara_plugins.config import DEFAULT_BASE_MODEL, MAX_COMPRESSION_RATE, SETTINGS, ClaraConfig
from clara_plugins.corpora import read_examples
from clara_plugins.errors import InvalidInputError
from clara_plugins.jsonfiles import read_json, write_json
from clara_plugins.metrics import paired_difference, token_f1
from clara_plugins.rows import e2e_rows, gold_count, instruct_rows
from clara_plugins.pretrained import default_checkpoint

from .dense import DEFAULT_DENSE_MODEL, dense_model_path, local_model_folder
from .measure import environment

if TYPE_CHECKING:  # the frameworks load when a run starts, not when `clara` builds its parser
    from .systems import RunOptions, SystemSpec

# name -> (file under the data folder, examples eligible for sampling: None = all). The
# shipped recipe (benchmarks/train_default.sh) holds out HotpotQA dev 0-199 and NQ dev 0-299,
# and trains on the rest of them (NQ has no train split here; the retrieval stage reads the
# other dev questions), so the benchmark samples only those.
DATASETS = {
    "hotpotqa": ("hotpotqa/dev.json", 200),
    "2wiki": ("2wikimultihopqa/dev.json", None),
    "musique": ("musique/dev.jsonl", None),
    "nq": ("nq/dev.jsonl", 300),
}
# What of the shipped checkpoint trained on a file's questions, so that the report says its rows
# are not held out: the retrieval stage read these dev sets whole, and every stage the train splits.
TRAINED_ON = {"2wiki": "query reasoner", "musique": "query reasoner",
              "hotpotqa/train.json": "generator and query reasoner",
              "2wikimultihopqa/train.json": "generator and query reasoner",
              "musique/train.jsonl": "generator and query reasoner"}
MODES = {"quick": (8, ["hotpotqa"]), "full": (200, ["hotpotqa", "nq"])}  # (sample, datasets)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"small run: {MODES['quick'][0]} questions of {', '.join(MODES['quick'][1])}")
    parser.add_argument("--datasets", nargs="+", action="extend", metavar="NAME_OR_FILE",
                        help=f"{', '.join(DATASETS)} or a file in one of their formats "
                             f"(default: {' '.join(MODES['full'][1])}; quick: {' '.join(MODES['quick'][1])})")
    parser.add_argument("--data-dir", default=os.environ.get("CLARA_DATA", "../shared/data"),
                        help="folder holding the official files (default $CLARA_DATA or ../shared/data)")
    parser.add_argument("--setting", choices=SETTINGS, default="normal",
                        help="normal: retrieve top-k of ~20 candidates; oracle: the gold among the k")
    parser.add_argument("--sample", type=positive_int, help="questions per dataset (default: 200; quick: 8)")
    parser.add_argument("--seed", type=non_negative_int, default=0,  # -1 would draw 1's sample (abs() seeds)
                        help="sampling and pool seed (default 0)")
    parser.add_argument("--candidates", type=positive_int, help="pool size in the normal setting (default 20)")
    parser.add_argument("--clara", nargs="+", action="extend", default=[], metavar="CR=DIR",
                        help="CLaRa checkpoint per compression rate, read at that rate (default: the shipped "
                        "one, read at 4, 16 and 32); another rate adds its compressor row")
    parser.add_argument("--clara-e2e", nargs="+", action="extend", default=[], metavar="CR=DIR",
                        help="end-to-end checkpoint per compression rate, its query reasoner retrieves "
                        "(default: the shipped one at 4, 16 and 32 when --clara names none for the rate); "
                        "another rate adds its end-to-end row")
    parser.add_argument("--text-ft", metavar="DIR", help="checkpoint of `clara train --stage text`")
    parser.add_argument("--systems", nargs="*", action="extend", metavar="NAME", help="run only these system names")
    parser.add_argument("--base-model", help="backbone of the systems without a checkpoint (default: the one the "
                        f"checkpoints name, else {DEFAULT_BASE_MODEL}); checkpoints on another are refused")
    parser.add_argument("--dense-model", default=DEFAULT_DENSE_MODEL, help="sentence-transformers path")
    parser.add_argument("--query-instruction", default="", help="dense query prefix (BGE's instruction, E5's 'query: ')")
    parser.add_argument("--passage-instruction", default="", help="dense passage prefix (E5's 'passage: ')")
    parser.add_argument("-k", type=positive_int, default=5, help="documents read per question (default 5)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length (default 32)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads per system (default: all)")
    parser.add_argument("--out", default="docs/benchmarks", help="output folder (default docs/benchmarks)")


def _rates(pairs: list[str], option: str) -> dict[int, str]:
    rates = {}
    for pair in pairs:
        rate, _, folder = pair.partition("=")
        if not rate.isdigit() or not folder:
            raise InvalidInputError(f"{option} takes CR=DIR pairs, got {pair!r}")
        if not 1 <= int(rate) <= MAX_COMPRESSION_RATE:  # refused here, not after the systems before it have run
            raise InvalidInputError(f"{option}: a compression rate is in 1..{MAX_COMPRESSION_RATE}, got {pair!r}")
        if int(rate) in rates:  # the last would be scored alone
            raise InvalidInputError(f"{option} names compression rate {int(rate)} twice ({rates[int(rate)]} and "
                                    f"{folder}): one checkpoint per rate")
        rates[int(rate)] = folder
    return rates


def benchmark_rows(source: str, data_dir: str, setting: str, sample: int, seed: int, k: int,
                   candidates: int) -> tuple[list[dict], dict]:
    """A seeded sample of rows {question, docs, answers, pos_index}, and how it was drawn."""
    path, name = _data_file(source, data_dir)
    examples = read_examples(path, limit=DATASETS[name][1] if name else None)
    rows = instruct_rows(examples, "oracle", k) if setting == "oracle" else e2e_rows(examples, candidates, seed)
    if not rows:
        raise InvalidInputError(f"{path} gives no {setting} rows (the warning above says why)")
    chosen = random.Random(seed).sample(rows, min(sample, len(rows)))
    trained_on = TRAINED_ON.get(name) if name else _training_file(path)
    return chosen, {"file": str(path), "examples_eligible": len(examples), "rows_eligible": len(rows),
                    "held_out": None if name is None and trained_on is None else trained_on is None,
                    **({"trained_on": trained_on} if trained_on else {}), "sample": len(chosen),
                    "recall_questions": sum(bool(gold_count(r)) for r in chosen), "recall_counts_missing_gold": True,
                    "setting": setting, "seed": seed,
                    "pool_size": round(sum(len(r["docs"]) for r in chosen) / len(chosen), 1)}


def _data_file(source: str, data_dir: str) -> tuple[Path, str | None]:
    """A dataset name's file under ``data_dir``, or a file path as given; and the dataset it is
    (None for another file), so that a path to an official file is sampled as its name is."""
    path = Path(data_dir) / DATASETS[source][0] if source in DATASETS else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no data file {path}: pass --data-dir or a file path")
    return path, dataset_name(source)


def _training_file(path: Path) -> str | None:
    """What of the shipped checkpoint trained on an official train split's questions, or None."""
    return _official_file(path, [(file, trained) for file, trained in TRAINED_ON.items() if "/" in file])


def dataset_name(source: str) -> str | None:
    """The dataset a --datasets entry names, by name or by its official file's path."""
    if source in DATASETS:
        return source
    return _official_file(Path(source), [(file, name) for name, (file, _) in DATASETS.items()])


def _official_file(path: Path, files: list[tuple[str, str]]) -> str | None:
    """The value beside the first official file (a path under the data folder) ``path`` is."""
    posix = "/" + Path(os.path.abspath(path)).as_posix()  # a relative path from inside the data folder too
    return next((value for file, value in files if posix.endswith("/" + file)), None)


def headline(results: list[dict]) -> dict:
    """Side-by-side measures for the best available CLaRa CR16 row: its F1 paired question by
    question against dense text RAG and fine-tuned text RAG (each with its 95 % interval),
    text-over-CLaRa latency from the question, and Recall@5 against the dense retriever."""
    by_name = {r["name"]: r for r in results}
    clara = by_name.get("CLaRa CR16 end-to-end") or by_name.get("CLaRa CR16 compressor")
    text, tuned = by_name.get("dense + text"), by_name.get("dense + fine-tuned text")
    if clara is None:
        return {}
    summary = {"clara_system": clara["name"]}
    for label, other in (("text", text), ("finetuned_text", tuned)):
        if other:  # per question on the same rows: sharper than the two systems' own intervals
            difference, interval = paired_difference(_question_f1(clara), _question_f1(other))
            summary[f"f1_clara_minus_{label}"] = difference
            summary[f"f1_clara_minus_{label}_interval"] = interval
    if text:  # from the question: its retrieval, then reading the context (and the answer's length)
        for stage in ("question_to_first_token", "question_to_answer"):
            summary[f"{stage}_latency_ratio_text_over_clara"] = round(
                text["latency_ms"][stage]["p50"] / clara["latency_ms"][stage]["p50"], 2)
        if text["recall@5"] and clara["recall@5"] is not None:
            summary["recall@5_clara_over_dense"] = round(clara["recall@5"] / text["recall@5"], 3)
    return summary


def _question_f1(result: dict) -> list[float]:
    """A system's F1 on each question, in percent."""
    return [100 * token_f1(p["prediction"], p["answers"]) for p in result["predictions"]]


def run(args: argparse.Namespace) -> None:
    # the frameworks and matplotlib load here, not when `clara` builds its argument parser
    from .report import write_report  # a missing extra is named by the CLI, with the pip command
    from .systems import RunOptions, default_systems, run_system

    mode = "quick" if args.quick else "full"
    sample, datasets = MODES[mode]
    sample, datasets = args.sample or sample, args.datasets or datasets
    clara, clara_e2e = _rates(args.clara, "--clara"), _rates(args.clara_e2e, "--clara-e2e")
    shipped = default_checkpoint()
    systems = default_systems(clara, clara_e2e, args.text_ft, None if shipped is None else str(shipped))
    if args.systems == []:  # `--systems` with no name ran every system
        raise InvalidInputError("--systems names no system: name the ones to run, or leave the option out")
    if args.candidates is not None and args.setting == "oracle":
        raise InvalidInputError("--candidates sizes the normal setting's pools; the oracle setting reads the k")
    args.candidates = args.candidates or 20
    if args.setting == "normal" and args.candidates <= args.k:  # every retriever handed the reader the whole pool
        raise InvalidInputError(f"the normal setting reads the best -k {args.k} of --candidates {args.candidates}: "
                                "name more candidates than k")
    unknown = sorted(set(args.systems or ()) - {s.name for s in systems})
    if unknown:
        raise InvalidInputError(f"--systems: no system is named {', '.join(map(repr, unknown))}; the systems are "
                                f"{', '.join(repr(s.name) for s in systems)}")
    if args.systems:
        systems = [s for s in systems if s.name in args.systems]
    _refuse_unread(args, clara, clara_e2e, systems)
    # every dataset is read, and a missing or malformed one or checkpoint named, before the first system runs
    stems = [f"bench_{dataset_name(d) or Path(d).stem}_{args.setting}_{mode}" for d in datasets]
    if len(set(stems)) < len(stems):
        raise InvalidInputError(f"--datasets {' '.join(datasets)}: two of them would write the same report "
                                f"({', '.join(sorted({s for s in stems if stems.count(s) > 1}))})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: name the folder the reports go to")
    check_writable(out)  # found once the first system had run
    configs = {spec.checkpoint: read_config(Path(spec.checkpoint)) for spec in systems if spec.checkpoint}
    for spec in systems:
        if spec.checkpoint:
            _check_checkpoint(spec, configs[spec.checkpoint])
    systems = _on_one_base_model(systems, configs, args.base_model)
    if any(spec.retriever == "dense" for spec in systems):  # a mistyped model failed after the systems before it
        dense_model_path(args.dense_model)
    machine = environment()  # before the systems: a failure here loses no results
    samples = [(dataset, *benchmark_rows(dataset, args.data_dir, args.setting, sample, args.seed, args.k,
                                          args.candidates)) for dataset in datasets]
    options = RunOptions(args.k, args.max_new_tokens, args.dense_model, args.query_instruction,
                         args.passage_instruction, args.threads)
    kept_folders = []
    for stem, (dataset, rows, drawn) in zip(stems, samples):
        print(f"{dataset}: {drawn['sample']} questions ({mode} mode, {args.setting}, seed {args.seed}), "
              f"{len(systems)} systems")
        began = time.perf_counter()
        kept = out / f".{stem}.systems"  # each finished system's result, until every report is written
        kept_folders.append(kept)
        outcomes = [_system_result(run_system, spec, rows, options, kept / _kept_name(spec), machine)
                    for spec in tqdm(systems, desc=f"systems ({dataset})", unit="system")]
        results = [result for result, _ in outcomes]
        reused = [result["name"] for result, was_kept in outcomes if was_kept]
        report = {"benchmark": {"dataset": dataset, "mode": mode, **drawn, "k": args.k,
                                "max_new_tokens": args.max_new_tokens, "threads": args.threads or torch.get_num_threads(),
                                "dense_model": args.dense_model, "query_instruction": args.query_instruction,
                                "passage_instruction": args.passage_instruction,
                                # of the systems run now: a kept one's time was spent by the run before
                                "seconds": round(time.perf_counter() - began, 1),
                                **({"reused_systems": reused} if reused else {})},
                  **machine, "headline": headline(results), "systems": results}
        for path in write_report(report, out, stem):  # told as written: a later dataset's failure hid them
            print(f"wrote {path}")
    # kept until the last dataset's report: a run killed in its second dataset ran the first's again
    for kept in kept_folders:
        for spec in systems:  # these systems': a --systems subset leaves the others' kept results
            (kept / _kept_name(spec)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # left where something else was put in it
            kept.rmdir()


def _kept_name(spec: SystemSpec) -> str:
    """The file one system's result is kept in, named for the system (numbered by place, a
    --systems subset's first system replaced the full run's first)."""
    return f"system-{hashlib.sha256(spec.name.encode()).hexdigest()[:16]}.json"


def _system_result(run_system: Callable[..., dict], spec: SystemSpec, rows: list[dict], options: RunOptions,
                   path: Path, machine: dict) -> tuple[dict, bool]:
    """One system's result, and whether it was kept: run in its own process, or as an earlier
    run killed or failed later kept it in ``path``. The same clean commit, machine, package
    versions, rows, options, system and checkpoint files give the same answers and comparable
    timings, so a rerun runs only the systems left. Edited code (a "-dirty" commit) runs every
    system again."""
    folder = Path(spec.checkpoint) if spec.checkpoint else None  # retrained in place: another result
    weights = files_sha256([folder / CONFIG_FILE, *weight_files(folder)]) if folder else None
    key = hashlib.sha256(json.dumps({"commit": machine["commit"], "versions": machine["versions"],
                                     "machine": machine["machine"],
                                     "spec": dataclasses.asdict(spec), "checkpoint_sha256": weights,
                                     "model_folders": _model_folders(spec, options),
                                     "options": dataclasses.asdict(options), "rows": rows},
                                    sort_keys=True).encode()).hexdigest()
    reusable = machine["commit"] is not None and not machine["commit"].endswith("-dirty")
    if reusable and path.is_file():
        kept = read_json(path, InvalidInputError)
        if isinstance(kept, dict) and kept.get("key") == key:
            print(f"{spec.name}: the result a run before kept in {path}")
            return kept["result"], True
    result = _in_own_process(run_system, spec, rows, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "result": result})
    return result, False


def _model_folders(spec: SystemSpec, options: RunOptions) -> dict[str, list]:
    """The files of the model folders a system reads besides its checkpoint (a dense encoder,
    the base model of a system without one), by name, size and time: replaced in place, they
    give another result (the old encoder's was paired with new CLaRa rows)."""
    names = [options.dense_model if spec.retriever == "dense" else None, None if spec.checkpoint else spec.base_model]
    folders = [local_model_folder(name) for name in names if name]
    return {str(folder): sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
                                for path in folder.rglob("*") if path.is_file())
            for folder in folders if folder is not None}


def _refuse_unread(args: argparse.Namespace, clara: dict[int, str], clara_e2e: dict[int, str],
                   systems: list[SystemSpec]) -> None:
    """Refuse an option no chosen system reads (the report recorded a --dense-model nothing used)."""
    given = []
    if not any(spec.retriever == "dense" for spec in systems):
        given += [flag for flag, value, default in (("--dense-model", args.dense_model, DEFAULT_DENSE_MODEL),
                                                    ("--query-instruction", args.query_instruction, ""),
                                                    ("--passage-instruction", args.passage_instruction, ""))
                  if value != default]
    if args.text_ft and not any(spec.reader == "text-ft" for spec in systems):
        given.append("--text-ft")
    for flag, rates, query in (("--clara", clara, "compressor"), ("--clara-e2e", clara_e2e, "reasoner")):
        given += [f"{flag} {rate}={folder}" for rate, folder in rates.items()
                  if not any(spec.retriever == "clara" and spec.query == query and spec.compression_rate == rate
                             and spec.checkpoint == folder for spec in systems)]
    if given:
        raise InvalidInputError(f"{', '.join(given)}: not read by the systems chosen (--systems)")


def _on_one_base_model(systems: list[SystemSpec], configs: dict[str, ClaraConfig],
                       asked: str | None) -> list[SystemSpec]:
    """The systems, each on the base model its checkpoint names, and the systems without one on
    that base model too (or on ``asked``): a checkpoint on another backbone was compared with
    SmolLM2's text RAG. Checkpoints on different base models, or on another than asked, are refused."""
    bases = {spec.checkpoint: configs[spec.checkpoint].base_model for spec in systems if spec.checkpoint}
    if asked is not None:
        bases["--base-model"] = asked
    if len(set(bases.values())) > 1:
        named = "; ".join(f"{folder}: {base}" for folder, base in bases.items())
        raise InvalidInputError(f"the systems are compared on one base model, and several are named ({named}): "
                                "choose the systems of one with --systems")
    base = next(iter(bases.values()), None)
    return systems if base is None else [dataclasses.replace(spec, base_model=base) for spec in systems]


def _check_checkpoint(spec: SystemSpec, config: ClaraConfig) -> None:
    """Refuse a checkpoint its system cannot read, before the systems before it have run: a
    tokens-design one at another rate (its memory rows were trained one per position), one at a
    rate its documents' length cannot take, as the fine-tuned text reader one that was not
    trained to read text (the plain backbone would be scored under its name), and as CLaRa one
    that was."""
    if spec.reader == "text-ft" and not config.decoder_reads_text:
        raise InvalidInputError(f"--text-ft {spec.checkpoint} is not a text reader (clara train --stage text)")
    if spec.retriever != "clara":
        return
    if config.decoder_reads_text:  # its generator trained on text, not memories
        raise InvalidInputError(f"{spec.name}: {spec.checkpoint} is a text reader (clara train --stage text), not a "
                                "CLaRa checkpoint: pass it as --text-ft")
    if config.memory_design == "tokens" and config.compression_rate != spec.compression_rate:
        raise InvalidInputError(f"{spec.name}: {spec.checkpoint} has the tokens design, which reads only at its own "
                                f"compression rate {config.compression_rate}, not {spec.compression_rate}")
    try:  # the rate's other limits (doc_max_length) were told as its system loaded
        dataclasses.replace(config, compression_rate=spec.compression_rate)
    except ValueError as error:
        raise InvalidInputError(f"{spec.name}: {spec.checkpoint} cannot read at compression rate "
                                f"{spec.compression_rate}: {error}") from error


def _in_own_process(function: Callable[..., dict], *args: object) -> dict:
    """Run one system (``run_system``) in a fresh process: its peak memory is its own."""
    # an executor, not a Pool: a child killed for memory fails the run instead of hanging it
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
