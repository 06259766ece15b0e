"""Build a MemoryStore of a passage corpus, persist, reload and query it; report the costs.

    python -m clara_benchmarks.store_build --corpus ../shared/data/corpus/2wiki_6119.json \
        --questions ../shared/data/2wikimultihopqa/dev.json --out docs/benchmarks/store_2wiki_6119.json

Measures build time (compression + indexing), bytes on disk per passage (memory tokens vs
text), reload time and query latency p50/p95 (query reasoner + faiss search).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clara_plugins import MemoryStore
from clara_plugins.atomic import write_text_atomically
from clara_plugins.checks import check_output_path, positive_int
from clara_plugins.corpora import read_documents, read_examples
from clara_plugins.pretrained import default_checkpoint, load_model

from .measure import commit, folder_bytes, latency_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--checkpoint", help="CLaRa checkpoint folder (default: the shipped one)")
    parser.add_argument("--compression-rate", type=int,
                        help="read the checkpoint at this rate (default: its own)")
    parser.add_argument("--store", type=Path, help="a new folder the store is written to and kept in (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--limit", type=positive_int, help="only the first N passages")
    parser.add_argument("--queries", type=positive_int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # read and checked before the build (50 min for the 6,119 passages), not after it
    check_output_path(args.out, args.corpus, args.questions, args.store)
    questions = [example.question for example in read_examples(args.questions, args.queries)]
    if args.store is not None and args.store.exists() and (not args.store.is_dir() or any(args.store.iterdir())):
        parser.error(f"--store {args.store} exists and is not an empty folder: name a new one")

    passages = read_documents([str(args.corpus)])[: args.limit]
    if not passages:
        parser.error(f"--corpus {args.corpus} holds no passages")
    checkpoint = args.checkpoint or default_checkpoint()  # None: no shipped checkpoint, an untrained model
    model = load_model(checkpoint, compression_rate=args.compression_rate, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        result = _measure(model, passages, questions, args.store or Path(scratch) / "store")
    result = {"corpus": str(args.corpus), "passages": len(passages),
              "model": {"base": model.config.base_model, "compression_rate": model.config.compression_rate,
                        "memory_shape": [model.config.n_mem_tokens, model.hidden_size],
                        "checkpoint": str(checkpoint) if checkpoint else None},
              **result,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "commit": commit()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _measure(model, passages: list[str], questions: list[str], folder: Path) -> dict:
    """Build, save, reload and query the store of ``passages`` in ``folder``."""
    store = MemoryStore(model, batch_size=8)
    started = time.perf_counter()
    store.upsert(passages, ids=[str(i) for i in range(len(passages))], show_progress=True)
    store.search("warm-up", k=1)  # builds the faiss index
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    generation = store.save(folder)
    save_seconds = time.perf_counter() - started
    started = time.perf_counter()
    store = MemoryStore.load(folder, model)
    store.search("warm-up", k=1)
    load_seconds = time.perf_counter() - started

    latencies = []
    for question in tqdm(questions, desc="querying"):
        started = time.perf_counter()
        store.search(question, k=5)
        latencies.append(time.perf_counter() - started)
    top = store.search(questions[0], k=1)[0][0]

    memory_bytes = folder_bytes(generation, "memories-*.npy")
    text_bytes = sum(len(p.encode()) for p in passages)
    return {
        "build_seconds": round(build_seconds, 1),
        "passages_per_second": round(len(passages) / build_seconds, 2),
        "save_seconds": round(save_seconds, 2), "load_seconds": round(load_seconds, 2),
        "bytes_per_passage": {"memory_tokens": round(memory_bytes / len(passages)),
                              "text": round(text_bytes / len(passages)),
                              "store_on_disk": round(folder_bytes(generation, "*") / len(passages))},
        "query_latency_ms": {**latency_ms(latencies), "queries": len(latencies)},
        "example": {"question": questions[0], "top_passage": top.text[:200]},
    }


if __name__ == "__main__":
    main()
