"""BM25 over passages: the baseline ranking, and the candidates it picks beside the gold ones.

An example's pool is filled up from other examples' passages when it is short (NQ has one
passage per question) and trimmed to the gold plus the best-ranked others when it is long.
Words are bm25s's: two characters or more, English stopwords out ("Apollo 8" is "apollo"). A
ranking that kept one-character words would change the recipe's rows and every BM25 number
the docs give, so it waits for a retrain.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import warnings
from collections.abc import Callable

import bm25s
import numpy as np
from tqdm.auto import tqdm

from .corpora import QAExample, same_evidence, spaced_alike, word_grams
from .errors import InvalidInputError


def bm25_rank(query: str, passages: list[str]) -> list[int]:
    """Passage indices, best BM25 match first."""
    return _best(_index(passages), query, len(passages))


def bm25_top(queries: list[str], passages: list[str], n: int) -> list[list[int]]:
    """For each query, the indices of the n passages it matches best, best first (one index)."""
    rank = bm25_ranker(passages)
    return [rank(query, n) for query in tqdm(queries, desc="ranking (BM25)", disable=len(queries) < 1000)]


def bm25_ranker(passages: list[str]) -> Callable[[str, int], list[int]]:
    """``rank(query, n)``: the indices of the n passages the query matches best, best first,
    the passages indexed once for every query."""
    return functools.partial(_best, _index(passages))


def fill_short_pools(examples: list[QAExample], size: int, stacklevel: int = 2) -> list[QAExample]:
    """Extend every pool shorter than ``size`` with the BM25-best passages of the other examples;
    the example's own passages and gold stay first. A passage that holds the example's own
    evidence is no distractor, and is not added: another window of a gold paragraph (NQ gives
    one paragraph to several questions), or a supporting paragraph its pool lacks (HotpotQA's
    dev sample), either of which was added unmarked and counted as a miss when ranked first.
    A warning of pools left short names the line ``stacklevel`` counts from the caller."""
    if all(len(e.passages) >= size for e in examples):
        return examples
    owners = [e.id for e in examples for _ in e.passages]
    pool_texts = [p for e in examples for p in e.passages]
    pool_keys = [spaced_alike(p) for p in pool_texts]  # a paragraph two examples space otherwise is one
    index = _index(pool_texts)
    result = []
    for example in tqdm(examples, desc="filling pools (BM25)", disable=len(examples) < 1000):
        passages = list(example.passages)
        wanted = size - len(passages)
        ranked = 4 * size  # enough, unless the best ones are mostly the example's own or repeats
        own = {spaced_alike(p) for p in passages}  # its gold, spaced otherwise, is no distractor
        gold_grams = [word_grams(passages[i]) for i in example.gold]  # each alone: a short one is held whole
        evidence: dict[str, bool] = {}  # a passage's key: whether it holds the example's own evidence
        while wanted > 0:
            extra: dict[str, str] = {}  # a passage other examples share (or space otherwise) comes once
            for i in _best(index, example.question, ranked):
                key = pool_keys[i]
                if owners[i] == example.id or key in own or key in extra:
                    continue
                if key not in evidence:
                    evidence[key] = (pool_texts[i].partition("\n")[0] in example.missing_titles
                                     or any(same_evidence(pool_texts[i], grams) for grams in gold_grams))
                if not evidence[key]:
                    extra[key] = pool_texts[i]
                    if len(extra) == wanted:
                        break
            if len(extra) >= wanted or ranked >= len(pool_texts):
                passages += list(extra.values())[:wanted]
                break
            ranked *= 4
        result.append(dataclasses.replace(example, passages=passages))
    short = sum(len(example.passages) < size for example in result)
    if short:  # a Normal row then read most of its pool, an e2e row fewer candidates than asked
        warnings.warn(f"{short} of {len(result)} pools hold fewer than {size} passages: the other examples' "
                      "passages could not fill them (fill from more examples)", stacklevel=stacklevel + 1)
    return result


def with_candidates(examples: list[QAExample], size: int, seed: int = 0) -> list[QAExample]:
    """Give every example ``size`` candidates in a seeded order: short pools are filled with
    other examples' passages, long pools trimmed to the gold plus the best-ranked others."""
    rng = random.Random(seed)
    result = []
    filled = fill_short_pools(examples, size, stacklevel=3)  # the warning names the line that asked for e2e rows
    for example in tqdm(filled, desc="ranking pools (BM25)", disable=len(filled) < 1000):
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


@dataclasses.dataclass
class _Index:
    bm25: bm25s.BM25 | None  # None when no passage holds a word (bm25s refuses to index them)
    size: int


def _index(passages: list[str]) -> _Index:
    tokens = bm25s.tokenize(passages, show_progress=False)
    if not tokens.vocab:
        return _Index(None, len(passages))
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    return _Index(index, len(passages))


def _best(index: _Index, query: str, n: int) -> list[int]:
    """The indices of the n best passages, best first, ties in index order: the start of a stable
    sort of every score, without sorting (or walking) a whole corpus for each query. A query of
    stopwords alone ("Is it?"), or passages of stopwords alone ("The"), score all alike."""
    words = bm25s.tokenize(query, show_progress=False, return_ids=False)[0]
    scores = (np.asarray(index.bm25.get_scores(words)) if words and index.bm25 is not None
              else np.zeros(index.size))
    n = min(n, len(scores))
    if n <= 0:
        return []
    if n < len(scores):
        nth = np.partition(scores, len(scores) - n)[len(scores) - n]  # the n-th highest score
        above, tied = np.flatnonzero(scores > nth), np.flatnonzero(scores == nth)
        chosen = np.concatenate([above, tied[: n - len(above)]])
        chosen.sort()  # so that the stable sort below breaks ties by index
    else:
        chosen = np.arange(len(scores))
    return [int(i) for i in chosen[np.argsort(-scores[chosen], kind="stable")]]
