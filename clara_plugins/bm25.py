"""BM25 over passages: the baseline ranking, and the candidates it picks beside the gold ones.

An example's pool is filled up from other examples' passages when it is short (NQ has one
passage per question) and trimmed to the gold plus the best-ranked others when it is long.
"""

from __future__ import annotations

import dataclasses
import random

import bm25s
import numpy as np
from tqdm.auto import tqdm

from .corpora import QAExample
from .errors import InvalidInputError


def bm25_rank(query: str, passages: list[str]) -> list[int]:
    """Passage indices, best BM25 match first."""
    return _ranking(_index(passages), query)


def bm25_top(queries: list[str], passages: list[str], n: int) -> list[list[int]]:
    """For each query, the indices of the n passages it matches best, best first (one index)."""
    index = _index(passages)
    return [_ranking(index, query)[:n] for query in tqdm(queries, desc="ranking (BM25)", disable=len(queries) < 1000)]


def fill_short_pools(examples: list[QAExample], size: int) -> list[QAExample]:
    """Extend every pool shorter than ``size`` with the BM25-best passages of the other examples;
    the example's own passages and gold stay first."""
    if all(len(e.passages) >= size for e in examples):
        return examples
    everything = [(e.id, p) for e in examples for p in e.passages]
    pool_texts = [p for _, p in everything]
    index = _index(pool_texts)
    result = []
    for example in tqdm(examples, desc="filling pools (BM25)", disable=len(examples) < 1000):
        passages = list(example.passages)
        if len(passages) < size:
            extra = dict.fromkeys(pool_texts[i] for i in _ranking(index, example.question)
                                  if everything[i][0] != example.id and pool_texts[i] not in passages)
            passages += list(extra)[: size - len(passages)]  # a passage other examples share comes once
        result.append(dataclasses.replace(example, passages=passages))
    return result


def with_candidates(examples: list[QAExample], size: int, seed: int = 0) -> list[QAExample]:
    """Give every example ``size`` candidates in a seeded order: short pools are filled with
    other examples' passages, long pools trimmed to the gold plus the best-ranked others."""
    rng = random.Random(seed)
    result = []
    for example in fill_short_pools(examples, size):
        passages, gold = list(example.passages), list(example.gold)
        if len(gold) > size:  # the slice below would go negative and keep nearly every passage
            raise InvalidInputError(f"example {example.id} has {len(gold)} gold passages, more than the {size} "
                                    "candidates asked for")
        if len(passages) > size:
            ranked = [i for i in bm25_rank(example.question, passages) if i not in gold]
            keep = sorted(gold + ranked[: size - len(gold)])
            gold = [keep.index(i) for i in gold]
            passages = [passages[i] for i in keep]
        order = list(range(len(passages)))
        rng.shuffle(order)
        result.append(dataclasses.replace(example, passages=[passages[i] for i in order],
                                          gold=sorted(order.index(i) for i in gold)))
    return result


def _index(passages: list[str]) -> bm25s.BM25:
    index = bm25s.BM25()
    index.index(bm25s.tokenize(passages, show_progress=False), show_progress=False)
    return index


def _ranking(index: bm25s.BM25, query: str) -> list[int]:
    """Every passage index, best first; a query of stopwords alone ("Is it?") scores all alike."""
    words = bm25s.tokenize(query, show_progress=False, return_ids=False)[0]
    scores = index.get_scores(words) if words else np.zeros(index.scores["num_docs"])
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]
