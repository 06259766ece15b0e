"""Cosine over retrieval keys of memories and the straight-through top-k, checked numerically."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from clara_plugins import InvalidInputError, TrainConfig, cosine_scores, straight_through_topk, top_k
from clara_plugins.config import RETRIEVAL_KEYS
from clara_plugins.retrieval import retrieval_keys


def reference_soft_picks(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """The sequential-softmax surrogate written out pick by pick, without any trick."""
    logits = scores / temperature
    order = logits.topk(k, dim=-1).indices
    rows = []
    for b in range(scores.size(0)):
        taken = torch.zeros(scores.size(1), dtype=torch.bool)
        picks = []
        for j in range(k):
            picks.append(torch.softmax(torch.where(taken, float("-inf"), logits[b]), dim=-1))
            taken = taken.clone()
            taken[order[b, j]] = True
        rows.append(torch.stack(picks))
    return torch.stack(rows)


def test_forward_is_the_exact_hard_topk_sorted_by_score():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5], [0.8, 0.2, 0.6, 0.4, 0.0]])
    weights = straight_through_topk(scores, k=3, temperature=0.5)
    assert weights.shape == (2, 3, 5)
    assert torch.equal(weights.argmax(-1), torch.tensor([[1, 3, 4], [0, 2, 3]]))
    assert torch.allclose(weights, F.one_hot(weights.argmax(-1), 5).float(), atol=1e-6)
    values = torch.arange(5.0).unsqueeze(-1)  # candidate "vectors"
    assert torch.equal((weights @ values).squeeze(-1), torch.tensor([[1.0, 3.0, 4.0], [0.0, 2.0, 3.0]]))


def test_a_later_pick_never_falls_back_onto_an_earlier_one():
    # masked by log(1e-8), an earlier pick stood only 18 nats lower: at temperature 0.02 a
    # cosine gap above 0.37 left 98 % of the second pick's soft row on the first pick
    scores = torch.tensor([[0.90, 0.45, 0.40]], requires_grad=True)
    weights = straight_through_topk(scores, k=2, temperature=0.02)
    weights[0, 1, 0].backward()  # the second pick's weight on the first pick's candidate
    assert torch.equal(scores.grad, torch.zeros_like(scores))
    assert torch.equal(weights.detach(), torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))


def test_gradient_reaches_scores_and_equals_the_sequential_softmax_gradient():
    torch.manual_seed(0)
    scores = torch.randn(3, 7, requires_grad=True)
    target = torch.randn(3, 2, 7)
    (straight_through_topk(scores, k=2, temperature=0.3) * target).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0

    reference_scores = scores.detach().clone().requires_grad_(True)
    (reference_soft_picks(reference_scores, 2, 0.3) * target).sum().backward()
    assert torch.allclose(scores.grad, reference_scores.grad, atol=1e-5)


def test_gradient_matches_finite_differences_of_the_surrogate():
    torch.manual_seed(1)
    scores = torch.randn(1, 5, dtype=torch.float64)
    target = torch.randn(1, 2, 5, dtype=torch.float64)
    x = scores.clone().requires_grad_(True)
    (straight_through_topk(x, k=2, temperature=0.5).double() * target).sum().backward()
    eps = 1e-6
    for i in range(5):
        bump = torch.zeros_like(scores)
        bump[0, i] = eps
        plus = (reference_soft_picks(scores + bump, 2, 0.5) * target).sum()
        minus = (reference_soft_picks(scores - bump, 2, 0.5) * target).sum()
        assert abs(float(x.grad[0, i]) - float((plus - minus) / (2 * eps))) < 1e-4


def test_lower_temperature_gives_sharper_gradients():
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    target = torch.tensor([[[1.0, -1.0, 2.0, 0.5]]])
    norms = []
    for temperature in (1.0, 0.1):
        x = scores.clone().requires_grad_(True)
        (straight_through_topk(x, 1, temperature) * target).sum().backward()
        norms.append(x.grad.norm())
    assert norms[1] > norms[0]


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="k must be"):
        straight_through_topk(torch.zeros(1, 3), k=4, temperature=0.02)
    with pytest.raises(ValueError, match="temperature"):
        straight_through_topk(torch.zeros(1, 3), k=1, temperature=0)


def test_the_flat_key_compares_memory_vectors_position_by_position_and_the_mean_key_does_not():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, n=2, h=2]
    swapped = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # same mean, different order
    pool = torch.cat([query.clone(), swapped])
    assert torch.allclose(cosine_scores(query, pool, "flat"), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(cosine_scores(query, pool, "mean"), torch.tensor([[1.0, 1.0]]))


@pytest.mark.parametrize("key, keys_of", [("flat", lambda m: m.flatten(-2)), ("mean", lambda m: m.mean(-2))])
def test_cosine_accepts_one_pool_per_query(key, keys_of):
    torch.manual_seed(2)
    queries, pools = torch.randn(2, 3, 4), torch.randn(2, 5, 3, 4)
    scores = cosine_scores(queries, pools, key)
    expected = F.cosine_similarity(keys_of(queries).unsqueeze(1), keys_of(pools), dim=-1)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_an_unknown_retrieval_key_is_refused():
    with pytest.raises(ValueError, match="retrieval key must be one of"):
        retrieval_keys(torch.zeros(1, 2, 3), "max")


@pytest.mark.parametrize("key", ["flat", "mean"])
def test_top_k_is_the_one_pick_of_the_query_reasoner(key):
    torch.manual_seed(0)
    queries, pool = torch.randn(2, 4, 8), torch.randn(6, 4, 8)
    chosen, indices = top_k(queries, pool, 3, key)
    assert indices.tolist() == cosine_scores(queries, pool, key).topk(3).indices.tolist()
    assert torch.equal(chosen[1], pool[indices[1]])
    per_query, same = top_k(queries, pool.expand(2, -1, -1, -1), 3, key)
    assert torch.equal(per_query, chosen) and torch.equal(same, indices)
    few, order = top_k(queries, pool[:2], 3, key)  # fewer than k: all kept, still best first
    assert order.tolist() == cosine_scores(queries, pool[:2], key).argsort(descending=True).tolist()
    assert sorted(order[0].tolist()) == [0, 1] and torch.equal(few[0], pool[order[0]])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_k(queries, pool, 0, key)


def test_the_gold_retrieval_loss_is_the_negative_log_softmax_mass_on_the_gold_candidates():
    from clara_plugins.training import _gold_retrieval_loss

    config = TrainConfig(stage="retrieval", temperature=0.5)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]], requires_grad=True)
    loss = _gold_retrieval_loss(scores, [[0, 2], []], config)  # the second row has no gold: left out
    probabilities = torch.softmax(scores[0].detach() / 0.5, dim=0)
    assert loss.item() == pytest.approx(-torch.log(probabilities[0] + probabilities[2]).item(), rel=1e-5)
    loss.backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0 and torch.all(scores.grad[1] == 0)
    assert _gold_retrieval_loss(scores, [[], []], config).item() == 0.0


def test_the_each_gold_term_ranks_every_gold_candidate_against_the_negatives_alone():
    from clara_plugins.training import _gold_retrieval_loss

    each = TrainConfig(stage="retrieval", temperature=1.0, gold_term="each")
    scores = torch.tensor([[5.0, 0.0, -5.0]], requires_grad=True)  # gold 0 ranked first, gold 2 last
    loss = _gold_retrieval_loss(scores, [[0, 2]], each)
    expected = (math.log1p(math.exp(-5.0)) + math.log1p(math.exp(5.0))) / 2  # each gold against candidate 1
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert scores.grad[0, 2] < -0.4 and scores.grad[0, 1] > 0  # the buried gold candidate is pulled up
    mass = _gold_retrieval_loss(scores.detach(), [[0, 2]], dataclasses.replace(each, gold_term="mass"))
    assert mass.item() < 0.01  # the mass is met by the first gold candidate alone
    with pytest.raises(ValueError, match="gold_term must be one of"):
        TrainConfig(stage="retrieval", gold_term="all")


def test_copies_of_a_document_score_alike_and_are_picked_in_candidate_order():
    # a matrix product rounded a score by the candidate's place: the later copy was picked
    # first about half the time (clara ask --docs on a file that repeats a paragraph)
    for seed in range(10):
        numbers = torch.Generator().manual_seed(seed)
        queries, pool = torch.randn(3, 16, 64, generator=numbers), torch.randn(5, 16, 64, generator=numbers)
        pool[4] = pool[0]
        for key in RETRIEVAL_KEYS:
            scores = cosine_scores(queries, pool, key)
            assert torch.equal(scores[:, 0], scores[:, 4])
            assert torch.equal(cosine_scores(queries, pool.expand(3, *pool.shape), key), scores)  # pools per query alike
            picked = top_k(queries, pool, 5, key)[1].tolist()
            assert all(row.index(0) < row.index(4) for row in picked)
    with pytest.raises(InvalidInputError, match=r"queries must be \[batch >= 1"):  # a bare "stack expects a non-empty"
        top_k(torch.zeros(0, 16, 64), pool, 2, "mean")


def test_tied_scores_are_picked_in_candidate_order():
    # topk broke ties in no set order ([1, 2] of three tied candidates), where the stores and BM25
    # keep row order: which document the generator reads first
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert torch.equal(straight_through_topk(scores, k=2, temperature=0.1).argmax(-1), torch.tensor([[0, 1]]))
    memories = torch.stack([torch.full((2, 4), 1.0), torch.full((2, 4), 1.0), torch.full((2, 4), 1.0)])
    assert top_k(torch.ones(1, 2, 4), memories, 2, "mean")[1].tolist() == [[0, 1]]
    # and picked from the scores: dividing by the temperature tied two that differ by one ulp
    close = torch.tensor([[0.3, torch.nextafter(torch.tensor(0.3), torch.tensor(1.0)).item(), 0.0]])
    assert straight_through_topk(close, k=1, temperature=0.7).argmax(-1).tolist() == [[1]]


def test_the_ranking_functions_refuse_what_they_cannot_rank():
    # a query without its batch dimension lost a pick unsaid; k=2.5 failed on a slice; a NaN temperature made W NaN
    pool = torch.randn(6, 4, 8)
    with pytest.raises(InvalidInputError, match=r"queries must be \[batch >= 1, n_mem, hidden\].*got \(4, 8\)"):
        top_k(torch.randn(4, 8), pool, 5, "mean")
    with pytest.raises(InvalidInputError, match="of the same hidden size"):
        top_k(torch.randn(2, 4, 16), pool, 5, "mean")
    for k in (2.5, True, 0):
        with pytest.raises(InvalidInputError, match="k must be a positive integer"):
            top_k(torch.randn(2, 4, 8), pool, k, "mean")
    with pytest.raises(InvalidInputError, match=r"flat keys compare memories of as many vectors: queries have 2, "
                                                 "candidates 4"):  # a bare "mat1 and mat2 shapes cannot be multiplied"
        top_k(torch.randn(1, 2, 8), pool, 3, "flat")
    assert top_k(torch.randn(1, 2, 8), pool, 3, "mean")[1].shape == (1, 3)  # pooled: any count of vectors compares
    with pytest.raises(ValueError, match="temperature must be a finite positive number, got nan"):
        straight_through_topk(torch.randn(2, 5), 2, float("nan"))
    for k in (2.0, True, 0):  # 2.0 failed on a slice, True picked one
        with pytest.raises(InvalidInputError, match="k must be a positive integer"):
            straight_through_topk(torch.randn(2, 5), k, 0.1)
    for name in ("lr", "margin", "temperature"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):  # lr=inf made every weight NaN at step 1
            TrainConfig(stage="e2e", **{name: math.inf})
