"""Evaluating answers and retrieval on converted rows ({question, docs, answers, pos_index}).

Systems, all on one backbone:
- ``clara``: the documents compressed into memory tokens; with more than k documents the
  query reasoner keeps the top-k (and Recall@k is measured);
- ``text``: the plain base model reading the documents as text (text RAG);
- ``none``: the plain base model with no documents.
Retrievers for Recall@k / Precision@k: ``reasoner`` (CLaRa's query reasoner over memory
tokens), ``compressor`` (the question compressed like a document: the untrained reasoner),
``dense`` (a sentence-transformers model) and ``bm25``.
``evaluate_reading`` asks whether the generator reads its memory tokens at all.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .context import keep_top_k
from .datasets import bm25_rank
from .dense import DenseRetriever
from .metrics import mean_answer_scores, mean_recall_at_k, precision_at_k
from .model import ClaraModel
from .prompts import memory_prompts
from .retrieval import cosine_scores

SYSTEMS = ("clara", "text", "none")
RETRIEVERS = ("reasoner", "compressor", "dense", "bm25")


def evaluate_answers(model: ClaraModel, rows: Sequence[dict], system: str = "clara", k: int = 5,
                     max_new_tokens: int = 32, batch_size: int = 4) -> dict:
    """EM, F1 and cover-EM of one system, with its predictions and context positions."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    predictions, positions, seconds = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"answering ({system})"):
        batch = rows[start:start + batch_size]
        questions = [row["question"] for row in batch]
        began = time.perf_counter()
        if system == "clara":
            answers, counts = _clara_answers(model, batch, k, max_new_tokens)
        else:
            documents = [row["docs"][:k] if system == "text" else [] for row in batch]
            answers = model.generate_reading_text(questions, documents, max_new_tokens)
            counts = [model.text_prompt_positions(q, d) for q, d in zip(questions, documents)]
        seconds.append((time.perf_counter() - began) / len(batch))
        predictions.extend(answers)
        positions.extend(counts)
    return {
        "system": system, "examples": len(rows), "k": k,
        **mean_answer_scores(predictions, [row.get("answers") or [row["answer"]] for row in rows]),
        "context_positions": round(statistics.mean(positions), 1),
        "seconds_per_question": round(statistics.mean(seconds), 3),
        "predictions": [{"question": r["question"], "prediction": p, "answers": r.get("answers") or [r["answer"]]}
                        for r, p in zip(rows, predictions)],
    }


def _clara_answers(model: ClaraModel, batch: Sequence[dict], k: int, max_new_tokens: int) -> tuple[list[str], list[int]]:
    groups = [keep_top_k(model, row["question"], model.compress_documents(row["docs"]), k) for row in batch]
    questions = [row["question"] for row in batch]
    if len({len(g) for g in groups}) == 1:
        answers = model.generate_from_compressed_documents_and_questions(questions, torch.stack(groups),
                                                                         max_new_tokens)
    else:
        answers = [model.generate_from_compressed_documents_and_questions([q], g.unsqueeze(0), max_new_tokens)[0]
                   for q, g in zip(questions, groups)]
    return answers, [model.prompt_positions(q, len(g)) for q, g in zip(questions, groups)]


def evaluate_reading(model: ClaraModel, rows: Sequence[dict], k: int = 5, batch_size: int = 4) -> dict:
    """The targets' cross-entropy (nats per token) read from each row's own documents (the
    first k or fewer of an instruction row, the one of an SCP row), and from the next row's.

    A generator that ignores its memory tokens scores the same on both; the gap,
    ``reading_gain``, shows whether training has taught it to read long before F1 moves. The
    CE from the mean of all rows' memories (``neutral``) tells reading apart from harm: own
    memories below it are read, other memories above it only hurt.
    """
    width = {1 if "data_type" in row else min(k, len(row["docs"])) for row in rows}
    if len(rows) < 2 or len(width) != 1:
        raise ValueError(f"reading needs at least 2 rows that each read the same number of documents "
                         f"(SCP rows, or instruction rows with min(k={k}, their documents)), got {sorted(width)}")
    width = width.pop()
    documents = [document for row in rows for document in row["docs"][:width]]
    memories = model.compress_documents(documents, show_progress=True)
    memories = memories.reshape(len(rows), width, *memories.shape[1:])
    neutral = memories.mean(0, keepdim=True)  # no row's own content: separates reading from harm
    totals = {"own": 0.0, "neutral": 0.0, "other": 0.0}
    tokens = 0
    for start in tqdm(range(0, len(rows), batch_size), desc="reading"):
        batch = rows[start:start + batch_size]
        prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, batch, width)
        own = memories[start:start + len(batch)]
        other = memories[[(i + 1) % len(rows) for i in range(start, start + len(batch))]]
        with torch.no_grad():
            for name, read in (("own", own), ("neutral", neutral.expand_as(own)), ("other", other)):
                log_likelihood, counts = model.completion_log_likelihood(prompts, full, read)
                totals[name] -= float(log_likelihood.sum())
            tokens += int(counts.sum())
    own_ce, neutral_ce, other_ce = (totals[name] / tokens for name in ("own", "neutral", "other"))
    return {"examples": len(rows), "documents_per_row": width, "target_ce_own_documents": round(own_ce, 4),
            "target_ce_neutral_documents": round(neutral_ce, 4),
            "target_ce_other_documents": round(other_ce, 4), "reading_gain": round(other_ce - own_ce, 4)}


def evaluate_retrieval(rows: Sequence[dict], retrievers: Sequence[str], model: ClaraModel | None = None,
                       dense: DenseRetriever | None = None, ks: Sequence[int] = (1, 3, 5)) -> list[dict]:
    """Recall@k and Precision@k of each retriever ranking the rows' candidates against pos_index.

    ``compressor`` encodes the question with the compressor adapter: the query reasoner an
    end-to-end run starts from. Each pool is compressed once for both memory-token retrievers.
    """
    unknown = [name for name in retrievers if name not in RETRIEVERS]
    if unknown:
        raise ValueError(f"retriever must be one of {RETRIEVERS}, got {unknown[0]!r}")
    rows = [row for row in rows if row.get("pos_index")]
    rankings: dict[str, list[list[int]]] = {name: [] for name in retrievers}
    for row in tqdm(rows, desc=f"ranking ({', '.join(retrievers)})"):
        memories = None
        for name in retrievers:
            if name in ("reasoner", "compressor"):
                memories = model.compress_documents(row["docs"]) if memories is None else memories
                encode = model.encode_queries if name == "reasoner" else model.compress_documents
                scores = cosine_scores(encode([row["question"]]), memories)[0]
                rankings[name].append(scores.argsort(descending=True).tolist())
            elif name == "dense":
                rankings[name].append(dense.rank(row["question"], row["docs"]))
            else:
                rankings[name].append(bm25_rank(row["question"], row["docs"]))
    return [_ranking_scores(name, ranked, rows, ks) for name, ranked in rankings.items()]


def _ranking_scores(retriever: str, rankings: list[list[int]], rows: list[dict], ks: Sequence[int]) -> dict:
    result = {"retriever": retriever, "examples": len(rows)}
    for k in ks:
        result[f"recall@{k}"] = mean_recall_at_k(rankings, [row["pos_index"] for row in rows], k)
        result[f"precision@{k}"] = round(100 * statistics.mean(
            precision_at_k(r, row["pos_index"], k) for r, row in zip(rankings, rows)), 2)
    return result
