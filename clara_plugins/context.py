"""Gathering the memory tokens a generator reads: stored ones by id or text, fresh ones otherwise.

Shared by the framework adapters, whose chat models and synthesizers receive documents as
store ids, as texts, or as both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .model import ClaraModel
from .retrieval import cosine_scores
from .store import MemoryStore


def memories_for_texts(model: ClaraModel, store: MemoryStore | None, texts: Sequence[str]) -> torch.Tensor:
    """[len(texts), n_mem, hidden]: a text already in the store reuses its stored memory tokens."""
    if not texts:
        return torch.zeros(0, model.config.n_mem_tokens, model.hidden_size)
    stored_ids = store.ids_for_texts(texts) if store is not None else [None] * len(texts)
    missing = [text for text, doc_id in zip(texts, stored_ids) if doc_id is None]
    fresh = iter(model.compress_documents(missing).cpu()) if missing else iter(())
    found = [doc_id for doc_id in stored_ids if doc_id is not None]
    known = iter(store.memories(found)) if found else iter(())
    return torch.stack([next(known) if doc_id is not None else next(fresh) for doc_id in stored_ids])


def keep_top_k(model: ClaraModel, question: str, memories: torch.Tensor, k: int) -> torch.Tensor:
    """The k memories the query reasoner ranks highest for the question (all when fewer)."""
    if len(memories) <= k:
        return memories
    scores = cosine_scores(model.encode_queries([question]), memories)[0]
    return memories[scores.topk(k).indices]


def answer_pieces(model: ClaraModel, store: MemoryStore | None, question: str, ids: Sequence[str],
                  texts: Sequence[str], k: int, max_new_tokens: int | None,
                  read_text: bool = False) -> tuple[Iterator[str], int]:
    """The answer's text pieces and the input positions the generator reads.

    Documents are store ids (memory tokens read from ``store``) or texts. With ``read_text``
    the first k documents are pasted as text and the backbone reads them (the text-RAG
    baseline); otherwise the query reasoner keeps the best k memories.
    """
    if read_text:
        texts = [d.text for d in store.get(ids)][:k] if ids else list(texts)[:k]
        return model.stream_reading_text(question, texts, max_new_tokens), model.text_prompt_positions(question, texts)
    memories = store.memories(ids) if ids else memories_for_texts(model, store, texts)
    memories = keep_top_k(model, question, memories, k)
    return model.stream_answer(question, memories, max_new_tokens), model.prompt_positions(question, len(memories))
