"""The reading gain: does the generator read its memory tokens at all?

Long before answers improve, the cross-entropy of the targets read from each row's own
memories against another row's shows whether training teaches the generator to read. The
trainer's probes and ``clara eval --reading`` both measure it here, over the targets' own tokens and
over three kinds of them (tokens with a digit, tokens that start with a capital letter, the
rest), since a memory can carry a passage's names and lose its numbers.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .corpora import passage_title, spaced_alike
from .model import ClaraModel
from .passes import completion_log_probs, token_log_likelihood
from .prompts import memory_prompts, turn_end_token

_TOKEN_KINDS = ("digits", "capitalised", "rest")


def first_row_beyond(rows: Sequence[dict], k: int) -> int | None:
    """The number of the first question row with more than k documents, or None. A reader of
    a row's first k documents would read such a row's as they stand, which in an end-to-end
    pool (a random order) are random candidates."""
    return next((n for n, row in enumerate(rows) if "data_type" not in row and len(row["docs"]) > k), None)


def reading_width(rows: Sequence[dict], k: int = 5) -> int:
    """The number of documents each row reads, refusing rows that cannot be compared: the
    gain reads another row's documents in each row's place, so all must read as many, and
    not all the same ones; and rows with more than k (``first_row_beyond``)."""
    return _width_and_partners(rows, k)[0]


def _width_and_partners(rows: Sequence[dict], k: int) -> tuple[int, list[int]]:
    """``reading_width``, and each row's partner of other evidence (``other_rows``)."""
    longer = first_row_beyond(rows, k)
    if longer is not None:
        raise ValueError(f"row {longer} has {len(rows[longer]['docs'])} documents, more than k={k}: the reading "
                         f"gain would read its first {k} as they stand, not the best ones; give rows of at most "
                         "k documents (clara convert-data --kind instruct)")
    width = {1 if "data_type" in row else min(k, len(row["docs"])) for row in rows}
    if len(rows) < 2 or len(width) != 1:
        raise ValueError(f"reading needs at least 2 rows that each read the same number of documents "
                         f"(SCP rows, or instruction rows with min(k={k}, their documents)), got {sorted(width)}")
    width = width.pop()
    partners = other_rows(rows, width)
    if None in partners:
        raise ValueError(f"reading compares each row's documents with another row's, and every other row reads "
                         f"row {partners.index(None)}'s evidence (its gold passages, or its documents where it names "
                         "none)")
    return width, partners


def evaluate_reading(model: ClaraModel, rows: Sequence[dict], k: int = 5, batch_size: int = 4,
                     memories: dict[tuple[str, ...], torch.Tensor] | None = None) -> dict:
    """The targets' cross-entropy (nats per token) read from each row's own documents (an
    instruction row's, at most k; the one of an SCP row), and from those of the next
    row that holds none of its evidence (``other_rows``). The targets are the answer's (or the
    passage's) own tokens: not the template's turn end (``<|im_end|>\n``), where generation
    stops, whose near-certain line break was a third of an NQ answer's targets.

    A generator that ignores its memory tokens scores the same on both; the gap,
    ``reading_gain``, shows whether training has taught it to read long before F1 moves. The
    CE from the mean of all rows' memories (``neutral``) tells reading apart from harm: own
    memories below it are read, other memories above it only hurt. ``by_token_kind`` repeats
    the measures for each kind of target token the rows hold. ``memories`` (a row's documents →
    their memory tokens, ``compressed_pools``) keeps what other measures of the same model
    compressed, and what this one compresses, for them.
    """
    width, partners = _width_and_partners(rows, k)
    memories = torch.stack(compressed_pools(model, [row["docs"][:width] for row in rows], memories,
                                            show_progress=True))  # [rows, width, n_mem, hidden]
    # all rows' mean, each row's own a 1/len(rows) share of it: little of any one row's content,
    # so that reading (own below neutral) is told from harm (other above neutral)
    neutral = memories.mean(0, keepdim=True)
    kind_of = _token_kinds(model.tokenizer).to(memories.device)
    stop = turn_end_token(model.tokenizer)
    totals = torch.zeros(3, len(_TOKEN_KINDS), dtype=torch.float64)  # -log-likelihood: own, neutral, other
    tokens = torch.zeros(len(_TOKEN_KINDS), dtype=torch.float64)
    for start in tqdm(range(0, len(rows), batch_size), desc="reading", leave=None):  # a probe's, under training's bar
        batch = rows[start:start + batch_size]
        prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, batch, width)
        own = memories[start:start + len(batch)]
        other = memories[partners[start:start + len(batch)]]
        with torch.no_grad():
            for read, read_memories in enumerate((own, neutral.expand_as(own), other)):
                log_probs, labels = completion_log_probs(model, prompts, full, read_memories)
                log_likelihood, valid = token_log_likelihood(log_probs, labels)
                valid &= _before(stop, labels)
                if read == 0:  # the three passes predict the same targets
                    kinds = kind_of[labels[valid]].cpu()  # summed in float64, which MPS lacks: on the CPU
                    tokens += torch.bincount(kinds, minlength=len(_TOKEN_KINDS))
                totals[read] -= torch.bincount(kinds, weights=log_likelihood[valid].cpu().double(),
                                               minlength=len(_TOKEN_KINDS))
    result = {"examples": len(rows), "documents_per_row": width, **_cross_entropies(totals.sum(1), tokens.sum())}
    result["by_token_kind"] = {kind: {"tokens": int(tokens[i]), **_cross_entropies(totals[:, i], tokens[i])}
                               for i, kind in enumerate(_TOKEN_KINDS) if tokens[i]}
    return result


def _before(stop: int | None, labels: torch.Tensor) -> torch.Tensor:
    """Where the targets [batch, T] come before the first ``stop`` token of their row (all of
    them for a template whose turn ends in plain text)."""
    if stop is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return (labels == stop).cumsum(-1) == 0


def compressed_pools(model: ClaraModel, pools: Sequence[Sequence[str]],
                     memories: dict[tuple[str, ...], torch.Tensor] | None = None,
                     show_progress: bool = False) -> list[torch.Tensor]:
    """Each pool's memory tokens [n_docs, n_mem, hidden], from ``memories`` when it has them
    (and kept there: evaluations of one model read the same pools several times); the missing
    pools are compressed in one call, batched by length over all of them."""
    cache = {} if memories is None else memories
    keys = [tuple(pool) for pool in pools]
    missing = [key for key in dict.fromkeys(keys) if key not in cache]
    if missing:
        compressed = model.compress_documents([d for key in missing for d in key], show_progress=show_progress)
        cache.update(zip(missing, compressed.split([len(key) for key in missing])))
    return [cache[key] for key in keys]


def other_rows(rows: Sequence[dict], width: int, shift: int = 1) -> list[int | None]:
    """For each row, the ``shift``-th row after it (once around) among those whose first
    ``width`` documents hold none of its evidence: its gold passages (``pos_index``, and
    ``gold_left_out``, those its top k missed), or those it reads when it names none (a
    synthesised QA row and its paraphrase share theirs; an NQ pool filled from other examples'
    passages may hold another row's gold passage, and the control then read the answer) and,
    where another row has none, any passage of their titles (DPR cuts an article into windows:
    another window of it gave a reconstruction its title and subject; the chunks of one
    document all share its title); passages compared as spaced alike (NQ spaces one paragraph
    two ways). None for a row with fewer than ``shift`` such rows."""
    read = [frozenset(map(spaced_alike, row["docs"][:width])) for row in rows]
    titles = [frozenset(filter(None, map(passage_title, row["docs"][:width]))) for row in rows]
    gold = [frozenset(spaced_alike(text) for text in [*(row["docs"][i] for i in row.get("pos_index") or []),
                                                       *row.get("gold_left_out", [])]) for row in rows]
    n = len(rows)

    def apart(i: int, j: int, by_title: bool) -> bool:
        """Row j's documents hold none of row i's evidence."""
        if gold[i]:
            return not gold[i] & read[j]
        return not read[i] & read[j] and not (by_title and titles[i] & titles[j])

    def partner(i: int, by_title: bool) -> int | None:
        return next(itertools.islice((j % n for j in range(i + 1, i + n) if apart(i, j % n, by_title)), shift - 1,
                                     None), None)

    return [found if (found := partner(i, True)) is not None or gold[i] or not titles[i] else partner(i, False)
            for i in range(n)]


@functools.lru_cache(maxsize=4)  # a walk over the vocabulary: about a second for SmolLM2's, at every probe
def _token_kinds(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Each vocabulary id's index in _TOKEN_KINDS [vocab]: a token with a digit, one that
    starts with a capital letter (after the tokenizer's space marker), or any other."""
    kinds = []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        text = tokenizer.convert_tokens_to_string([token]).strip()
        kinds.append(0 if any(c.isdigit() for c in text) else 1 if text[:1].isupper() else 2)
    return torch.tensor(kinds)


def _cross_entropies(negative_log_likelihoods: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Summed negative log-likelihoods [3] from own, neutral and other memories over ``tokens``
    targets -> nats per token, and the reading gain (other minus own)."""
    own, neutral, other = (float(total / tokens) for total in negative_log_likelihoods)
    return {"target_ce_own_documents": round(own, 4), "target_ce_neutral_documents": round(neutral, 4),
            "target_ce_other_documents": round(other, 4), "reading_gain": round(other - own, 4)}
