"""Which systems a benchmark run compares, and running one of them over the sampled questions.

Each system runs in a process of its own (``run_system`` is the child's entry point), so its
peak resident memory is its own and no model of another system shares its caches.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clara_plugins import ClaraConfig, ClaraModel
from clara_plugins.config import DEFAULT_BASE_MODEL
from clara_plugins.metrics import mean_answer_scores
from clara_plugins.model import ENCODER, QUERY_REASONER, copy_adapter
from clara_plugins.rows import gold_count, row_recall

from .dense import DEFAULT_DENSE_MODEL, DenseEmbeddings, DenseRetriever
from .measure import latency_ms, peak_rss_mb
from .pipelines import LangChainTextRAG, LlamaIndexBM25RAG, LlamaIndexClaraRAG

COMPRESSION_RATES = (4, 16, 32)


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One row of the results table.

    ``retriever``: none, bm25, dense or clara. ``reader``: base (the plain backbone reads
    text), text-ft (a decoder adapter fine-tuned on text reads it) or clara (memory tokens).
    ``query``: for CLaRa, "compressor" (the question encoded by the document compressor) or
    "reasoner" (the end-to-end trained query reasoner).
    """

    name: str
    retriever: str
    reader: str
    checkpoint: str | None = None  # None: an untrained model of base_model
    compression_rate: int = 16
    query: str = "reasoner"
    base_model: str = DEFAULT_BASE_MODEL  # a checkpoint's own, which the systems without one share


def default_systems(clara: dict[int, str], clara_e2e: dict[int, str], text_ft: str | None,
                    shipped: str | None = None) -> list[SystemSpec]:
    """The benchmark's systems: no retrieval, BM25 and dense text RAG, fine-tuned text RAG when
    given, and CLaRa at 4, 16 and 32, plus any rate ``clara`` or ``clara_e2e`` names.

    At 4, 16 and 32 the compressor row reads the rate's ``clara`` checkpoint, else ``shipped``
    at that rate (pooled memories are chunk means, so one checkpoint reads at any rate), else
    the untrained model; the end-to-end row reads its ``clara_e2e`` checkpoint, else
    ``shipped`` when ``clara`` names none for the rate, so that a named checkpoint is not
    scored beside another's query reasoner. Another rate gets only the rows named for it.
    """
    systems = [SystemSpec("no retrieval", "none", "base"),
               SystemSpec("BM25 + text", "bm25", "base"),
               SystemSpec("dense + text", "dense", "base")]
    if text_ft:
        systems.append(SystemSpec("dense + fine-tuned text", "dense", "text-ft", text_ft))
    for rate in sorted({*COMPRESSION_RATES, *clara, *clara_e2e}):
        standard_rate = rate in COMPRESSION_RATES
        if standard_rate or rate in clara:
            systems.append(SystemSpec(f"CLaRa CR{rate} compressor", "clara", "clara",
                                      clara.get(rate, shipped if standard_rate else None), rate, "compressor"))
        end_to_end = clara_e2e.get(rate, shipped if standard_rate and rate not in clara else None)
        if end_to_end:
            systems.append(SystemSpec(f"CLaRa CR{rate} end-to-end", "clara", "clara", end_to_end, rate))
    return systems


@dataclasses.dataclass(frozen=True)
class RunOptions:
    k: int = 5
    max_new_tokens: int = 32
    dense_model: str = DEFAULT_DENSE_MODEL
    query_instruction: str = ""
    passage_instruction: str = ""
    threads: int = 0  # 0: torch's default


def _load_clara(spec: SystemSpec) -> ClaraModel:
    if spec.checkpoint:
        # a text reader reads no memories: it loads at its own rate (a tokens-design one at another than 16 failed)
        rate = spec.compression_rate if spec.retriever == "clara" else None
        model = ClaraModel.from_pretrained(spec.checkpoint, compression_rate=rate, device="cpu")
    else:
        model = ClaraModel(ClaraConfig(base_model=spec.base_model, compression_rate=spec.compression_rate), device="cpu")
    if spec.query == "compressor":
        copy_adapter(model, ENCODER, QUERY_REASONER)
    return model


def build_pipeline(spec: SystemSpec, model: ClaraModel,
                   options: RunOptions) -> LangChainTextRAG | LlamaIndexBM25RAG | LlamaIndexClaraRAG:
    if spec.retriever == "clara":
        return LlamaIndexClaraRAG(model, options.k, options.max_new_tokens)
    if spec.retriever == "bm25":
        return LlamaIndexBM25RAG(model, options.k, options.max_new_tokens)
    embeddings = None
    if spec.retriever == "dense":
        embeddings = DenseEmbeddings(DenseRetriever(options.dense_model, options.query_instruction,
                                                    passage_instruction=options.passage_instruction))
    return LangChainTextRAG(model, embeddings, options.k, options.max_new_tokens)


def run_system(spec: SystemSpec, rows: list[dict], options: RunOptions) -> dict:
    """Answer every row with one system; quality, retrieval, latency per stage, memory."""
    if options.threads:
        torch.set_num_threads(options.threads)
    began = time.perf_counter()
    model = _load_clara(spec)
    pipeline = build_pipeline(spec, model, options)
    load_seconds = time.perf_counter() - began
    # one untimed question first: lazy set-up (kernels, tokenizers, the dense encoder's first
    # batch) would otherwise land in the first timed one, and p95 of a small sample is mostly it
    pipeline.index(rows[0]["docs"])
    pipeline.retrieve(rows[0]["question"])
    pipeline.generate(rows[0]["question"])
    stages: dict[str, list[float]] = {"index": [], "retrieve": [], "generate": []}
    first_piece: list[float] = []
    predictions, positions, rankings = [], [], []
    indexed = 0
    for row in tqdm(rows, desc=spec.name, unit="question"):
        clock = time.perf_counter()
        pipeline.index(row["docs"])
        stages["index"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        rankings.append(pipeline.retrieve(row["question"]))
        stages["retrieve"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        answer, read, first = pipeline.generate(row["question"])
        stages["generate"].append(time.perf_counter() - clock)
        first_piece.append(first)
        predictions.append(answer)
        positions.append(read)
        indexed += len(row["docs"])
    with tempfile.TemporaryDirectory() as folder:  # the last pool's index, persisted
        stored = pipeline.index_bytes(Path(folder))
    totals = [sum(parts) for parts in zip(*stages.values())]
    # what a user waits for once the question is asked: its retrieval and the reading (CLaRa's
    # query-reasoner pass took about 140 ms a question against MiniLM's 12)
    to_first_token = [retrieve + first for retrieve, first in zip(stages["retrieve"], first_piece)]
    to_answer = [retrieve + generate for retrieve, generate in zip(stages["retrieve"], stages["generate"])]
    result = {
        **dataclasses.asdict(spec), "framework": pipeline.framework,
        "questions": len(rows),
        **mean_answer_scores(predictions, [row["answers"] for row in rows]),
        "context_positions": round(statistics.mean(positions), 1),
        "latency_ms": {**{stage: latency_ms(seconds) for stage, seconds in stages.items()},
                       "first_token": latency_ms(first_piece), "total": latency_ms(totals),
                       "question_to_first_token": latency_ms(to_first_token),
                       "question_to_answer": latency_ms(to_answer)},
        "output_tokens": round(statistics.mean(len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions), 1),
        "docs_per_second": round(indexed / sum(stages["index"]), 1) if spec.retriever != "none" else None,
        "index_bytes_per_doc": round(stored / len(rows[-1]["docs"])) if stored is not None else None,
        "peak_rss_mb": peak_rss_mb(),
        "load_seconds": round(load_seconds, 1),
        "predictions": [{"question": row["question"], "prediction": p, "answers": row["answers"],
                         "retrieved": r} for row, p, r in zip(rows, predictions, rankings)],
    }
    measured = [(r, row) for r, row in zip(rankings, rows) if gold_count(row)]  # questions with gold passages
    for k in (1, 3, 5):  # a pipeline returns its top options.k: recall at a larger k is not measured
        result[f"recall@{k}"] = (round(100 * statistics.mean(row_recall(r, row, k) for r, row in measured), 2)
                                 if measured and spec.retriever != "none" and k <= options.k else None)
    return result
