"""The passes training differentiates through, and the choice of what trains.

Inference goes through ``ClaraModel``'s verbs, which run without gradients. Training and the
reading probe need the same passes with gradients and per-token log-likelihoods; they live
here, beside the trainer, so that the model's public surface stays the user's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .config import ADAPTER_NAMES
from .checks import check_texts
from .model import DECODER, ENCODER, ClaraModel


def set_trainable(model: ClaraModel, adapters: Sequence[str], memory_embeddings: bool = False) -> None:
    """Choose what trains: the named adapters and, optionally, the <MEM> embedding rows.

    Everything else stays frozen. The choice survives adapter switches (the model applies it
    again after each one).
    """
    unknown = set(adapters) - set(ADAPTER_NAMES)
    if unknown:
        raise ValueError(f"unknown adapters {sorted(unknown)}; known: {ADAPTER_NAMES}")
    model.trainable = tuple(adapters)
    model._apply_trainable()
    embedding = model.lm.get_input_embeddings().weight
    embedding.requires_grad_(memory_embeddings)
    if memory_embeddings and not hasattr(model, "_embedding_hook"):
        rows = torch.zeros(embedding.size(0), 1, dtype=embedding.dtype, device=embedding.device)
        rows[model.mem_token_ids] = 1.0
        model._embedding_hook = embedding.register_hook(lambda grad: grad * rows.to(grad.device))


def encode_with_gradients(model: ClaraModel, texts: Sequence[str],
                          adapter: str = ENCODER) -> tuple[torch.Tensor, torch.Tensor]:
    """Memories [batch, n_mem, hidden] and mean document-token states [batch, hidden] of
    texts through one adapter, keeping gradients (SCP's alignment target is the second)."""
    texts = check_texts(texts, "texts")
    bodies = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return model._encode_tokens(bodies, adapter)


@contextlib.contextmanager
def text_weights(model: ClaraModel) -> Iterator[None]:
    """The weights that read documents pasted as text: the base model's own, unless the
    checkpoint's decoder was trained on text (``decoder_reads_text``).

    It switches the whole model's weights outside the model's lock: for one-thread runs (the
    trainer's teacher, the benchmarks), not for a model shared with other threads. Leaving, it
    puts back which adapters train (peft's switch back made the active one trainable alone).
    """
    if model.config.decoder_reads_text:
        yield
        return
    try:
        with model.lm.disable_adapter():
            yield
    finally:
        model._apply_trainable()


def completion_log_probs(
    model: ClaraModel, prompts: Sequence[str], completions: Sequence[str], memories: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the vocabulary at each completion position [batch, T, vocab], and
    the completion tokens they predict [batch, T] (-100 where a shorter completion leaves room).

    ``prompts`` are rendered with the generation prompt open; ``completions`` are the same
    conversations with the assistant turn written; ``memories`` [batch, k, n_mem, hidden] fill
    their placeholders. Runs the decoder adapter, with gradients. Rows are left-padded, so every
    completion ends its row and T is the longest completion: two calls whose conversations end
    in the same completions line up position by position, whatever their prompts.
    """
    groups = None if memories is None else list(memories)
    embeds, mask, ids = model._decoder_inputs(list(completions), groups)
    prompt_lengths = _prompt_tokens(model.tokenizer, prompts, completions)
    lengths = mask.sum(1).tolist()
    targets = torch.full_like(ids, -100)
    for row, (total, prompt) in enumerate(zip(lengths, prompt_lengths)):
        start = ids.size(1) - total + prompt  # first completion token
        targets[row, start:] = ids[row, start:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits only for the last (longest completion + 1) positions, not the whole prompt over
    # the full vocabulary
    tail = max(total - prompt for total, prompt in zip(lengths, prompt_lengths)) + 1
    with model._adapter(DECODER):
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          logits_to_keep=tail).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1), targets[:, ids.size(1) - tail + 1:]


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]) -> list[int]:
    """How many of each completion's tokens lie within its prompt: those ending there. A prompt
    that ends in a space ("assistant: ") gives it to the answer's first token ("ĠMarie"), and
    counting the prompt's own tokens left that answer token untrained."""
    if not tokenizer.is_fast:  # no offsets: the prompt's own tokens
        return [len(row) for row in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    spans = tokenizer(list(completions), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [sum(end <= len(prompt) for _, end in row) for prompt, row in zip(prompts, spans)]


def completion_log_likelihood(
    model: ClaraModel, prompts: Sequence[str], completions: Sequence[str], memories: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each completion after its prompt [batch], and its token count
    [batch] (arguments as ``completion_log_probs``)."""
    return summed_log_likelihood(*completion_log_probs(model, prompts, completions, memories))


def summed_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_log_probs``' output [batch, T, vocab], [batch, T] -> each completion's summed
    log-probability [batch] and its token count [batch]."""
    picked, valid = token_log_likelihood(log_probs, labels)
    return picked.sum(1), valid.sum(1)


def token_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_log_probs``' output -> each completion token's log-probability [batch, T]
    (0 where no token is) and where the completion tokens are [batch, T]."""
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = labels != -100
    return picked * valid, valid
