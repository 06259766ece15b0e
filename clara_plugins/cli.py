"""The ``clara`` command: index a corpus, ask, convert checkpoints and data, train, evaluate, benchmark.

Only the invoked subcommand's arguments are built, and each subcommand imports what it needs
when it runs: ``clara --help`` loads neither torch nor the frameworks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import select
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .checks import check_output_path, check_texts, check_writable, device_name, non_negative_int, positive_int
from .config import (DEFAULT_BACKBONE_PACKAGE, DEFAULT_BASE_MODEL, ESTIMATORS, GOLD_TERMS, INDEX_KINDS,
                     MEMORY_DESIGNS, MEMORY_DTYPES, MEMORY_POOLINGS, RETRIEVAL_KEYS, SCHEDULES, SETTINGS, STAGES, ClaraConfig,
                     TrainConfig)
from .corpora import document_id
from .errors import CheckpointError, InvalidInputError, StoreError, one_line

PASSAGE_KINDS = ("reconstruct", "continue", "cloze", "inverse-cloze")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a CLaRa checkpoint folder (default: the shipped trained one on the default "
                        "backbone, an untrained model on any other --base-model)")
    parser.add_argument("--base-model", metavar="PATH_OR_ID",
                        help=f"base causal LM: a local folder or hub id (default: {DEFAULT_BASE_MODEL}, "
                        "or the one the checkpoint names)")
    parser.add_argument("--compression-rate", type=positive_int,
                        help="document tokens per memory token (default: the checkpoint's; 16 for an "
                             "untrained model); a pooled checkpoint reads its documents at another rate "
                             "as finer or coarser chunks of the same states")
    _device_argument(parser)


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default auto)")


# ------------------------------------------------------------------ arguments


_PASSAGE_FILES = ("passage files: .json/.jsonl (records with 'text' or 'contents', and an optional 'title'), .tsv (a record "
                  "a row, under a header: DPR's id, text, title); any other (.txt): one document per paragraph")


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", nargs="+", metavar="FILE", help=_PASSAGE_FILES)
    parser.add_argument("--store", required=True, metavar="DIR", help="the store folder (created, or extended)")
    _model_arguments(parser)
    parser.add_argument("--index", choices=INDEX_KINDS,
                        help="search index of a new store (default flat: exact; ivfpq: compact, re-scored)")
    parser.add_argument("--memory-dtype", choices=MEMORY_DTYPES,
                        help="how a new store keeps memory tokens (default float16; int8: half the disk, one "
                             "scale per vector)")
    parser.add_argument("--save-every", type=positive_int, default=1024,
                        help="documents compressed between saves (default 1024); a stopped run resumes from the last save")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="documents compressed at once, by the model or each Ray actor (default 8; a GPU "
                             "takes more)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="compress on Ray: a local instance started for the run, or the cluster at ADDRESS "
                        "(auto, ray://host:10001); put it after the files. Needs pip install "
                        "'clara-plugins[ray]'; checkpoint and base model paths must exist on every node")
    parser.add_argument("--workers", type=positive_int,
                        help="with --ray: actors, each holding one model (default: one per GPU, else per CPU)")


def _load_on_workers(args: argparse.Namespace):
    """How each Ray worker loads the model: local paths made absolute (a worker starts in another
    folder), and CUDA without an index (each worker sees only its own GPU, as cuda:0); Apple's
    MPS is left to each worker's auto."""
    import functools

    from .pretrained import load_model

    def absolute(path: str | None) -> str | None:  # the default's name is no path, whatever folder holds it
        return str(Path(path).resolve()) if path and path != DEFAULT_BASE_MODEL and Path(path).exists() else path

    return functools.partial(load_model, absolute(args.checkpoint), base_model=absolute(args.base_model),
                             compression_rate=args.compression_rate,
                             device={"cpu": "cpu", "cuda": "cuda"}.get(args.device.split(":")[0], "auto"))


def _ask_arguments(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_argument_group("documents (at least one of)")
    sources.add_argument("--store", metavar="DIR", help="a store written by 'clara index': retrieve from it")
    sources.add_argument("--docs", nargs="+", action="extend", default=[], metavar="FILE",
                         help=f"{_PASSAGE_FILES}; a missing file is an error")
    sources.add_argument("--text", nargs="+", action="extend", default=[], metavar="TEXT",
                         help="documents given as literal text on the command line")
    parser.add_argument("--question", required=True, help="the question to answer")
    _model_arguments(parser)
    parser.add_argument("-k", "--top-k", type=positive_int,
                        help="documents the generator reads (default: the checkpoint's generation_top_k)")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        help="answer length limit (default: the model's max_new_tokens setting)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it is made")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: question, answer, sources (ids, scores, first words)")


def _convert_apple_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="Apple checkpoint folder (e.g. compression-16/)")
    parser.add_argument("destination", metavar="DST", help="output folder")
    parser.add_argument("--base-model", metavar="PATH",
                        help="local copy of the base model (Apple's config may name a private path)")


def _convert_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the official file (e.g. ../shared/data/hotpotqa/dev.json)")
    parser.add_argument("destination", help="output JSONL")
    parser.add_argument("--kind", choices=["instruct", "e2e", "scp", *PASSAGE_KINDS], default="instruct",
                        help="row kind (default instruct). scp: SCP QA rows from the examples with one gold "
                             "passage (NQ). Teacher-free rows from a passage file (SOURCE is then a corpus, "
                             "as for 'clara synth'): reconstruct (repeat the passage), continue (its second "
                             "half from its first), cloze (a blanked name, number or date), inverse-cloze (a "
                             "sentence as the question, its passage without it as the gold candidate)")
    parser.add_argument("--setting", choices=SETTINGS,
                        help="instruct: normal, the BM25 top-k of a pool of at least 20 (the gold passages may be "
                             "missed); oracle: gold passages among the k (default normal)")
    parser.add_argument("-k", type=positive_int, help="instruct: documents per row (default 5)")
    parser.add_argument("--candidates", type=positive_int,
                        help="e2e, inverse-cloze: candidates per row (default 20 for e2e, 5 for inverse-cloze)")
    parser.add_argument("--skip", type=non_negative_int, default=0,
                        help="hold out the first N examples (e.g. NQ dev 0-299, for evaluation), and any later "
                        "one that repeats their evidence (a gold passage that is one of theirs, or holds a quarter "
                        "of one) or asks one of their questions again (a gold passage of the same title, an answer "
                        "in common), and a held-out gold passage among a kept example's distractors; for passages, "
                        "a repeat of one")
    parser.add_argument("--held-out", type=_held_out_file, action="append", default=[], metavar="FILE:N",
                        help="hold out the first N examples (or passages) of another file as --skip holds out this "
                             "one's: what an evaluation or a probe reads (MuSiQue asks NQ's questions again, in "
                             "hops); repeatable")
    parser.add_argument("--limit", type=positive_int, help="only the first N examples (after --skip)")
    # Python's random seeds from abs(): -1 would repeat 1's rows
    parser.add_argument("--seed", type=non_negative_int, help="e2e, cloze, inverse-cloze: shuffling seed (default 0)")


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", help=_PASSAGE_FILES)
    parser.add_argument("output", help="output JSONL (a .done ledger is kept beside it)")
    parser.add_argument("--teacher", default=DEFAULT_BASE_MODEL,
                        help=f"local Hugging Face chat model path or hub id (default {DEFAULT_BASE_MODEL})")
    parser.add_argument("--limit", type=positive_int, help="only the first N passages")
    parser.add_argument("--max-rounds", type=non_negative_int, default=3,
                        help="rounds of writing the QA a coverage check finds missing, each checked again (default 3)")
    _device_argument(parser)


TRAIN_TYPES = {**dict.fromkeys(("steps", "batch_size", "grad_accum", "save_every", "top_k", "candidates"), positive_int),
               **dict.fromkeys(("refresh_every", "probe_every"), non_negative_int)}
# ClaraConfig settings a new model takes from `clara train` (the base model, rate and key have flags of their own)
NEW_MODEL_FIELDS = ("doc_max_length", "lora_r", "lora_alpha", "lora_dropout", "memory_design", "memory_pooling",
                    "memory_layer", "memory_scale")
NEW_MODEL_CHOICES = {"memory_design": MEMORY_DESIGNS, "memory_pooling": MEMORY_POOLINGS}
NEW_MODEL_TYPES = dict.fromkeys(("doc_max_length", "lora_r", "lora_alpha"), positive_int)
TRAIN_CHOICES = {"schedule": SCHEDULES, "estimator": ESTIMATORS, "gold_term": GOLD_TERMS}


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, required=True,
                        help="the stage; 'retrieval' trains the query reasoner alone on e2e rows (in-batch "
                             "negatives); 'text' fine-tunes the decoder on the same rows read as text "
                             "(the fair text-RAG baseline)")
    parser.add_argument("--data", required=True, help="JSONL rows of the stage")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--init", metavar="DIR", help="checkpoint of the previous stage to start from")
    parser.add_argument("--base-model", help="base causal LM (default: the offline SmolLM2, or the --init "
                        "checkpoint's own; a path given with --init must hold the same weights)")
    parser.add_argument("--compression-rate", type=positive_int,
                        help="document tokens per memory token (default: --init's, else 16); with a pooled "
                             "--init, training goes on at this rate")
    parser.add_argument("--corpus", help="e2e only: retrieve candidates from this passage file")
    parser.add_argument("--probe", nargs="+", action="extend", default=[], metavar="ROWS",
                        help="held-out JSONL row sets whose reading gain is logged every --probe-every steps")
    fresh = parser.add_argument_group("a new model (without --init, whose checkpoint has its own)")
    for name in NEW_MODEL_FIELDS:
        default = next(field.default for field in dataclasses.fields(ClaraConfig) if field.name == name)
        flag, described = "--" + name.replace("_", "-"), f"ClaraConfig.{name} (default {default})"
        if isinstance(default, bool):
            fresh.add_argument(flag, action="store_true", default=None, help=described)
        else:
            fresh.add_argument(flag, type=NEW_MODEL_TYPES.get(name, type(default)), choices=NEW_MODEL_CHOICES.get(name),
                               help=described)
    parser.add_argument("--retrieval-key", choices=RETRIEVAL_KEYS,
                        help=f"what queries and documents are compared by (default: the --init checkpoint's, "
                             f"else {ClaraConfig.retrieval_key}); the e2e stage trains the query reasoner for it")
    _device_argument(parser)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "stage":
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=f"TrainConfig.{field.name}")
        else:  # counts and choices are checked by the parser (exit 2), as every other command's
            parser.add_argument(flag, type=TRAIN_TYPES.get(field.name, type(field.default)),
                                choices=TRAIN_CHOICES.get(field.name), default=field.default,
                                help=f"TrainConfig.{field.name} (default {field.default})")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from clara_benchmarks.dense import DEFAULT_DENSE_MODEL
    from clara_benchmarks.evaluation import RETRIEVERS, SYSTEMS

    parser.add_argument("data", help="converted JSONL rows")
    parser.add_argument("--checkpoint", help="CLaRa checkpoint (default: the shipped trained one)")
    parser.add_argument("--base-model", metavar="PATH_OR_ID",
                        help="the checkpoint's base model where its recorded path does not reach it (another "
                        "folder, another machine); it must hold the same weights")
    parser.add_argument("--compression-rate", type=positive_int,
                        help="read a pooled checkpoint's documents at this rate (default: its own)")
    parser.add_argument("--systems", nargs="*", action="extend", choices=SYSTEMS,
                        help="answering systems (default clara; control: clara reading another row's documents)")
    parser.add_argument("--control-shifts", nargs="+", action="extend", type=positive_int,
                        help="control: each row reads the documents of the row this many after it among "
                             "those that hold none of its gold passages; with several, each question's scores are "
                             "averaged over them (default 1)")
    parser.add_argument("--retrievers", nargs="*", action="extend", default=[], choices=RETRIEVERS,
                        help="retrievers to score on the rows' candidates ('compressor': the question "
                             "encoded by the compressor, where the end-to-end reasoner starts); with several, "
                             "also the first one's Recall@k minus each other's, with a paired 95 %% interval")
    parser.add_argument("--reading", action="store_true",
                        help="also measure whether the generator reads its memory tokens: the targets' CE "
                             "from each row's own documents vs the next row's that holds none of its evidence "
                             "(instruction or SCP rows), "
                             "also by token kind (digits, capitalised, the rest)")
    parser.add_argument("--dense-model", help=f"dense: sentence-transformers path (default {DEFAULT_DENSE_MODEL})")
    parser.add_argument("--query-instruction", help="dense: query prefix (BGE and E5 need one; default none)")
    parser.add_argument("--passage-instruction", help="dense: passage prefix (E5 needs one; default none)")
    parser.add_argument("-k", type=positive_int, default=5,
                        help="documents read per question, and a retrieval cut-off beside 1, 3 and 5 (default 5)")
    parser.add_argument("--limit", type=positive_int, help="only the first N rows")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length (default 32)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="questions answered together (default 4; more is faster where memory allows)")
    parser.add_argument("--out", help="write the results (with predictions) to this JSON file")
    _device_argument(parser)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from clara_benchmarks.run import add_arguments

    add_arguments(parser)


# ------------------------------------------------------------------- commands


def _index(args: argparse.Namespace) -> None:
    from .atomic import sole_writer

    # two runs into a new store each saved their own documents alone: the later save replaced the first's
    with sole_writer(args.store, "clara index run"):
        _index_into_store(args)


def _index_into_store(args: argparse.Namespace) -> None:
    import functools

    from .corpora import read_documents
    from .indexing import RayCompression, import_ray, index_documents
    from .model import refuse_text_reader
    from .pretrained import load_model
    from .store import MemoryStore
    from .store_folder import check_store_folder, store_settings

    if args.workers is not None and args.ray is None:
        raise InvalidInputError("--workers sets the Ray actors: give --ray too")
    folder = Path(args.store)
    check_store_folder(folder)  # before the model loads
    if (folder / "CURRENT").exists():
        kept = store_settings(folder)
        ignored = [f"--{name.replace('_', '-')} {asked} (the store's is {kept[name]})" for name, asked in
                   [("index", args.index), ("memory_dtype", args.memory_dtype)] if asked not in (None, kept[name])]
        if ignored:
            raise InvalidInputError(f"{folder} is a store already, and keeps the settings it was made with: "
                                    f"{', '.join(ignored)}; name a new folder for other settings")
    # read before the model loads: a typo costs no load. Each document's source is its file as
    # named (as LangChain's loaders record it: by its name alone, data/2023/passages.jsonl and
    # data/2024/passages.jsonl were one source, deleted together); a name that is no UTF-8
    # (b"\xff") is written with its bytes escaped: JSON metadata cannot hold the surrogate Python reads it as
    documents, empty = [], []
    for path in args.corpus:
        source = os.fsencode(path).decode("utf-8", "backslashreplace")  # one string a file, not a document
        texts = read_documents([path])
        documents += [(text, {"source": source, "position": i}) for i, text in enumerate(texts)]
        if not texts:
            empty.append(path)
    if not documents:
        raise InvalidInputError(f"{', '.join(args.corpus)}: no documents to index")
    if empty:  # a failed download among the files went unsaid, as the rest were indexed
        warnings.warn(f"{', '.join(empty)}: no documents in {'it' if len(empty) == 1 else 'them'}; the other files "
                      "are indexed", stacklevel=2)
    ids = [document_id(text) for text, _ in documents]
    check_writable(folder)  # found at the first save, after a group of documents was compressed
    if args.ray is not None:
        import_ray()  # a missing extra, found once the model had loaded
    model = load_model(args.checkpoint, base_model=args.base_model, compression_rate=args.compression_rate,
                       device=args.device)
    refuse_text_reader(model, "clara index compresses documents into memory tokens")
    if (folder / "CURRENT").exists():
        store = MemoryStore.load(folder, model, batch_size=args.batch_size)
    else:
        store = MemoryStore(model, batch_size=args.batch_size, **{
            name: value for name, value in [("index", args.index), ("memory_dtype", args.memory_dtype)] if value})
    on_ray = None if args.ray is None else RayCompression(_load_on_workers(args), args.ray, args.workers,
                                                          use_gpus=args.device != "cpu")
    compressed = index_documents(store, [text for text, _ in documents], ids, [meta for _, meta in documents],
                                 save=functools.partial(store.save, folder), save_every=args.save_every,
                                 on_ray=on_ray, show_progress=True)
    outside = len(store) - len(set(ids))  # a passage edited or dropped from the files since: indexing never deletes
    print(f"{folder}: {len(store)} documents ({len(compressed)} compressed now, "
          f"{len(set(ids)) - len(compressed)} already stored" + (f", {outside} in none of these files" if outside else "")
          + ")")


def _ask(args: argparse.Namespace) -> None:
    from .corpora import read_documents
    from .model import refuse_control_tokens, refuse_text_reader
    from .pretrained import load_model
    from .prompts import prompt_positions, question_prompt
    from .retrieval import cosine_scores, top_k
    from .store import MemoryStore

    if not args.docs and not args.text and not args.store:
        raise InvalidInputError("no documents: give --store DIR, --docs FILE ... or --text TEXT ...")
    if args.store and (args.docs or args.text):
        raise InvalidInputError("give either --store or --docs/--text, not both")
    check_texts([args.question], "--question")  # found after the store's checks or the documents' compression
    if args.text:
        check_texts(args.text, "--text")
    texts = read_documents(args.docs) + args.text  # a bad path fails before the model loads
    if (args.docs or args.text) and not texts:
        raise InvalidInputError(f"{', '.join(args.docs)}: no documents to read")
    if args.store and not (Path(args.store) / "CURRENT").exists():
        if Path(args.store).exists():  # a file, or a folder of something else: exit 5, as for clara index
            raise StoreError(f"--store {args.store} is not a CLaRa memory store (clara index makes one)")
        raise FileNotFoundError(f"--store {args.store}: no store there (clara index makes one)")
    model = load_model(args.checkpoint, base_model=args.base_model, compression_rate=args.compression_rate,
                       device=args.device)
    refuse_text_reader(model, "clara ask answers from memory tokens")
    refuse_control_tokens(model, [args.question], "--question")  # before a store is read or documents compressed
    k = args.top_k or model.config.generation_top_k
    if args.store:
        store = MemoryStore.load(args.store, model)
        hits = store.search(args.question, k)
        memories = store.memories([document.id for document, _ in hits])
        sources = [(document.id, document.text, score) for document, score in hits]
    else:
        candidates = model.compress_documents(texts, show_progress=len(texts) > 8)
        query = model.encode_queries([args.question])
        memories, picked = top_k(query, candidates, k, model.config.retrieval_key)
        memories, picked = memories[0], picked[0].tolist()
        scores = cosine_scores(query, candidates, model.config.retrieval_key)[0].tolist()
        sources = [(str(i + 1), texts[i], scores[i]) for i in picked]
    prompt = question_prompt(model.tokenizer, args.question, len(memories), model.document_placeholder)
    positions = prompt_positions(model.tokenizer, prompt)
    if args.json or args.no_stream:
        answer = model.answer([args.question], memories.unsqueeze(0), args.max_new_tokens)[0]
        if not args.json:
            print(answer)
    else:
        answer = ""
        for piece in model.stream_answer(args.question, memories, args.max_new_tokens):
            answer += piece
            print(piece, end="", flush=True)
        print()
    described = [{"id": doc_id, "score": round(score, 4), "first_words": _first_words(text)}
                 for doc_id, text, score in sources]
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "sources": described,
                          "input_positions": positions}))
        return
    print("sources:")
    for rank, source in enumerate(described, 1):
        print(f"  [{rank}] {source['id']}  score {source['score']:.3f}  {source['first_words']}")


def _first_words(text: str, words: int = 12) -> str:
    """The start of a document, on one line: enough to recognise it (its title, in most corpora)."""
    head = text.split()
    return " ".join(head[:words]) + (" …" if len(head) > words else "")


# the options each kind of row reads (the others default to None, and one given is refused)
CONVERT_OPTIONS = {"instruct": {"setting", "k"}, "e2e": {"candidates", "seed"}, "scp": set(), "reconstruct": set(),
                   "continue": set(), "cloze": {"seed"}, "inverse-cloze": {"candidates", "seed"}}


def _refuse_unread(args: argparse.Namespace, flags: dict[str, str], read: set[str], what: str) -> None:
    """Refuse an option (of ``flags``, which default to None) given where nothing reads it: the
    user meant it to change something."""
    given = [flag for name, flag in flags.items() if getattr(args, name) is not None and name not in read]
    if given:
        raise InvalidInputError(f"{', '.join(given)}: not read with {what}")


def _held_out_file(value: str) -> tuple[str, int]:
    """--held-out's FILE:N (a file name may hold colons: N follows the last)."""
    path, _, count = value.rpartition(":")
    if not path or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"takes FILE:N, N a positive integer, got {value!r}")
    return path, int(count)


def _first_of(path: str, count: int) -> list:
    """The first ``count`` examples of a question file, or passages of a passage file."""
    from .corpora import NotQuestionsError, read_documents, read_examples

    try:
        return read_examples(path, limit=count)
    except NotQuestionsError:
        return read_documents([path])[:count]


def _convert_data(args: argparse.Namespace) -> None:
    from .corpora import NotQuestionsError, after_held_out, read_documents, read_examples
    from .jsonfiles import write_jsonl
    from .rows import (cloze_rows, continuation_rows, e2e_rows, instruct_rows, inverse_cloze_rows, reconstruction_rows,
                       scp_qa_rows)

    check_output_path(args.destination, args.source, *(path for path, _ in args.held_out))
    _refuse_unread(args, {"setting": "--setting", "k": "-k", "candidates": "--candidates", "seed": "--seed"},
                   CONVERT_OPTIONS[args.kind], f"--kind {args.kind}")
    # the options given, each read by this kind's row builder (checked above); the others keep its defaults
    options = {name: getattr(args, name) for name in ("setting", "k", "candidates", "seed")
               if getattr(args, name) is not None}
    end = None if args.limit is None else args.skip + args.limit
    if args.kind in PASSAGE_KINDS:
        everything = read_documents([args.source])
    else:
        try:
            everything = read_examples(args.source)
        except NotQuestionsError as error:  # a passage file given without its kind, most often
            raise NotQuestionsError(f"{error}; --kind {args.kind} reads a question file (HotpotQA, 2WikiMultihopQA, "
                                    f"MuSiQue, NQ), and passages take --kind {' or '.join(PASSAGE_KINDS)}") from error
    candidates = everything[args.skip:end]
    if not candidates:  # bm25s then failed on an empty corpus, or a kind blamed the data
        raise InvalidInputError(f"--skip {args.skip} leaves none of the {len(everything)} "
                                f"{'passages' if args.kind in PASSAGE_KINDS else 'examples'} of {args.source}")
    held_out = everything[:args.skip] + [item for path, count in args.held_out for item in _first_of(path, count)]
    sources = after_held_out(held_out, candidates)
    if len(sources) < len(candidates):
        held = [f"{path}'s first {count}"
                for path, count in [(args.source, args.skip)] * bool(args.skip) + args.held_out]
        print(f"left out {len(candidates) - len(sources)} of {len(candidates)} sources that repeat the evidence or "
              f"the questions of the held-out ones ({', '.join(held)})")
    make = {"instruct": instruct_rows, "e2e": e2e_rows, "scp": scp_qa_rows, "reconstruct": reconstruction_rows,
            "continue": continuation_rows, "cloze": cloze_rows, "inverse-cloze": inverse_cloze_rows}[args.kind]
    rows = make(sources, **options)
    if not rows:  # an earlier run's rows at the destination are kept
        raise InvalidInputError(f"no {args.kind} rows came from the {len(sources)} sources of {args.source} "
                                f"(after --skip {args.skip}); nothing was written")
    write_jsonl(rows, args.destination)
    print(f"wrote {len(rows)} {args.kind} rows from {len(sources)} sources to {args.destination}")


def _synth(args: argparse.Namespace) -> None:
    from .corpora import read_documents
    from .synthesis import HuggingFaceTeacher, synthesize

    check_output_path(args.output, args.corpus)
    passages = dict.fromkeys(read_documents([args.corpus])[: args.limit])  # a repeated passage once
    if not passages:  # it wrote an empty output and ledger, and exited 0
        raise InvalidInputError(f"{args.corpus} holds no passages: nothing to synthesise")
    # ids from the texts, so that a resume over an edited corpus skips only what it synthesised
    report = synthesize([(document_id(p), p) for p in passages], HuggingFaceTeacher(args.teacher, device=args.device),
                        args.output, max_rounds=args.max_rounds)
    print(json.dumps(dataclasses.asdict(report), indent=2))


def _train(args: argparse.Namespace) -> None:
    from .atomic import sole_writer

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "stage"}
    config = TrainConfig(stage=args.stage, **values)
    # everything that can be refused is refused before the model loads and a corpus is compressed
    new_model = {name: getattr(args, name) for name in NEW_MODEL_FIELDS if getattr(args, name) is not None}
    if args.init and new_model:
        flags = ", ".join("--" + name.replace("_", "-") for name in new_model)
        raise InvalidInputError(f"{flags}: --init's own: a checkpoint keeps the settings it was trained with")
    with sole_writer(args.output, "training run"):  # a second run in the folder rewrote the log the first appended to
        _train_stage(args, config, new_model)


def _train_stage(args: argparse.Namespace, config: TrainConfig, new_model: dict) -> None:
    import torch

    from .checkpoint import check_same_configuration, files_sha256, load_trained_weights, weight_files
    from .corpora import read_documents
    from .jsonfiles import read_jsonl
    from .model import ClaraModel
    from .training import (check_for_model, check_run, check_trained_from, finished_message, missed_probes,
                           probe_finished_run, run_finished, train)

    rows = read_jsonl(args.data)
    names = [Path(path).stem for path in args.probe]
    if len(set(names)) < len(names):
        raise InvalidInputError(f"--probe: the reading gain is logged by file name, and two files are named alike: "
                                f"{', '.join(args.probe)}")
    probes = {name: read_jsonl(path) for name, path in zip(names, args.probe)}
    passages = read_documents([args.corpus]) if args.corpus else None
    state = check_run(rows, config, passages, probes, args.output)
    resuming, finished = state is not None, run_finished(state, config)
    if resuming and args.init:  # a stage before this one trained again: not resumed from, nor called finished on
        # the old weights (the teacher is checked by train(), once loaded or, for a finished run, its files hashed)
        check_trained_from(state, {"--init": files_sha256(weight_files(Path(args.init)))}, args.output)
    del state  # its optimizer moments: train() reads its own copy
    # an --init checkpoint's read here only to compare (from_pretrained waits out a save in progress)
    requested = _trained_config(args, new_model) if finished or not args.init else None
    if finished:  # of this model too (the same steps at another --compression-rate were called finished)
        saved = check_same_configuration(requested, Path(args.output) / "checkpoint")
        # another base model's weights are told by its fingerprint, once loaded; a run stopped in
        # its last probe loads the model to probe again
        needs_model = (saved.base_model != requested.base_model
                       or bool(missed_probes(probes, args.output, config.steps, config.probe_every)))
        if not needs_model:
            print(f"{finished_message(args.output, config)}; checkpoint: {Path(args.output) / 'checkpoint'}")
            return
    torch.manual_seed(config.seed)
    if args.init:
        model = ClaraModel.from_pretrained(args.init, base_model=args.base_model, compression_rate=args.compression_rate,
                                           device=args.device, dtype="float32")
        model.config.retrieval_key = args.retrieval_key or model.config.retrieval_key
    else:
        model = ClaraModel(requested, device=args.device, dtype="float32")
    if model.device.type == "cuda":  # TF32 matrix products (Ampere on); weights, gradients and loss stay float32
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:  # torch before 2.9
            torch.backends.cuda.matmul.allow_tf32 = True
    # refused before the corpus is compressed (hours): a resume with other model settings, a refresh for nothing,
    # rows the model cannot read
    if resuming:  # its own weights compress the corpus (a fresh model's did, resumed without --init)
        load_trained_weights(model, Path(args.output) / "checkpoint")
    check_for_model(model, rows, config, probes)
    if finished:  # no corpus to compress (hours), no step to train
        print(f"{finished_message(args.output, config)}; "
              f"checkpoint: {probe_finished_run(model, rows, config, args.output, probes)}")
        return
    corpus = None
    if passages is not None:
        from .store import MemoryStore  # faiss, which a run without a corpus never needs

        corpus = MemoryStore(model)
        corpus.upsert(passages, show_progress=True)
    checkpoint = train(model, rows, config, args.output, corpus, probes)
    print(f"checkpoint: {checkpoint}")


def _trained_config(args: argparse.Namespace, new_model: dict) -> ClaraConfig:
    """The model configuration a ``clara train`` asks for: --init's checkpoint's, or a new
    model's, with the base model, compression rate and retrieval key given."""
    if args.init:
        from .checkpoint import read_config

        config = read_config(Path(args.init))
        return dataclasses.replace(config, base_model=args.base_model or config.base_model,
                                   compression_rate=args.compression_rate or config.compression_rate,
                                   retrieval_key=args.retrieval_key or config.retrieval_key)
    return ClaraConfig(base_model=args.base_model or DEFAULT_BASE_MODEL,
                       compression_rate=args.compression_rate or ClaraConfig.compression_rate, **new_model,
                       retrieval_key=args.retrieval_key or ClaraConfig.retrieval_key)


def _eval(args: argparse.Namespace) -> None:
    from clara_benchmarks.dense import DEFAULT_DENSE_MODEL, DenseRetriever

    from .backbone import resolve_device
    from clara_benchmarks.evaluation import (
        check_evaluation_rows,
        control_partners,
        evaluate_answers,
        evaluate_retrieval,
        f1_above_control,
        recall_above,
    )

    from .atomic import write_text_atomically
    from .jsonfiles import read_jsonl
    from .model import refuse_control_tokens, refuse_text_reader
    from .pretrained import default_checkpoint, load_model
    from .reading import evaluate_reading
    from .rows import row_text

    # everything that can be refused is refused before the model loads, not after the answers
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_path(out, args.data)
    # each once (repeated options extend their lists): a system named twice ran twice; retrievers: evaluate_retrieval
    args.systems = ["clara"] if args.systems is None else list(dict.fromkeys(args.systems))
    if not (args.systems or args.retrievers or args.reading):
        raise InvalidInputError("--systems names none, and there are no --retrievers or --reading: nothing to measure")
    read = ({"control_shifts"} if "control" in args.systems else set()) | (
        {"dense_model", "query_instruction", "passage_instruction"} if "dense" in args.retrievers else set())
    _refuse_unread(args, {"control_shifts": "--control-shifts", "dense_model": "--dense-model",
                          "query_instruction": "--query-instruction", "passage_instruction": "--passage-instruction"},
                   read, "these --systems and --retrievers")
    rows = read_jsonl(args.data)[: args.limit]
    check_evaluation_rows(rows, args.systems, args.retrievers, args.k if args.reading else None, args.k)
    args.control_shifts = list(dict.fromkeys(args.control_shifts or [1]))
    if "control" in args.systems:
        control_partners(rows, args.control_shifts)  # refused before the model loads
    memory_measures = ([f"--systems {s}" for s in args.systems if s in ("clara", "control")]
                       + [f"--retrievers {r}" for r in args.retrievers if r in ("reasoner", "compressor")]
                       + (["--reading"] if args.reading else []))
    if out is not None:  # made once nothing is refused, and before hours of answering (a parent that is a file)
        out.parent.mkdir(parents=True, exist_ok=True)
    # the dense settings as read, recorded with the results
    dense_settings = ({"dense_model": args.dense_model or DEFAULT_DENSE_MODEL,
                       "query_instruction": args.query_instruction or "",
                       "passage_instruction": args.passage_instruction or ""} if "dense" in args.retrievers else {})
    dense = DenseRetriever(dense_settings["dense_model"], dense_settings["query_instruction"],
                           device=str(resolve_device(args.device)),
                           passage_instruction=dense_settings["passage_instruction"]) if dense_settings else None
    # BM25 and dense retrieval alone read no model: none loaded (the shipped one was, and recorded as read)
    reads_model = bool(args.systems or memory_measures)
    model_flags = {"checkpoint": "--checkpoint", "base_model": "--base-model", "compression_rate": "--compression-rate"}
    _refuse_unread(args, model_flags, set(model_flags) if reads_model else set(), "BM25 and dense retrieval alone")
    checkpoint = (args.checkpoint or default_checkpoint()) if reads_model else None
    dtype = "float32"  # on every device: the checkpoint trained so, and the recorded numbers were measured so
    model = None
    if reads_model:
        model = load_model(checkpoint, base_model=args.base_model, compression_rate=args.compression_rate,
                           device=args.device, dtype=dtype)
        if memory_measures:
            refuse_text_reader(model, f"{', '.join(memory_measures)} measure memory tokens (it reads --systems text)")
        # as training does: a typed "<MEM0>" failed the run at its batch, every answer before it lost, and
        # a typed "<|im_end|>" ended its prompt's turn, scored as any other row
        refuse_control_tokens(model, [row_text(row) for row in rows], "row")
    # the settings behind the numbers: two files of other settings could not be told apart
    results = {"data": args.data, "checkpoint": str(checkpoint) if checkpoint else None,
               "compression_rate": model.config.compression_rate if model else None, "dtype": dtype if model else None,
               "k": args.k, "limit": args.limit, "max_new_tokens": args.max_new_tokens if args.systems else None,
               **dense_settings,
               "answers": [], "retrieval": []}
    # each pool compressed once where more than one measure reads it (kept in memory till the end)
    readers = (sum(system in ("clara", "control") for system in args.systems) + bool(args.reading)
               + any(name in ("reasoner", "compressor") for name in args.retrievers))
    memories: dict | None = {} if readers > 1 else None
    for system in args.systems:
        results["answers"].append(evaluate_answers(model, rows, system, args.k, args.max_new_tokens,
                                                   args.batch_size, args.control_shifts, memories))
    scored = {result["system"]: result for result in results["answers"]}
    if {"clara", "control"} <= scored.keys():
        results["f1_above_control"] = f1_above_control(scored["clara"], scored["control"])
    if args.retrievers:
        results["retrieval"] = evaluate_retrieval(rows, args.retrievers, model, dense, sorted({1, 3, 5, args.k}),
                                                  memories)
        first, *others = results["retrieval"]
        if others:
            results["recall_above"] = [d for other in others for d in recall_above(first, other)]
    if args.reading:
        results["reading"] = evaluate_reading(model, rows, args.k, args.batch_size, memories)
    summary = {"answers": [{k: v for k, v in r.items() if k not in ("predictions", "question_f1")}
                           for r in results["answers"]],
               "retrieval": [{k: v for k, v in r.items() if k != "question_recall"} for r in results["retrieval"]],
               **{key: results[key] for key in ("f1_above_control", "recall_above", "reading") if key in results}}
    print(json.dumps(summary, indent=2))
    if out is not None:
        write_text_atomically(out, json.dumps(results, indent=2) + "\n")


def _bench(args: argparse.Namespace) -> None:
    from clara_benchmarks.run import run

    run(args)  # which tells each report as it is written


def _convert_apple(args: argparse.Namespace) -> None:
    from .apple import convert_apple_checkpoint

    convert_apple_checkpoint(args.source, args.destination, base_model=args.base_model)
    print(f"wrote {args.destination}")


# name: (one-line help, the arguments, what runs)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "index": ("compress a corpus once into a persisted memory store (resumable)", _index_arguments, _index),
    "ask": ("answer a question from a store or from documents compressed into memory tokens",
            _ask_arguments, _ask),
    "convert-apple": ("convert an Apple CLaRa checkpoint folder to this project's format (safely, "
                      "weights_only)", _convert_apple_arguments, _convert_apple),
    "convert-data": ("convert an official QA file or corpus into training or evaluation rows",
                     _convert_data_arguments, _convert_data),
    "synth": ("synthesise SCP pretraining data with a teacher LLM (resumable)", _synth_arguments, _synth),
    "train": ("train one CLaRa stage (scp, instruct, e2e, retrieval) or the text baseline; resumes when OUTPUT "
              "holds a trainer state", _train_arguments, _train),
    "eval": ("EM, F1, cover-EM, Recall/Precision@k and the reading gain on converted rows",
             _eval_arguments, _eval),
    "bench": ("benchmark CLaRa against text RAG through LangChain and LlamaIndex pipelines (needs "
              "pip install 'clara-plugins[bench]')", _bench_arguments, _bench),
}


def _version() -> str:
    try:
        return importlib.metadata.version("clara-plugins")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that pip never installed
        return "(not installed)"


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` alone (the others are only listed)."""
    # no abbreviations: main reads --debug before the parser is built (--deb would be read as it)
    parser = argparse.ArgumentParser(prog="clara", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"clara-plugins {_version()}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add_arguments, _) in COMMANDS.items():
        subparser = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        if name == command:
            add_arguments(subparser)
    return parser


# Exit codes beyond argparse's 2 (usage): the first class that matches an error wins, so the
# ValueError subclasses come before ValueError (InvalidInputError is one of them: 5).
EXIT_CODES = ((CheckpointError, 4), (StoreError, 5), (ValueError, 5), (OSError, 3))


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand. Errors print one line on stderr and exit with a code of EXIT_CODES
    (1 for anything else, 130 for Ctrl-C); ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if word in COMMANDS), None)
    debug = "--debug" in argv  # read before the parser: eval's and bench's import their modules to build theirs
    try:
        args = _build_parser(command).parse_args(argv)
        COMMANDS[args.command][2](args)
        sys.stdout.flush()  # here, not at the interpreter's exit: a reader gone (| head) is then seen below
    except KeyboardInterrupt:  # a screen of traceback; a stopped index or training run resumes
        if debug:
            raise
        print(f"clara {command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        if isinstance(error, BrokenPipeError) and _output_closed():  # what read it stopped (| head): no error here
            sys.stdout = open(os.devnull, "w")  # the interpreter's last flush would meet the closed pipe again
            raise SystemExit(141) from None  # as a shell reports a command the pipe's signal ended
        # the default backbone's package is installed apart, and its message says how; so do
        # the extras' (no module name: the project's own message)
        dependency = isinstance(error, ImportError) and error.name not in (None, DEFAULT_BACKBONE_PACKAGE)
        hint = ('; pip install clara-plugins brings its dependencies, and "clara-plugins[bench]" those of eval '
                'and bench' if dependency else "")
        print(f"clara {command}: error: {one_line(error)}{hint}", file=sys.stderr)
        raise SystemExit(next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)) from None


def _output_closed() -> bool:
    """Whether standard output's reader is gone (its pipe broke), not another pipe the command used."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file behind stdout: say what broke
        return False


if __name__ == "__main__":
    main()
