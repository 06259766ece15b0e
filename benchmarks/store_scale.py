"""Stores at scale: bytes per passage on disk, index RAM, search latency and Recall@10 against
exact search, for each memory dtype and index kind of the local store and for Milvus Lite, side
by side in one run.

    python -m clara_benchmarks.store_scale 10000 --corpus ../shared/data/corpus/2wiki_6119.json \\
        --questions ../shared/data/2wikimultihopqa/dev.json --sample /tmp/clara-sample.npz \\
        --configs flat:float16,flat:int8,hnsw:int8,ivfpq:int8,milvus:FLAT \\
        --out docs/benchmarks/store_scale_10k.json
    python -m clara_benchmarks.scale_plot docs/benchmarks/store_scale.png docs/benchmarks/store_scale_*k.json

``--configs`` lists ``index:memory dtype`` pairs of the local MemoryStore, and ``milvus:INDEX``
for a MilvusMemoryStore in a milvus-lite file with that Milvus index type.

The memories are synthetic, drawn from real ones: the shipped CR16 checkpoint compresses
``--seeds`` passages spread evenly over ``--corpus`` and encodes the first ``--queries``
questions of ``--questions`` (both kept in ``--sample``, so that runs at 100k and 1M reuse
them without compressing again). Each synthetic passage takes, at each of its memory
positions, the vector at that position of a randomly chosen real passage, plus Gaussian noise
of SIGMA times that position's per-dimension standard deviation over the real passages. So
the vectors keep the real ones' norms and outlier dimensions, while passages mix many real
ones; the JSON sets their statistics beside the real ones'. Their cosines spread less than
real ones and form no topical clusters, which makes approximate search harder, not easier.
A passage's text is a real passage of the corpus, taken in turn.

Recall@10 counts the exact top 10 (cosine of the model's retrieval keys of the fp16 memories)
found by each store. Query encoding is excluded from the search latency and reported apart, as
measured when the sample was made. Each local store is built in memory, then saved, reloaded
memory-mapped and searched, so a run needs about passages x 18.4 KB of RAM for the fp16 stores
(9.3 KB for int8). Besides the index's own bytes, the growth of this process' resident memory
from before the build to after the searches of the reopened store is reported: for Milvus Lite,
which runs inside the process, it is the only measure of its RAM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

from clara_plugins import MemoryStore
from clara_plugins.atomic import write_file_atomically, write_text_atomically
from clara_plugins.checks import check_output_path, positive_int
from clara_plugins.compact import MIN_ROWS, dequantize, quantize
from clara_plugins.config import INDEX_KINDS, MEMORY_DTYPES
from clara_plugins.corpora import read_documents, read_examples
from clara_plugins.keys import ClaraKeys, normalize_rows
from clara_plugins.pretrained import load_model

from .measure import environment, folder_bytes, latency_ms

SIGMA = 0.25  # noise per dimension, in real standard deviations: the mean cosine between passages stays real
BATCH = 4096  # synthetic passages drawn, stored and scored at a time
K = 10
CONFIGS = "flat:float16,flat:int8,ivfpq:float16,ivfpq:int8"
RESCORE_FACTORS = (5, 10, 20, 40)
ENCODE_TIMINGS = 5  # questions encoded one at a time for the query-encoding latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("passages", type=_pairs, help="synthetic passages per store")
    parser.add_argument("--corpus", type=Path, required=True, help="passages: seeds and texts")
    parser.add_argument("--questions", type=Path, help="QA file whose questions are the queries (to make --sample)")
    parser.add_argument("--sample", type=Path, required=True, help="real memories and query keys (.npz): read, "
                        "or made and written when missing")
    parser.add_argument("--seeds", type=_pairs, default=256, help="real passages compressed to make --sample")
    parser.add_argument("--queries", type=positive_int, default=100, help="questions encoded to make --sample")
    parser.add_argument("--configs", default=CONFIGS, help=f"index:dtype,... (default {CONFIGS})")
    parser.add_argument("--store-dir", type=Path, help="where the stores are written (default: the temp folder)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configs = _configs(args.configs, parser)  # before any work: a typo in the last pair lost every result
    check_output_path(args.out, args.sample, args.corpus, args.questions, args.store_dir)
    if args.store_dir is not None and not args.store_dir.is_dir():
        parser.error(f"--store-dir {args.store_dir} is not a folder")

    texts = read_documents([str(args.corpus)])  # a wrong file named before the model loads
    if not texts:
        parser.error(f"--corpus {args.corpus} holds no passages")
    asked = None  # the questions of a sample to make, read before the model loads and the seeds are compressed
    if not args.sample.exists():
        if args.questions is None:
            parser.error(f"{args.sample} does not exist: --questions is needed to make it")
        asked = [example.question for example in read_examples(args.questions, args.queries)]
    model = load_model(device="cpu")
    if asked is not None:
        make_sample(model, texts, asked, args.seeds, args.sample)
    keys = ClaraKeys(model)
    with np.load(args.sample, allow_pickle=False) as sample:
        real, queries, encode_seconds = sample["memories"], sample["queries"], sample["encode_seconds"]
        sample_key = str(sample["retrieval_key"]) if "retrieval_key" in sample else "flat"
    if sample_key != keys.kind:
        parser.error(f"{args.sample} holds {sample_key} query keys, the model uses {keys.kind} keys: "
                     "give another --sample path to make a new sample")
    queries = normalize_rows(queries)
    truth = exact_top_k(keys, real, queries, args.passages)

    results = []
    for kind, dtype in configs:
        print(f"{kind} / {dtype} ...", flush=True)
        results.append(measure_store(model, kind, dtype, real, texts, queries, truth, args.passages, args.store_dir))
        print(json.dumps(results[-1]), flush=True)

    report = {
        "passages": args.passages,
        "sample": {"file": str(args.sample), "seeds": len(real), "queries": len(queries), "sigma": SIGMA,
                   "memory_shape": list(real.shape[1:]), "corpus": str(args.corpus)},
        "retrieval_key": keys.kind,
        "statistics": {"real": statistics(keys, real, queries),
                       "synthetic": statistics(keys, synthetic_memories(real, 0, min(args.passages, 256)), queries)},
        "int8_on_real_memories": int8_effect(real),
        "query_encoding_ms": {**latency_ms(list(encode_seconds)), "questions": len(encode_seconds)},
        "stores": results,
        **environment(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(report, indent=2) + "\n")
    print(table(results))


def _pairs(value: str) -> int:
    """A count of passages of which the cosine statistics take pairs: one failed on an empty
    percentile once every store had run."""
    count = positive_int(value)
    if count < 2:
        raise argparse.ArgumentTypeError(f"give at least 2 (pairs of them are compared), got {count}")
    return count


def _configs(text: str, parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The ``index:dtype`` pairs of --configs, each checked: a local store's index kind and
    memory dtype, or ``milvus`` and Milvus' index type (with pymilvus installed)."""
    pairs = []
    for config in text.split(","):
        kind, _, dtype = config.partition(":")
        if kind == "milvus":
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", dtype):  # Milvus refused it after the local stores had run
                parser.error(f"--configs {config}: name Milvus' index type, e.g. milvus:FLAT or milvus:HNSW")
            if importlib.util.find_spec("pymilvus") is None:
                parser.error(f"--configs {config}: install the [milvus] extra")
            from clara_plugins.milvus_store import lite_index_problem

            if problem := lite_index_problem(dtype):  # it searched every row, reported under this name
                parser.error(f"--configs {config}: {problem}")
        elif kind not in INDEX_KINDS or dtype not in MEMORY_DTYPES:
            parser.error(f"--configs takes index:dtype pairs, index one of {INDEX_KINDS} (or milvus:INDEX_TYPE) "
                         f"and dtype one of {MEMORY_DTYPES}; got {config!r}")
        pairs.append((kind, dtype))
    return pairs


def make_sample(model, texts: list[str], asked: list[str], seeds: int, path: Path) -> None:
    """Compress ``seeds`` passages spread over the corpus and encode the questions ``asked``."""
    passages = texts[:: max(1, len(texts) // seeds)][:seeds]
    memories = model.compress(passages, 8, show_progress=True).memories.to(torch.float16).numpy()
    keys = ClaraKeys(model)
    query_keys = keys.query_keys(asked)
    encode_seconds = []
    for question in asked[:ENCODE_TIMINGS]:
        started = time.perf_counter()
        model.encode_queries([question])
        encode_seconds.append(time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all, so that a killed run leaves no sample that later runs trust; written
    # through a handle, so that savez adds no .npz to the name asked for
    write_file_atomically(path, lambda handle: np.savez(
        handle, memories=memories, queries=query_keys, encode_seconds=np.array(encode_seconds),
        retrieval_key=np.array(keys.kind)), binary=True)


def synthetic_memories(real: np.ndarray, start: int, count: int) -> np.ndarray:
    """fp16 passages start..start+count: at each memory position, a random real passage's vector
    plus noise; the same passages whichever store asks for them."""
    rng = np.random.default_rng([7, start])
    real = real.astype(np.float32)
    sources = rng.integers(0, len(real), size=(count, real.shape[1]))
    noise = rng.standard_normal((count, *real.shape[1:]), dtype=np.float32)
    return (real[sources, np.arange(real.shape[1])] + SIGMA * real.std(axis=0) * noise).astype(np.float16)


def batches(passages: int) -> list[tuple[int, int]]:
    return [(start, min(BATCH, passages - start)) for start in range(0, passages, BATCH)]


def exact_top_k(keys: ClaraKeys, real: np.ndarray, queries: np.ndarray, passages: int) -> list[set[int]]:
    """Each query's K passages of highest cosine, over the fp16 memories, a batch at a time."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start, count in tqdm(batches(passages), desc="exact top 10"):  # minutes for a million passages
        scores = np.concatenate([best_scores, queries @ keys.memory_keys(synthetic_memories(real, start, count)).T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + count), (len(queries), count))], 1)
        keep = np.argsort(-scores, axis=1)[:, :K]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    return [set(row.tolist()) for row in best_rows]


def measure_store(model, kind: str, dtype: str, real: np.ndarray, texts: list[str], queries: np.ndarray,
                  truth: list[set[int]], passages: int, store_dir: Path | None) -> dict:
    """Build one store, write it, reopen it and search it. ``kind`` "milvus" is a
    MilvusMemoryStore in a milvus-lite file, whose ``dtype`` names Milvus' index type."""
    rss_before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(dir=store_dir) as folder:
        store = open_store(model, kind, dtype, Path(folder))
        build_seconds = 0.0  # upserts and the index, not the drawing of synthetic memories
        for start, count in tqdm(batches(passages), desc=f"building {kind}/{dtype}"):
            memories = torch.from_numpy(synthetic_memories(real, start, count))
            started = time.perf_counter()
            store.upsert([texts[i % len(texts)] for i in range(start, start + count)],
                         ids=[str(i) for i in range(start, start + count)], memories=memories)
            build_seconds += time.perf_counter() - started
        started = time.perf_counter()
        store.search_by_key(queries[0], k=1)  # builds the index
        build_seconds += time.perf_counter() - started
        started = time.perf_counter()
        if kind == "milvus":  # Milvus wrote as it went
            close_milvus(store, Path(folder))
        else:
            store.save(Path(folder) / "store")
        save_seconds = time.perf_counter() - started
        del store
        started = time.perf_counter()
        store = open_store(model, kind, dtype, Path(folder))
        store.search_by_key(queries[0], k=1)
        load_seconds = time.perf_counter() - started
        disk = {"memories": folder_bytes(Path(folder), "memories-*") + folder_bytes(Path(folder), "scales-*"),
                "records": folder_bytes(Path(folder), "records*"), "index": folder_bytes(Path(folder), "index*")}
        disk["total"] = folder_bytes(Path(folder))
        latencies, recall = search_all(store, queries, truth)
        # the process' growth: the reopened store's memory-mapped pages read so far, and its index
        rss_growth = psutil.Process().memory_info().rss - rss_before
        by_factor, latency_by_factor = {}, {}
        # the main numbers' setting; a smaller ivfpq store searches exactly, whatever the factor
        rescore_factor = store.rescore_factor if kind == "ivfpq" and passages >= MIN_ROWS else None
        if rescore_factor is not None:
            for factor in RESCORE_FACTORS:
                store.rescore_factor = factor
                seconds, by_factor[factor] = search_all(store, queries, truth)
                latency_by_factor[factor] = latency_ms(seconds)
        if kind == "milvus":
            close_milvus(store, Path(folder))
        del store
    # a flat index is not saved: it holds every key as float32; Milvus keeps its index to itself
    index_ram = {"flat": passages * queries.shape[1] * 4, "milvus": None}.get(kind, disk["index"])
    return {"index": kind, "memory_dtype": dtype, "build_seconds": round(build_seconds, 1),
            "save_seconds": round(save_seconds, 1), "load_seconds": round(load_seconds, 1),
            "disk_bytes_per_passage": {name: round(size / passages) for name, size in disk.items()},
            "index_ram_bytes_per_passage": None if index_ram is None else round(index_ram / passages),
            "index_ram_bytes": index_ram, "rss_growth_bytes_per_passage": round(rss_growth / passages),
            "search_ms": latency_ms(latencies), "recall_at_10": recall, "rescore_factor": rescore_factor,
            "recall_at_10_by_rescore_factor": by_factor, "search_ms_by_rescore_factor": latency_by_factor}


def open_store(model, kind: str, dtype: str, folder: Path):
    """A new or reopened store of ``kind`` in ``folder``."""
    if kind == "milvus":
        from clara_plugins.milvus_store import MilvusMemoryStore

        return MilvusMemoryStore(model, str(folder / "clara.db"), index_type=dtype)
    if (folder / "store").exists():
        return MemoryStore.load(folder / "store", model)
    return MemoryStore(model, index=kind, memory_dtype=dtype)


def close_milvus(store, folder: Path) -> None:
    """Close the store and stop milvus-lite's server of its file: closed alone, the server kept
    serving it (a reopen read nothing from disk) and its data stayed in the process."""
    from milvus_lite.server_manager import server_manager_instance

    store.close()
    server_manager_instance.release_server(str(folder / "clara.db"))


def search_all(store: MemoryStore, queries: np.ndarray, truth: list[set[int]]) -> tuple[list[float], float]:
    """Each search's seconds, and the mean share of the exact top K found."""
    latencies, recalls = [], []
    for query, expected in zip(queries, truth):
        started = time.perf_counter()
        found = store.search_by_key(query, k=K)
        latencies.append(time.perf_counter() - started)
        recalls.append(len(expected & {int(doc.id) for doc, _ in found}) / len(expected))  # K, or all of fewer
    return latencies, round(float(np.mean(recalls)), 4)


def statistics(keys: ClaraKeys, memories: np.ndarray, queries: np.ndarray) -> dict:
    """What the synthetic memories should share with the real ones."""
    vectors = memories.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=2)
    stored = keys.memory_keys(memories[:256])
    pairs = (stored @ stored.T)[np.triu_indices(len(stored), 1)]
    to_queries = queries @ stored.T
    return {"vector_norm_mean": round(float(norms.mean()), 2), "vector_norm_std": round(float(norms.std()), 2),
            "largest_value_over_rms": round(float((np.abs(vectors).max(axis=2) * np.sqrt(vectors.shape[2])
                                                   / norms).mean()), 2),
            "passage_cosine": {"mean": round(float(pairs.mean()), 3), "p5": round(float(np.percentile(pairs, 5)), 3),
                               "p95": round(float(np.percentile(pairs, 95)), 3)},
            "query_cosine": {"mean": round(float(to_queries.mean()), 3),
                             "p95": round(float(np.percentile(to_queries, 95)), 3)}}


def int8_effect(real: np.ndarray) -> dict:
    """How far int8 memories are from the fp16 ones, with a scale per memory vector (as stored)
    or per passage (the same as an int8 key with its norm); and an fp16 key with its norm."""
    memories = real.astype(np.float32)
    flat = memories.reshape(len(memories), -1)
    norms = np.linalg.norm(flat, axis=1)
    per_passage = dequantize(*quantize(flat[:, None]))[:, 0]
    unit = normalize_rows(flat)  # the flattened key the Milvus store keeps
    key_and_norm = (unit.astype(np.float16).astype(np.float32) * norms[:, None]).astype(np.float16)
    variants = {"int8, a scale per memory vector (stored)": dequantize(*quantize(memories)).reshape(len(flat), -1),
                "int8, a scale per passage": per_passage,
                "fp16 key and its norm": key_and_norm.astype(np.float32)}

    def errors(restored: np.ndarray) -> dict:
        relative = np.linalg.norm(restored - flat, axis=1) / norms
        cosine = (normalize_rows(restored) * unit).sum(axis=1)
        return {"relative_error_mean": float(relative.mean()), "relative_error_max": float(relative.max()),
                "key_cosine_min": float(cosine.min()), "key_cosine_mean": float(cosine.mean()),
                "exact_values": float(np.mean(restored.astype(np.float16) == real.reshape(len(flat), -1)))}

    return {name: errors(restored) for name, restored in variants.items()}


def table(results: list[dict]) -> str:
    lines = ["| index | dtype | disk B/passage | index RAM B/passage | RSS growth B/passage | Recall@10 | p50 ms | "
             "p95 ms | build s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        index_ram = r["index_ram_bytes_per_passage"]
        lines.append(f"| {r['index']} | {r['memory_dtype']} | {r['disk_bytes_per_passage']['total']:,} | "
                     f"{'–' if index_ram is None else f'{index_ram:,}'} | {r['rss_growth_bytes_per_passage']:,} | "
                     f"{r['recall_at_10']:.3f} | {r['search_ms']['p50']} | {r['search_ms']['p95']} | "
                     f"{r['build_seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
