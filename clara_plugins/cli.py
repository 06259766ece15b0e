"""The ``clara`` command: ask, convert checkpoints and data, synthesise, train, evaluate, benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.run import add_arguments as add_bench_arguments

from .config import DEFAULT_BASE_MODEL, MEMORY_DESIGNS, ClaraConfig
from .errors import CheckpointError, InvalidInputError, StoreError
from .datasets import read_documents
from .training import TrainConfig


PASSAGE_KINDS = ("reconstruct", "continue", "cloze")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser(
        "ask",
        help="answer a question from documents compressed into memory tokens",
        description="Compress the documents, pick the top-k with the query reasoner when there "
        "are more than k, and answer the question from their memory tokens.",
    )
    sources = ask.add_argument_group("documents (at least one of)")
    sources.add_argument("--docs", nargs="+", default=[], metavar="FILE",
                         help="document files: .txt (one document per paragraph), .json/.jsonl (records "
                         "with 'text' or 'contents'); a missing file is an error")
    sources.add_argument("--text", nargs="+", default=[], metavar="TEXT",
                         help="documents given as literal text on the command line")
    ask.add_argument("--question", required=True, help="the question to answer")
    ask.add_argument("--checkpoint", metavar="DIR",
                     help="a CLaRa checkpoint folder (default: the shipped trained one on the default "
                     "backbone, an untrained model on any other --base-model or rate)")
    ask.add_argument("--base-model", metavar="PATH_OR_ID",
                     help=f"base causal LM: a local folder or hub id (default: {DEFAULT_BASE_MODEL}, "
                     "or the one the checkpoint names)")
    ask.add_argument("--compression-rate", type=_positive, default=16,
                     help="document tokens per memory token when no checkpoint is given (default 16)")
    ask.add_argument("-k", "--top-k", type=_positive, default=5,
                     help="documents the generator reads when more are given (default 5)")
    ask.add_argument("--max-new-tokens", type=_positive,
                     help="answer length limit (default: the model's max_new_tokens setting)")
    ask.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default auto)")
    ask.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it is made")

    convert = commands.add_parser(
        "convert-apple",
        help="convert an Apple CLaRa checkpoint folder to this project's format",
        description="Read config.json, adapters.pth and decoder_first_last_layers.pth (safely, "
        "weights_only) and write a clara-plugins checkpoint (JSON + safetensors).",
    )
    convert.add_argument("source", metavar="SRC", help="Apple checkpoint folder (e.g. compression-16/)")
    convert.add_argument("destination", metavar="DST", help="output folder")
    convert.add_argument("--base-model", metavar="PATH",
                         help="local copy of the base model (Apple's config may name a private path)")
    data = commands.add_parser(
        "convert-data", help="convert an official QA file into training or evaluation rows",
        description="Read HotpotQA, 2WikiMultihopQA, MuSiQue or NQ in their official formats and write "
        "instruction rows (question, k documents, answer) or end-to-end rows (~20 candidates, pos_index).")
    data.add_argument("source", help="the official file (e.g. ../shared/data/hotpotqa/dev.json)")
    data.add_argument("destination", help="output JSONL")
    data.add_argument("--kind", choices=["instruct", "e2e", "scp", *PASSAGE_KINDS], default="instruct",
                      help="row kind (default instruct). scp: SCP QA rows from the examples with one gold "
                           "passage (NQ). Teacher-free rows from a passage file (SOURCE is then a corpus, "
                           "as for 'clara synth'): reconstruct (repeat the passage), continue (its second "
                           "half from its first), cloze (a blanked name, number or date)")
    data.add_argument("--setting", choices=["normal", "oracle"], default="normal",
                      help="normal: BM25 top-k; oracle: gold passages among the k (default normal)")
    data.add_argument("-k", type=_positive, default=5, help="documents per instruction row (default 5)")
    data.add_argument("--candidates", type=_positive, default=20, help="candidates per end-to-end row (default 20)")
    data.add_argument("--skip", type=_non_negative, default=0,
                      help="leave out the first N examples (e.g. NQ dev 0-299, held out for evaluation)")
    data.add_argument("--limit", type=_positive, help="only the first N examples (after --skip)")
    data.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")

    synth = commands.add_parser(
        "synth", help="synthesise SCP pretraining data with a teacher LLM",
        description="For each passage a teacher writes simple QA, complex QA and a paraphrase, checks "
        "coverage, regenerates what is missing and drops weak samples. Resumable.")
    synth.add_argument("corpus", help="passages: .json list of {title, text} or .jsonl of {id, contents}")
    synth.add_argument("output", help="output JSONL (a .done ledger is kept beside it)")
    synth.add_argument("--teacher", default=DEFAULT_BASE_MODEL,
                       help=f"local Hugging Face chat model path or hub id (default {DEFAULT_BASE_MODEL})")
    synth.add_argument("--limit", type=_positive, help="only the first N passages")
    synth.add_argument("--max-rounds", type=int, default=3, help="coverage check rounds (default 3)")

    training = commands.add_parser(
        "train", help="train one CLaRa stage (scp, instruct or e2e) or the text baseline",
        description="Train a stage on JSONL rows; resumes when OUTPUT holds a trainer state. The "
        "checkpoint is written to OUTPUT/checkpoint, the metrics to OUTPUT/log.jsonl.")
    training.add_argument("--stage", choices=["scp", "instruct", "e2e", "text"], required=True,
                          help="the stage; 'text' fine-tunes the decoder on the same rows read as text "
                               "(the fair text-RAG baseline)")
    training.add_argument("--data", required=True, help="JSONL rows of the stage")
    training.add_argument("--output", required=True, help="output folder")
    training.add_argument("--init", metavar="DIR", help="checkpoint of the previous stage to start from")
    training.add_argument("--base-model", help="base model when no --init (default: the offline SmolLM2)")
    training.add_argument("--compression-rate", type=int, default=16, help="when no --init (default 16)")
    training.add_argument("--corpus", help="e2e only: retrieve candidates from this passage file")
    training.add_argument("--probe", nargs="+", default=[], metavar="ROWS",
                          help="held-out JSONL row sets whose reading gain is logged every --probe-every steps")
    training.add_argument("--memory-design", choices=MEMORY_DESIGNS, default=ClaraConfig.memory_design,
                          help=f"when no --init: how documents become memory vectors (default "
                               f"{ClaraConfig.memory_design})")
    training.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    for field in dataclasses.fields(TrainConfig):
        if field.name != "stage":
            flag = "--" + field.name.replace("_", "-")
            if field.type == "bool":
                training.add_argument(flag, action="store_true", help=f"TrainConfig.{field.name}")
            else:
                training.add_argument(flag, type=type(field.default), default=field.default,
                                      help=f"TrainConfig.{field.name} (default {field.default})")

    evaluate = commands.add_parser(
        "eval", help="EM, F1, cover-EM and Recall/Precision@k on converted rows",
        description="Evaluate a system (clara, text, none) and/or retrievers (reasoner, compressor, dense, bm25).")
    evaluate.add_argument("data", help="converted JSONL rows")
    evaluate.add_argument("--checkpoint", help="CLaRa checkpoint (default: the shipped trained one)")
    evaluate.add_argument("--systems", nargs="*", default=["clara"], choices=["clara", "text", "none"],
                          help="answering systems (default clara)")
    evaluate.add_argument("--retrievers", nargs="*", default=[], choices=["reasoner", "compressor", "dense", "bm25"],
                          help="retrievers to score on the rows' candidates ('compressor': the question "
                               "encoded by the compressor, where the end-to-end reasoner starts)")
    evaluate.add_argument("--reading", action="store_true",
                          help="also measure whether the generator reads its memory tokens: the targets' CE "
                               "from each row's own documents vs the next row's (instruction or SCP rows)")
    evaluate.add_argument("--dense-model", default="all-minilm-l6-v2", help="sentence-transformers path")
    evaluate.add_argument("--query-instruction", default="", help="dense query prefix (BGE needs one)")
    evaluate.add_argument("-k", type=_positive, default=5, help="documents read per question (default 5)")
    evaluate.add_argument("--limit", type=_positive, help="only the first N rows")
    evaluate.add_argument("--max-new-tokens", type=_positive, default=32, help="answer length (default 32)")
    evaluate.add_argument("--out", help="write the results (with predictions) to this JSON file")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")

    bench = commands.add_parser(
        "bench", help="benchmark CLaRa against text RAG (quality, retrieval, latency, memory)",
        description="Every system answers the same sampled questions through a LangChain or LlamaIndex "
        "pipeline; writes JSON, a Markdown table and plots. Needs pip install 'clara-plugins[bench]'.")
    add_bench_arguments(bench)
    return parser


def _convert_data(args: argparse.Namespace) -> None:
    from .datasets import (cloze_rows, continuation_rows, e2e_rows, instruct_rows, read_examples,
                           reconstruction_rows, scp_qa_rows, write_jsonl)

    end = None if args.limit is None else args.skip + args.limit
    read = (lambda path: read_documents([path])) if args.kind in PASSAGE_KINDS else read_examples
    sources = read(args.source)[args.skip:end]
    make = {"instruct": lambda e: instruct_rows(e, args.setting, args.k),
            "e2e": lambda e: e2e_rows(e, args.candidates, args.seed),
            "scp": scp_qa_rows, "reconstruct": reconstruction_rows, "continue": continuation_rows,
            "cloze": lambda p: cloze_rows(p, args.seed)}[args.kind]
    rows = make(sources)
    write_jsonl(rows, args.destination)
    print(f"wrote {len(rows)} {args.kind} rows from {len(sources)} sources to {args.destination}")


def _synth(args: argparse.Namespace) -> None:
    from .synthesis import HuggingFaceTeacher, synthesize

    passages = read_documents([args.corpus])[: args.limit]
    report = synthesize([(str(i), p) for i, p in enumerate(passages)], HuggingFaceTeacher(args.teacher),
                        args.output, max_rounds=args.max_rounds)
    print(json.dumps(dataclasses.asdict(report), indent=2))


def _train(args: argparse.Namespace) -> None:
    import torch

    from .datasets import read_jsonl
    from .model import ClaraModel
    from .store import MemoryStore
    from .training import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "stage"}
    config = TrainConfig(stage=args.stage, **values)
    torch.manual_seed(config.seed)
    if args.init:
        model = ClaraModel.from_pretrained(args.init, base_model=args.base_model, device=args.device)
    else:
        model = ClaraModel(ClaraConfig(base_model=args.base_model or DEFAULT_BASE_MODEL,
                                       compression_rate=args.compression_rate,
                                       memory_design=args.memory_design), device=args.device)
    corpus = None
    if args.corpus:
        corpus = MemoryStore(model)
        corpus.upsert(read_documents([args.corpus]), show_progress=True)
    probes = {Path(path).stem: read_jsonl(path) for path in args.probe}
    checkpoint = train(model, read_jsonl(args.data), config, args.output, corpus, probes)
    print(f"checkpoint: {checkpoint}")


def _eval(args: argparse.Namespace) -> None:
    from .datasets import read_jsonl
    from .dense import DenseRetriever
    from .evaluation import evaluate_answers, evaluate_reading, evaluate_retrieval
    from .pretrained import default_checkpoint, load_model

    rows = read_jsonl(args.data)[: args.limit]
    checkpoint = args.checkpoint or default_checkpoint()
    model = load_model(checkpoint, device=args.device)
    results = {"data": args.data, "checkpoint": str(checkpoint) if checkpoint else None, "answers": [], "retrieval": []}
    for system in args.systems:
        results["answers"].append(evaluate_answers(model, rows, system, args.k, args.max_new_tokens))
    dense = DenseRetriever(args.dense_model, args.query_instruction) if "dense" in args.retrievers else None
    if args.retrievers:
        results["retrieval"] = evaluate_retrieval(rows, args.retrievers, model, dense)
    if args.reading:
        results["reading"] = evaluate_reading(model, rows, args.k)
    summary = {"answers": [{k: v for k, v in r.items() if k != "predictions"} for r in results["answers"]],
               **{key: results[key] for key in ("retrieval", "reading") if key in results}}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _ask(args: argparse.Namespace) -> None:
    from .pretrained import load_model

    if not args.docs and not args.text:
        raise InvalidInputError("no documents: give --docs FILE ... or --text TEXT ...")
    documents = read_documents(args.docs) + args.text
    model = load_model(args.checkpoint, base_model=args.base_model, compression_rate=args.compression_rate,
                       device=args.device)
    memories = model.compress_documents(documents, show_progress=len(documents) > 8)
    if len(documents) > args.top_k:
        from .retrieval import cosine_scores

        top = cosine_scores(model.encode_queries([args.question]), memories)[0].topk(args.top_k).indices
        print(f"retrieved documents {top.tolist()} of {len(documents)}", file=sys.stderr)
        memories = memories[top]
    if args.no_stream:
        print(model.generate_from_compressed_documents_and_questions([args.question], memories,
                                                                      args.max_new_tokens)[0])
        return
    for piece in model.stream_answer(args.question, memories, args.max_new_tokens):
        print(piece, end="", flush=True)
    print()


def _bench(args: argparse.Namespace) -> None:
    from benchmarks.run import run

    for path in run(args):
        print(f"wrote {path}")


def _convert(args: argparse.Namespace) -> None:
    from .apple import convert_apple_checkpoint

    convert_apple_checkpoint(args.source, args.destination, base_model=args.base_model)
    print(f"wrote {args.destination}")


# Exit codes beyond argparse's 2 (usage): the first class that matches an error wins, so the
# ValueError subclasses come before ValueError (InvalidInputError is one of them: 5).
EXIT_CODES = ((CheckpointError, 4), (StoreError, 5), (ValueError, 5), (OSError, 3))


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand. Errors print one line on stderr and exit with a code of EXIT_CODES
    (1 for anything else); ``--debug`` shows the traceback instead."""
    args = _build_parser().parse_args(argv)
    commands = {"ask": _ask, "convert-apple": _convert, "convert-data": _convert_data, "synth": _synth,
                "train": _train, "eval": _eval, "bench": _bench}
    try:
        commands[args.command](args)
    except Exception as error:
        if args.debug:
            raise
        print(f"clara {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)) from None


if __name__ == "__main__":
    main()
