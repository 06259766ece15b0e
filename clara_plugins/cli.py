"""The ``clara`` command: ask questions over documents, convert Apple checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import DEFAULT_BASE_MODEL, ClaraConfig


def read_documents(sources: list[str]) -> list[str]:
    """Each source is a file or literal text.

    A ``.txt`` file gives one document per blank-line-separated paragraph; a ``.json`` file a
    list of records and a ``.jsonl`` file one record per line, each record's ``text`` or
    ``contents`` (with its ``title`` in front when present). Anything else is the text itself.
    """
    documents: list[str] = []
    for source in sources:
        path = Path(source)
        if not path.is_file():
            documents.append(source)
        elif path.suffix == ".jsonl":
            documents.extend(_record_text(json.loads(line)) for line in path.read_text().splitlines() if line.strip())
        elif path.suffix == ".json":
            documents.extend(_record_text(record) for record in json.loads(path.read_text()))
        else:
            documents.extend(p.strip() for p in path.read_text().split("\n\n") if p.strip())
    return documents


def _record_text(record: dict) -> str:
    text = record.get("text") or record.get("contents") or ""
    return f"{record['title']}\n{text}" if record.get("title") else text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clara", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser(
        "ask",
        help="answer a question from documents compressed into memory tokens",
        description="Compress the documents, pick the top-k with the query reasoner when there "
        "are more than k, and answer the question from their memory tokens.",
    )
    ask.add_argument("--docs", nargs="+", required=True, metavar="FILE_OR_TEXT",
                     help="documents: .txt files (one per paragraph), .json/.jsonl files of records "
                     "with 'text' or 'contents', or literal text")
    ask.add_argument("--question", required=True, help="the question to answer")
    ask.add_argument("--checkpoint", metavar="DIR",
                     help="a CLaRa checkpoint folder (default: an untrained model on --base-model)")
    ask.add_argument("--base-model", metavar="PATH_OR_ID",
                     help=f"base causal LM: a local folder or hub id (default: {DEFAULT_BASE_MODEL}, "
                     "or the one the checkpoint names)")
    ask.add_argument("--compression-rate", type=int, default=16,
                     help="document tokens per memory token when no checkpoint is given (default 16)")
    ask.add_argument("-k", "--top-k", type=int, default=5,
                     help="documents the generator reads when more are given (default 5)")
    ask.add_argument("--max-new-tokens", type=int,
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
    return parser


def _ask(args: argparse.Namespace) -> None:
    from .model import ClaraModel

    documents = read_documents(args.docs)
    if args.checkpoint:
        model = ClaraModel.from_pretrained(args.checkpoint, base_model=args.base_model, device=args.device)
    else:
        config = ClaraConfig(base_model=args.base_model or DEFAULT_BASE_MODEL,
                             compression_rate=args.compression_rate)
        model = ClaraModel(config, device=args.device)
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


def _convert(args: argparse.Namespace) -> None:
    from .apple import convert_apple_checkpoint

    convert_apple_checkpoint(args.source, args.destination, base_model=args.base_model)
    print(f"wrote {args.destination}")


def main(argv: list[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    {"ask": _ask, "convert-apple": _convert}[args.command](args)


if __name__ == "__main__":
    main()
