"""Answer and retrieval metrics of the CLaRa evaluation protocol.

Answers are normalised (lower-case, punctuation and the articles a/an/the removed, spaces
collapsed) before comparison; a prediction is scored against its best-matching gold answer.
"""

from __future__ import annotations

import random
import re
import statistics
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = {"yes", "no", "noanswer"}


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def cover_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when every word of a normalised gold answer is among the normalised prediction's
    words, in any order and not necessarily side by side ("acc": "Obama, Barack" covers
    "Barack Obama")."""
    words = set(normalize_answer(prediction).split())
    return float(any(gold and set(gold) <= words for gold in (normalize_answer(a).split() for a in answers)))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1; 0 when one side is yes/no/noanswer and the two differ."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    if (pred in _SPECIAL or gold in _SPECIAL) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def recall_at_k(ranked: Sequence[int], gold: Sequence[int], k: int, missing: int = 0) -> float:
    """|top-k ∩ gold| / (|gold| + missing): a supporting passage ``missing`` from the pool is
    one no retriever finds."""
    if not gold and not missing:
        return 0.0
    return len(set(ranked[:k]) & set(gold)) / (len(set(gold)) + missing)


def precision_at_k(ranked: Sequence[int], gold: Sequence[int], k: int) -> float:
    """|top-k ∩ gold| / k."""
    return len(set(ranked[:k]) & set(gold)) / k


def answer_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    return {"em": exact_match(prediction, answers), "f1": token_f1(prediction, answers),
            "cover_em": cover_exact_match(prediction, answers)}


def mean_answer_scores(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> dict[str, float | list[float]]:
    """EM, F1 and cover-EM in percent, averaged over the predictions, and F1's 95 % interval:
    on a few hundred questions F1 moves by points with the sample, so a change is read against it."""
    return summarize_answer_scores([answer_scores(p, answers) for p, answers in zip(predictions, answer_lists)])


def summarize_answer_scores(scores: Sequence[dict[str, float]]) -> dict[str, float | list[float]]:
    """``mean_answer_scores`` from each question's ``answer_scores`` (0–1)."""
    means = {name: round(100 * statistics.mean(s[name] for s in scores), 2) for name in ("em", "f1", "cover_em")}
    return {**means, "f1_interval": bootstrap_interval([100 * s["f1"] for s in scores])}


def bootstrap_interval(values: Sequence[float], draws: int = 2000, seed: int = 0) -> list[float]:
    """The 95 % percentile-bootstrap interval of the mean of ``values`` (seeded: reruns agree).

    Given per-question differences between two systems on the same rows, it is the interval of
    the paired difference."""
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    return [round(means[int(0.025 * draws)], 2), round(means[int(0.975 * draws) - 1], 2)]


def paired_difference(first: Sequence[float], second: Sequence[float]) -> tuple[float, list[float]]:
    """The mean of the per-question differences of two systems on the same rows, and its 95 %
    bootstrap interval: sharper than comparing the two systems' own intervals."""
    if len(first) != len(second):
        raise ValueError(f"paired results must score the same questions: got {len(first)} and {len(second)} scores")
    differences = [a - b for a, b in zip(first, second)]
    return round(statistics.fmean(differences), 2), bootstrap_interval(differences)


