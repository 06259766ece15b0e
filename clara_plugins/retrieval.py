"""Scoring and selecting documents by their memory tokens.

A query and a document are compared through the cosine of their retrieval keys, in fp32,
computed from their memory states [n_mem, hidden] (``ClaraConfig.retrieval_key``):

- ``"flat"``: the memory flattened to [n_mem * hidden] (the paper's key, and Apple's), which
  compares the question's memory vector i with the document's vector i;
- ``"mean"``: the mean memory vector [hidden]. Pooled memories summarise chunks of the text in
  order, and a question's chunk i has nothing to do with a document's chunk i: the mean key
  retrieves better from the same memories, and is n_mem times smaller.

The top-k is picked with a straight-through estimator so that the language-modelling loss of
the generator reaches the query reasoner.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_positive_int
from .config import RETRIEVAL_KEYS
from .errors import InvalidInputError

_PRODUCT_ELEMENTS = 1 << 24  # the most query-candidate products ``cosine_scores`` holds at once (64 MiB)


def retrieval_keys(memories: torch.Tensor, key: str) -> torch.Tensor:
    """[..., n_mem, hidden] -> unit-norm fp32 keys: [..., n_mem * hidden] ("flat") or [..., hidden] ("mean")."""
    memories = memories.float()
    if key == "flat":
        vectors = memories.flatten(start_dim=-2)
    elif key == "mean":
        vectors = memories.mean(dim=-2)
    else:
        raise ValueError(f"retrieval key must be one of {RETRIEVAL_KEYS}, got {key!r}")
    return F.normalize(vectors, dim=-1)


def cosine_scores(queries: torch.Tensor, candidates: torch.Tensor, key: str) -> torch.Tensor:
    """Cosine similarity of the retrieval keys of memories.

    queries: [B, n_mem, hidden]. candidates: [N, n_mem, hidden] (one shared pool) or
    [B, N, n_mem, hidden] (one pool per query). Returns scores [B, N] in fp32.

    Each score is a product summed along one candidate's key, not a matrix product, whose
    blocking rounded a score by the candidate's place: copies of one document scored a last bit
    apart, and the later copy could be picked first (as ``MemoryStore`` scores).
    """
    q = retrieval_keys(queries, key)
    c = retrieval_keys(candidates, key).to(q.device)  # stored memories stay on the CPU beside a GPU model
    step = max(1, _PRODUCT_ELEMENTS // max(1, len(q) * c.size(-1)))  # a part of the pool at a time: [B, step, d]
    return torch.cat([(q.unsqueeze(1) * part).sum(-1) for part in c.split(step, dim=-2)], dim=1)


def best_first(scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Indices of the k highest scores along the last dimension (all without k), best first,
    ties in index order as ``MemoryStore`` and BM25 break them (``topk`` breaks them in no set order)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order if k is None else order[..., :k]


def top_k(queries: torch.Tensor, candidates: torch.Tensor, k: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The query reasoner's pick: the k candidates of highest cosine, best first.

    queries [B, n_mem, hidden]; candidates [N, n_mem, hidden] (shared) or [B, N, n_mem, hidden].
    Returns the chosen memories [B, k', n_mem, hidden] and their indices [B, k'], where
    k' = min(k, N). With k or fewer candidates all are kept, still best first: the generator
    reads its first document most (docs/training-run.md, nineteenth session), so the order
    is part of the choice.
    """
    check_positive_int("k", k)  # 2.5 failed on a slice
    if queries.dim() != 3 or not len(queries) or candidates.dim() not in (3, 4) \
            or queries.size(-1) != candidates.size(-1) \
            or (candidates.dim() == 4 and len(candidates) != len(queries)):  # one query [n_mem, hidden] lost picks
        raise InvalidInputError(f"queries must be [batch >= 1, n_mem, hidden] and candidates [N, n_mem, hidden] or [batch, "
                                f"N, n_mem, hidden] of the same hidden size, got {tuple(queries.shape)} and "
                                f"{tuple(candidates.shape)}")
    if key not in RETRIEVAL_KEYS:
        raise ValueError(f"retrieval key must be one of {RETRIEVAL_KEYS}, got {key!r}")
    if key == "flat" and queries.size(-2) != candidates.size(-2):  # a bare "mat1 and mat2 shapes cannot be multiplied"
        raise InvalidInputError(f"flat keys compare memories of as many vectors: queries have {queries.size(-2)}, "
                                f"candidates {candidates.size(-2)}")
    pools = candidates.unsqueeze(0).expand(len(queries), *candidates.shape) if candidates.dim() == 3 else candidates
    indices = best_first(cosine_scores(queries, candidates, key), k).cpu()
    return torch.stack([pool[picked.to(pool.device)] for pool, picked in zip(pools, indices)]), indices


def straight_through_topk(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Differentiable top-k selection matrix W [B, k, N].

    Forward value: the exact hard top-k, one one-hot row per pick, ordered by descending score
    (ties in index order).
    Backward: the gradient of a sequential softmax, where pick j is a softmax over
    scores / temperature with the earlier picks masked out. No noise is added.
    Selected items are ``W @ candidates``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, candidates], got shape {tuple(scores.shape)}")
    n_candidates = scores.size(1)
    check_positive_int("k", k)  # 2.0 failed on a slice, and True picked one
    if not k <= n_candidates:
        raise ValueError(f"k must be in 1..{n_candidates} (number of candidates), got {k}")
    if not 0 < temperature < math.inf:  # NaN made every weight NaN
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")

    logits = scores.float() / temperature
    top_indices = best_first(scores, k)  # of the scores: dividing them can tie two that differ
    hard = F.one_hot(top_indices, n_candidates).to(logits.dtype)  # [B, k, N]

    soft_rows = []
    taken = torch.zeros_like(logits)
    for pick in range(k):
        # earlier picks out for good: log(1e-8) lowered them by 18 nats only, less than a cosine
        # gap of 0.37 at temperature 0.02, and later soft rows fell back onto them
        soft_rows.append(F.softmax(logits.masked_fill(taken.bool(), float("-inf")), dim=-1))
        taken = taken + hard[:, pick]
    soft = torch.stack(soft_rows, dim=1)
    return hard + (soft - soft.detach())
