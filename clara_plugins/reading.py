"""The reading gain: does the generator read its memory tokens at all?

Long before answers improve, the cross-entropy of the targets read from each row's own
memories against another row's shows whether training teaches the generator to read. The
trainer's probes and ``clara eval --reading`` both measure it here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .model import ClaraModel
from .passes import completion_log_likelihood
from .prompts import memory_prompts


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
                log_likelihood, counts = completion_log_likelihood(model, prompts, full, read)
                totals[name] -= float(log_likelihood.sum())
            tokens += int(counts.sum())
    own_ce, neutral_ce, other_ce = (totals[name] / tokens for name in ("own", "neutral", "other"))
    return {"examples": len(rows), "documents_per_row": width, "target_ce_own_documents": round(own_ce, 4),
            "target_ce_neutral_documents": round(neutral_ce, 4),
            "target_ce_other_documents": round(other_ce, 4), "reading_gain": round(other_ce - own_ce, 4)}
