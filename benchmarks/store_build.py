"""Build a MemoryStore of a passage corpus, persist, reload and query it; report the costs.

    python -m clara_benchmarks.store_build --corpus ../shared/data/corpus/2wiki_6119.json \
        --questions ../shared/data/2wikimultihopqa/dev.json --out docs/benchmarks/store_2wiki.json

Measures build time (compression + indexing), bytes on disk per passage (memory tokens vs
text), reload time and query latency p50/p95 (query reasoner + faiss search).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clara_plugins import MemoryStore
from clara_plugins.atomic import write_text_atomically
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
    parser.add_argument("--store", type=Path, default=Path("/tmp/clara-store-bench"))
    parser.add_argument("--limit", type=int, help="only the first N passages")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or default_checkpoint()  # None: no shipped checkpoint, an untrained model
    model = load_model(checkpoint, compression_rate=args.compression_rate, device="cpu")
    passages = read_documents([str(args.corpus)])[: args.limit]
    store = MemoryStore(model, batch_size=8)
    started = time.perf_counter()
    store.upsert(passages, ids=[str(i) for i in range(len(passages))], show_progress=True)
    store.search("warm-up", k=1)  # builds the faiss index
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    generation = store.save(args.store)
    save_seconds = time.perf_counter() - started
    started = time.perf_counter()
    store = MemoryStore.load(args.store, model)
    store.search("warm-up", k=1)
    load_seconds = time.perf_counter() - started

    latencies = []
    questions = [example.question for example in read_examples(args.questions, args.queries)]
    for question in tqdm(questions, desc="querying"):
        started = time.perf_counter()
        store.search(question, k=5)
        latencies.append(time.perf_counter() - started)
    top = store.search(questions[0], k=1)[0][0]

    memory_bytes = folder_bytes(generation, "memories-*.npy")
    text_bytes = sum(len(p.encode()) for p in passages)
    result = {
        "corpus": str(args.corpus), "passages": len(passages),
        "model": {"base": model.config.base_model, "compression_rate": model.config.compression_rate,
                  "memory_shape": [model.config.n_mem_tokens, model.hidden_size],
                  "checkpoint": str(checkpoint) if checkpoint else None},
        "build_seconds": round(build_seconds, 1),
        "passages_per_second": round(len(passages) / build_seconds, 2),
        "save_seconds": round(save_seconds, 2), "load_seconds": round(load_seconds, 2),
        "bytes_per_passage": {"memory_tokens": round(memory_bytes / len(passages)),
                              "text": round(text_bytes / len(passages)),
                              "store_on_disk": round(folder_bytes(generation, "*") / len(passages))},
        "query_latency_ms": {**latency_ms(latencies), "queries": len(latencies)},
        "example": {"question": questions[0], "top_passage": top.text[:200]},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "commit": commit()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
