"""Greedy decoding from ``inputs_embeds`` with a KV cache, one step at a time.

Written as a generator so that callers can either collect whole answers or stream text pieces
as they are produced; transformers' ``generate`` cannot stream without a helper thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def greedy_steps(
    forward: Callable[..., object],
    embed: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Iterable[int],
) -> Iterator[torch.Tensor]:
    """Yield the next token id of every row, [batch], once per step.

    ``forward`` runs the language model on keyword inputs (the caller picks its weights for
    every pass); ``embed`` is its input embedding. Rows that already produced a stop token
    yield -1. Positions are counted from the attention mask, so left-padded rows decode
    exactly as they would alone.
    """
    stop = torch.tensor(sorted(set(stop_ids)), device=inputs_embeds.device, dtype=torch.long)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits of the last position only: over a long prompt, the whole vocabulary at every
    # position is most of the first pass's work and memory
    out = forward(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                  logits_to_keep=1)
    last_position = positions[:, -1:]
    finished = torch.zeros(mask.size(0), dtype=torch.bool, device=mask.device)
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1, :].argmax(dim=-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, -1), next_ids)
        yield next_ids
        finished |= torch.isin(next_ids, stop) | (next_ids < 0)
        if bool(finished.all()) or step == max_new_tokens - 1:  # no pass for a token never read
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_position = last_position + 1
        step_embeds = embed(next_ids.clamp(min=0)).unsqueeze(1).to(inputs_embeds.dtype)
        out = forward(inputs_embeds=step_embeds, attention_mask=mask, position_ids=last_position, use_cache=True,
                      logits_to_keep=1, **_cache_argument(out))


def _cache_argument(out: Mapping[str, object]) -> dict[str, object]:
    """The KV cache of the last pass, under the name this transformers version reads it by:
    ``cache`` since transformers deprecated ``past_key_values`` (to be removed in 5.40)."""
    name = "cache" if "cache" in out.keys() else "past_key_values"
    return {name: out[name]}


def collect_answers(
    tokenizer: PreTrainedTokenizerBase, steps: Iterator[torch.Tensor], batch_size: int, stop_ids: set[int]
) -> list[str]:
    """Run the decoding loop to the end and decode every row's tokens."""
    rows: list[list[int]] = [[] for _ in range(batch_size)]
    for next_ids in steps:
        for row, token in zip(rows, next_ids.tolist()):
            if token >= 0 and token not in stop_ids:
                row.append(token)
    return [_answer_text(tokenizer, row) for row in rows]


def stream_text(
    tokenizer: PreTrainedTokenizerBase, steps: Iterator[torch.Tensor], stop_ids: set[int]
) -> Iterator[str]:
    """Text pieces of a single-row decoding, yielded as soon as they decode cleanly; together
    they are ``collect_answers``' text (whitespace is held back until text follows it)."""
    tokens: list[int] = []
    emitted = 0
    for next_ids in steps:
        token = int(next_ids[0])
        if token < 0 or token in stop_ids:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        complete = not text.endswith("\ufffd")  # a multi-byte character may still be open
        if complete and len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    rest = _answer_text(tokenizer, tokens)[emitted:]
    if rest:
        yield rest


def _answer_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """An answer's text, without a last character the length limit cut between its bytes
    (decoded as U+FFFD)."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip().rstrip("\ufffd").rstrip()
