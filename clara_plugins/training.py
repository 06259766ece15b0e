"""Training CLaRa: the paper's three stages, a retrieval stage and the text baseline, in one loop.

- ``scp``: salient compressor pretraining. From one document's memory tokens alone the
  generator answers the document's QA pairs, reproduces its paraphrase, or (teacher-free
  ``reconstruct`` rows) repeats the document itself.
  Loss = CE + mse_weight * MSE(mean memory state, mean document-token state).
- ``instruct``: compression instruction tuning on (question, k documents, answer); the
  decoder adapter starts afresh, the encoder adapter is kept. Same loss. With
  ``freeze_compressor`` the documents are compressed once without gradient and only the
  decoder learns (CE alone): several times cheaper per step, for CPU budgets. With a
  ``teacher``, + distill_weight * KL(teacher reading the documents as text || generator).
  With ``restate_weight``, + a margin against answering with a name the question holds.
  With ``keep_generator`` and ``freeze_generator`` only the encoder learns: the compressor
  writes memories for the generator it has (as ``freeze_generator`` does in ``scp``).
- ``e2e``: end-to-end. The compressor is frozen (candidate memories computed without
  gradient); the query reasoner starts as a copy of the encoder adapter; the query reasoner,
  the generator and (tokens design) the <MEM> rows learn from the LM loss alone, through the straight-through
  top-k (``estimator="straight-through"``) or REALM's marginal likelihood over the top-k,
  optionally with a null document (``estimator="realm"``); ``freeze_generator`` keeps the
  generator and the <MEM> rows as they were. ``retrieval_weight`` adds a
  contrastive term on the rows' gold candidates, for budgets where the LM loss alone barely
  moves the query reasoner. With a corpus store the candidates are retrieved from it and its
  memories re-encoded every ``refresh_every`` steps; in the tokens design, where the <MEM> rows
  make every memory, a row pool's candidate keeps the rows of the step that first drew it (or
  of the resume) until a refresh.
- ``retrieval``: the query reasoner alone, as the end-to-end stage left it, learns to rank each
  row's gold candidates above every other candidate of its optimizer step (in-batch negatives),
  the candidates' memories cached from the frozen compressor. No generator pass: each step sees
  many more questions per second than the language-modelling loss allows on a CPU. The query
  pass's activations dominate the stage's memory; ``grad_accum`` splits that pass into
  micro-batches without changing the negatives, so 8 x 4 trains as 32 x 1 does.
- ``text``: the paper's fair baseline. The same instruction rows, but the documents are
  pasted as text and only a fresh decoder adapter learns; the checkpoint is marked
  ``decoder_reads_text`` so that text-RAG generation uses it.

Gradient accumulation, warm-up + cosine (or constant) schedule, clipping, seeded data order,
checkpoint and resume, a JSONL log and a progress bar with the running loss. Stages that train
the compressor also log ``memory_cosine``, the similarity of different documents' memories
(of a micro-batch that holds two or more).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .atomic import check_replaceable_folder, recover_folder, sole_writer
from .backbone import context_window
from .checkpoint import (CONFIG_FILE, TRAINER_STATE_FILE, files_sha256, load_trained_weights, read_config,
                         read_torch_file, save_checkpoint, weight_files)
from .checks import check_writable
from .config import TrainConfig
from .errors import CheckpointError, InvalidInputError
from .jsonfiles import read_jsonl, write_jsonl
from .metrics import recall_at_k
from .model import (DECODER, ENCODER, QUERY_REASONER, ClaraModel, copy_adapter, fp16_memories, refuse_control_tokens,
                    refuse_text_reader)
from .passes import (completion_log_likelihood, completion_log_probs, encode_with_gradients,
                     set_trainable, summed_log_likelihood, text_weights)
from .reading import evaluate_reading, other_rows, reading_width
from .prompts import memory_prompt, memory_prompts, prompt_positions, text_prompt, text_prompts, trained_answers
from .retrieval import best_first, cosine_scores, straight_through_topk
from .rows import check_training_rows, question_name, reading_row_problem, row_text

if TYPE_CHECKING:  # faiss loads only for a run that retrieves from a corpus store
    from .store import MemoryStore

# ----------------------------------------------------------------- stage set-up


def prepare_stage(model: ClaraModel, config: TrainConfig) -> None:
    """Initialise adapters as the stage starts (not on resume)."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.stage == "text" or (config.stage == "instruct" and not config.keep_generator):
        _reset_adapter(model, DECODER, generator)
    if config.stage == "e2e":
        copy_adapter(model, ENCODER, QUERY_REASONER)


def _reasoner_is_compressor(model: ClaraModel) -> bool:
    parameters = dict(model.lm.named_parameters())
    return all(torch.equal(parameter, parameters[name.replace(f".{ENCODER}.", f".{QUERY_REASONER}.")])
               for name, parameter in parameters.items() if f".{ENCODER}." in name)


def _trainable(config: TrainConfig) -> list[str]:
    if config.stage == "e2e":
        return [QUERY_REASONER] if config.freeze_generator else [QUERY_REASONER, DECODER]
    if config.stage == "retrieval":
        return [QUERY_REASONER]
    if config.freeze_generator:
        return [ENCODER]
    return [DECODER] if config.generator_only else [ENCODER, DECODER]


def _reset_adapter(model: ClaraModel, name: str, generator: torch.Generator) -> None:
    """A fresh LoRA adapter: A drawn like peft's default, B zero (so it starts as identity)."""
    with torch.no_grad():
        for parameter_name, parameter in model.lm.named_parameters():
            if f".lora_A.{name}." in parameter_name:
                bound = 1 / math.sqrt(parameter.size(1))
                parameter.copy_(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))
            elif f".lora_B.{name}." in parameter_name:
                parameter.zero_()


# ---------------------------------------------------------------------- losses


def _decoder_loss(model: ClaraModel, prompts: list[str], full: list[str],
                  memories: torch.Tensor | None) -> torch.Tensor:
    return _token_ce(*completion_log_likelihood(model, prompts, full, memories))


def _token_ce(log_likelihood: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean CE per completion token of a batch, from ``summed_log_likelihood``'s output."""
    return -log_likelihood.sum() / tokens.sum().clamp(min=1)


def _reading_loss(model: ClaraModel, rows: list[dict], prompts: list[str], full: list[str], grouped: torch.Tensor,
                  config: TrainConfig, teacher_view: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """CE of the targets read from their own memories [batch, k, n, hidden], plus the reading
    margin when it is on (the same targets read from the memories of the next row that holds
    none of its evidence, ``other_rows``, must cost at least ``margin`` nats per token more: a row paired
    with its own documents gained 0 and pushed the others harder), plus distillation when
    ``teacher_view`` gives a
    teacher's log-probabilities and targets for the same completions (``_teacher_view``).
    Also returns each target's mean log-likelihood per token [batch], for the restatement term."""
    log_probs, labels = completion_log_probs(model, prompts, full, grouped)
    summed = summed_log_likelihood(log_probs, labels)  # one gather for the CE and the rows' means
    ce = _token_ce(*summed)
    metrics = {"ce": ce.item()}
    loss = ce
    if teacher_view is not None:
        distill = _distillation_loss(*teacher_view, log_probs, labels)
        metrics["distill"] = distill.item()
        loss = loss + config.distill_weight * distill
    partners = other_rows(rows, grouped.size(1)) if config.margin_weight else []
    paired = [i for i, partner in enumerate(partners) if partner is not None]
    if paired:
        other = _decoder_loss(model, [prompts[i] for i in paired], [full[i] for i in paired],
                              grouped[[partners[i] for i in paired]])
        gain = other - _token_ce(summed[0][paired], summed[1][paired])
        metrics["reading_gain"] = gain.item()
        loss = loss + config.margin_weight * F.relu(config.margin - gain)
    return loss, metrics, _row_log_likelihood(*summed)


def _teacher_view(teacher: ClaraModel, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities [batch, T, vocab] of the rows' answers, read from their
    documents as text, and the answer tokens [batch, T]; no gradient."""
    with torch.no_grad(), text_weights(teacher):
        return completion_log_probs(teacher, *text_prompts(teacher.tokenizer, rows))


def _distillation_loss(teacher_log_probs: torch.Tensor, teacher_labels: torch.Tensor,
                       log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || generator) per answer token [batch, T, vocab] -> mean over the tokens."""
    if not torch.equal(teacher_labels, labels):
        raise ValueError("the teacher tokenizes the answers differently from the model it teaches")
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1)
    valid = labels != -100
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def _compression_loss(model: ClaraModel, rows: list[dict], prompts: list[str], full: list[str], grouped: torch.Tensor,
                      documents: list[str], memories: torch.Tensor, document_means: torch.Tensor, config: TrainConfig,
                      teacher_view: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Stages 1-2: the reading loss + mse_weight * MSE(mean memory, mean document), the
    ``documents``' memories; returns ``_reading_loss``'s three values."""
    loss, metrics, target_log_likelihood = _reading_loss(model, rows, prompts, full, grouped, config, teacher_view)
    mse = memory_mse(memories, document_means, rescaled=model.config.memory_scale)
    metrics["mse"] = mse.item()
    distinct = [documents.index(text) for text in dict.fromkeys(documents)]  # each text's first memories
    if len(distinct) > 1:
        metrics["memory_cosine"] = memory_cosine(memories[distinct])
    return loss + config.mse_weight * mse, metrics, target_log_likelihood


def memory_mse(memories: torch.Tensor, document_means: torch.Tensor, rescaled: bool) -> torch.Tensor:
    """MSE between each document's mean memory vector [batch, n_mem, hidden] and its tokens'
    mean state [batch, hidden]. Memories ``rescaled`` to the embedding norm (``memory_scale``)
    have a mean shorter than the target, which has that norm too, unless they are one vector:
    their mean is compared at the target's norm, or the term pulled them together."""
    mean, target = memories.mean(1).float(), document_means.float()
    if rescaled:
        mean = mean * (target.norm(dim=-1, keepdim=True) / mean.norm(dim=-1, keepdim=True).clamp(min=1e-6))
    return F.mse_loss(mean, target)


def memory_cosine(memories: torch.Tensor) -> float:
    """Mean cosine between the flattened memories of different documents [docs, n, hidden],
    each document once (``_compression_loss`` drops repeats: an SCP row and its paraphrase row
    share one document, which was paired with itself).

    The compressor's health in one number: near 1 every document looks the same to the
    reader (an untrained SmolLM2 compressor sits at about 0.95).
    """
    similarity = cosine_scores(memories.detach(), memories.detach(), "flat")
    n = len(similarity)
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


def scp_loss(model: ClaraModel, rows: list[dict], config: TrainConfig) -> tuple[torch.Tensor, dict]:
    documents = [row["docs"][0] for row in rows]
    memories, document_means = encode_with_gradients(model, documents)
    prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, rows, 1)
    loss, metrics, _ = _compression_loss(model, rows, prompts, full, memories.unsqueeze(1), documents, memories,
                                         document_means, config)
    return loss, metrics


def instruct_loss(model: ClaraModel, rows: list[dict], config: TrainConfig,
                  frozen: CandidateMemories | None = None,
                  teacher: ClaraModel | None = None) -> tuple[torch.Tensor, dict]:
    """The reading loss (+ MSE) of the answer read from the k documents' memories; with
    ``frozen``, the memories come from its no-gradient cache and there is no MSE; with
    ``teacher``, + distillation from it reading the same documents as text."""
    k = len(rows[0]["docs"])
    if any(len(row["docs"]) != k for row in rows):
        raise ValueError("instruction rows in one batch must have the same number of documents")
    prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, rows, k)
    view = None if teacher is None else _teacher_view(teacher, rows)
    if frozen is not None:
        grouped = frozen.for_rows(rows, config)[0]
        loss, metrics, answer_log_likelihood = _reading_loss(model, rows, prompts, full, grouped, config, view)
    else:
        documents = [d for row in rows for d in row["docs"]]
        memories, document_means = encode_with_gradients(model, documents)
        grouped = memories.reshape(len(rows), k, *memories.shape[1:])
        loss, metrics, answer_log_likelihood = _compression_loss(model, rows, prompts, full, grouped, documents,
                                                                 memories, document_means, config, view)
    if config.restate_weight:
        loss = loss + config.restate_weight * _restatement_loss(model, rows, grouped, answer_log_likelihood,
                                                                config, metrics)
    return loss, metrics


def _restatement_loss(model: ClaraModel, rows: list[dict], grouped: torch.Tensor, answer_log_likelihood: torch.Tensor,
                      config: TrainConfig, metrics: dict) -> torch.Tensor:
    """relu(restate_margin - gap) summed over the rows whose question holds a name no answer
    shares (``question_name``), divided by the batch size; gap = the answer's mean log-likelihood
    per token from the row's memories [batch, k, n, hidden] (``answer_log_likelihood`` [batch],
    from the reading loss's pass) minus the name's. Logs the mean gap."""
    named = [(i, name) for i, row in enumerate(rows) if (name := question_name(row))]
    if not named:
        return grouped.new_zeros(())
    index = [i for i, _ in named]
    names = [{**rows[i], "answer": name, "answers": [name]} for i, name in named]
    gap = answer_log_likelihood[index] - _mean_log_likelihood(model, names, grouped[index])
    metrics["restate_gap"] = gap.mean().item()
    return F.relu(config.restate_margin - gap).sum() / len(rows)


def _mean_log_likelihood(model: ClaraModel, rows: list[dict], grouped: torch.Tensor) -> torch.Tensor:
    """Each row's answer, mean log-likelihood per token [batch], read from [batch, k, n, hidden]."""
    prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, rows, grouped.size(1))
    return _row_log_likelihood(*completion_log_likelihood(model, prompts, full, grouped))


def _row_log_likelihood(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Each completion's mean log-likelihood per token [batch], from ``summed_log_likelihood``'s output."""
    return total / count.clamp(min=1)


def text_loss(model: ClaraModel, rows: list[dict]) -> tuple[torch.Tensor, dict]:
    """CE of the answer with the documents pasted as text: no memory tokens at all."""
    ce = _decoder_loss(model, *text_prompts(model.tokenizer, rows), None)
    return ce, {"ce": ce.item()}


class CandidateMemories:
    """Frozen-compressor memories of the end-to-end candidates, computed once per text.

    With a corpus store, candidates are retrieved from it instead of read from the rows.
    """

    def __init__(self, model: ClaraModel, corpus: MemoryStore | None = None) -> None:
        self.model, self.corpus = model, corpus
        self._cache: dict[str, torch.Tensor] = {}

    def for_rows(self, rows: list[dict], config: TrainConfig) -> tuple[torch.Tensor, list[list[int]]]:
        """[batch, N, n_mem, hidden] candidate memories and each row's gold positions."""
        if self.corpus is not None:  # gold = retrieved passages whose text is a gold document of the row
            found = [self.corpus.search(row["question"], config.candidates) for row in rows]
            gold_texts = [{row["docs"][i] for i in row.get("pos_index", [])} for row in rows]
            gold = [[n for n, (d, _) in enumerate(hits) if d.text in texts] for hits, texts in zip(found, gold_texts)]
            memories = torch.stack([self.corpus.memories([d.id for d, _ in hits]) for hits in found])
            return memories.to(self.model.device), gold
        memories = self.of_texts([d for row in rows for d in row["docs"]])
        return memories.reshape(len(rows), -1, *memories.shape[1:]), [row.get("pos_index", []) for row in rows]

    def of_texts(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), n_mem, hidden] fp32 memories, compressing only texts not seen before."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if missing:
            # the run counted cut documents once (_warn_cut_documents); past fp16's range, refused
            memories = torch.from_numpy(fp16_memories(self.model.compress(missing, warn=False).memories))
            for text, memory in zip(missing, memories):
                self._cache[text] = memory
        memories = torch.stack([self._cache[text] for text in texts])
        return memories.to(device=self.model.device, dtype=torch.float32)

    def refresh(self) -> None:
        """Re-encode with the current <MEM> rows: the corpus store, or the cache."""
        self._cache.clear()
        if self.corpus is not None:
            ids = self.corpus.all_ids()
            documents = self.corpus.get(ids)
            self.corpus.upsert([d.text for d in documents], ids, [d.metadata for d in documents], show_progress=True)


def e2e_loss(model: ClaraModel, rows: list[dict], config: TrainConfig,
             candidates: CandidateMemories) -> tuple[torch.Tensor, dict]:
    memories, gold = candidates.for_rows(rows, config)  # [B, N, n, h], no gradient
    queries = encode_with_gradients(model, [row["question"] for row in rows], QUERY_REASONER)[0]
    scores = cosine_scores(queries, memories, model.config.retrieval_key)  # [B, N], gradient reaches the query reasoner
    k = min(config.top_k, scores.size(1))
    top = best_first(scores.detach(), k)
    if config.estimator == "straight-through":
        weights = straight_through_topk(scores, k, config.temperature)  # [B, k, N]
        selected = torch.einsum("bkn,bnmh->bkmh", weights, memories)
        prompts, full = memory_prompts(model.tokenizer, model.document_placeholder, rows, k)
        loss = _decoder_loss(model, prompts, full, selected)
    else:
        loss = _realm_loss(model, rows, scores, memories, top, config)
    metrics = {"ce": loss.item(), **_pool_recall(top, gold, k)}
    if config.retrieval_weight and any(gold):
        retrieval = _gold_retrieval_loss(scores, gold, config)
        loss = loss + config.retrieval_weight * retrieval
        metrics["retrieval"] = retrieval.item()
    return loss, metrics


def retrieval_loss(model: ClaraModel, rows: list[dict], config: TrainConfig,
                   candidates: CandidateMemories, step_rows: list[dict] | None = None) -> tuple[torch.Tensor, dict]:
    """-log of the softmax mass on each row's gold candidates among every distinct candidate of
    ``step_rows`` (the optimizer step's rows, which contain ``rows``; default ``rows``): a row's
    pool gives hard negatives, the other rows' pools many more."""
    step_rows = rows if step_rows is None else step_rows
    texts = list(dict.fromkeys(d for row in step_rows for d in row["docs"]))  # a text in two pools is one candidate
    position = {text: i for i, text in enumerate(texts)}
    memories = candidates.of_texts(texts)  # [M, n, h], no gradient
    queries = encode_with_gradients(model, [row["question"] for row in rows], QUERY_REASONER)[0]
    scores = cosine_scores(queries, memories, model.config.retrieval_key)  # [B, M]
    gold = [[position[row["docs"][i]] for i in row["pos_index"]] for row in rows]
    loss = _gold_retrieval_loss(scores, gold, config)
    k = min(config.top_k, len(texts))  # logged Recall@k: among all the step's candidates
    top = best_first(scores.detach(), k)
    return loss, {"retrieval": loss.item(), **_pool_recall(top, gold, k)}


def _pool_recall(top: torch.Tensor, gold: list[list[int]], k: int) -> dict[str, float]:
    """``recall@k``: the mean Recall@k of the ranked candidate indices [B, k] over the rows with
    gold candidates, of the gold candidates present (``clara eval`` also counts a supporting
    passage a pool lacks, as not found); nothing without any."""
    found = [recall_at_k(t.tolist(), g, k) for t, g in zip(top, gold) if g]
    return {f"recall@{k}": sum(found) / len(found)} if found else {}


def _gold_retrieval_loss(scores: torch.Tensor, gold: list[list[int]], config: TrainConfig) -> torch.Tensor:
    """Mean over rows with gold candidates of their gold term (``config.gold_term``) at
    ``config.temperature``; 0 without any.

    "mass": -log Σ_gold softmax(scores). "each": the mean over gold candidates g of
    -log softmax over {g} ∪ the row's negatives, so no gold candidate competes with another.
    """
    logits = scores / config.temperature  # [B, N]
    terms = []
    for row, positions in zip(logits, gold):
        if not positions:
            continue
        positions = list(dict.fromkeys(positions))  # two gold documents of one text are one candidate
        if config.gold_term == "mass":
            terms.append(torch.logsumexp(row, dim=0) - torch.logsumexp(row[positions], dim=0))
        else:
            negative = torch.ones_like(row, dtype=torch.bool)
            negative[positions] = False
            golds = row[positions]
            terms.append((torch.logaddexp(golds, torch.logsumexp(row[negative], dim=0)) - golds).mean())
    return torch.stack(terms).mean() if terms else scores.new_zeros(())


def _realm_prior(logits: torch.Tensor, null_document: bool) -> torch.Tensor:
    """log p(z|x) over the top-k documents' logits [batch, k], and the null document last when
    asked. The null scores as the mean of the k (no gradient): a fixed logit of 0 (cosine 0)
    stood some 40 nats below candidates' cosine / 0.02, a prior of e^-40 that no answer
    likelihood could outweigh."""
    if null_document:
        logits = torch.cat([logits, logits.detach().mean(1, keepdim=True)], dim=1)
    return torch.log_softmax(logits, dim=1)


def _realm_loss(model: ClaraModel, rows: list[dict], scores: torch.Tensor, memories: torch.Tensor,
                top: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """-log Σ_z p(y|z,x) p(z|x) over the top-k documents, each read alone (plus a null document)."""
    tok, slot = model.tokenizer, model.document_placeholder
    batch, k = top.shape
    logits = scores.gather(1, top) / config.temperature
    single = memories[torch.arange(batch).unsqueeze(1), top].reshape(batch * k, 1, *memories.shape[2:])
    prompts, full = memory_prompts(tok, slot, [row for row in rows for _ in range(k)], 1)
    log_likelihood, tokens = completion_log_likelihood(model, prompts, full, single)
    log_likelihood = log_likelihood.reshape(batch, k)
    if config.null_document:  # no document at all
        prompts, full = memory_prompts(tok, slot, rows, 0)
        null, _ = completion_log_likelihood(model, prompts, full)
        log_likelihood = torch.cat([log_likelihood, null.unsqueeze(1)], dim=1)
    marginal = torch.logsumexp(_realm_prior(logits, config.null_document) + log_likelihood, dim=1)
    return -marginal.sum() / tokens.reshape(batch, k)[:, 0].sum().clamp(min=1)


# ------------------------------------------------------------------------ loop


def _load_teacher(model: ClaraModel, folder: str, base_model: str) -> ClaraModel:
    # the teacher reads text, so a pooled one takes the student's rate: the same <MEM> tokens.
    # Loading it leaves torch's generator as it was, so a resumed run keeps its dropout masks.
    teacher = ClaraModel.from_pretrained(folder, base_model=base_model or None,
                                         compression_rate=model.config.compression_rate,
                                         device=model.device, dtype=torch.float32)
    if teacher.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise ValueError(f"the teacher {folder} has another vocabulary than the model it teaches: "
                         "train it from the same base model")
    return teacher.eval()


def _parameter_groups(model: ClaraModel, parameters: list[torch.nn.Parameter]) -> list[dict]:
    """The trainable parameters, with the embedding matrix kept out of weight decay: only its
    <MEM> rows train (and are saved), and decay would shrink every other row of the vocabulary."""
    embedding = model.lm.get_input_embeddings().weight
    if not embedding.requires_grad:
        return [{"params": parameters}]
    return [{"params": [p for p in parameters if p is not embedding]}, {"params": [embedding], "weight_decay": 0.0}]


def _learning_rate(config: TrainConfig) -> Callable[[int], float]:
    # the share's whole steps, past float error: 0.29 x 100 is 28.999..., which int() alone cut to 28
    warmup = max(1, int(config.warmup_ratio * config.steps + 1e-9))

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(rows: list[dict], config: TrainConfig, step: int) -> list[list[dict]]:
    """The micro-batches of one optimizer step: a seeded permutation per epoch."""
    per_step = config.batch_size * config.grad_accum
    start = step * per_step
    orders: dict[int, list[int]] = {}  # a step spans one epoch or two: each shuffled once
    picked = []
    for index in range(start, start + per_step):
        epoch, offset = divmod(index, len(rows))
        if epoch not in orders:
            orders[epoch] = list(range(len(rows)))
            # epoch e of seed s is not epoch e + 1 of seed s - 1 (as seed + epoch made it)
            random.Random(config.seed + (epoch << 32)).shuffle(orders[epoch])
        picked.append(rows[orders[epoch][offset]])
    return [picked[i:i + config.batch_size] for i in range(0, per_step, config.batch_size)]


def _read_trainer_state(path: Path) -> dict:
    """The optimizer, scheduler and RNG states of the last save, on the CPU (the optimizer moves
    its own to its parameters' device), so that a GPU run resumes on a machine without one."""
    state = read_torch_file(path)
    missing = {"step", "config", "optimizer", "scheduler", "rng"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"{path} is not a trainer state of this library: it lacks {', '.join(sorted(missing))}")
    if not isinstance(state["optimizer"], dict) or "param_groups" not in state["optimizer"]:
        raise CheckpointError(f"{path} is not a trainer state of this library: its optimizer state has no param_groups")
    return state


def _rng_states(model: ClaraModel) -> dict[str, torch.Tensor]:
    """The random states a resumed run restores, as dropout draws from them: the CPU's, and on a
    GPU that device's (an Apple one's too: re-seeded, a resumed run replayed the first masks)."""
    if model.device.type == "cuda":
        return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(model.device)}
    if model.device.type == "mps":
        return {"rng": torch.get_rng_state(), "mps_rng": torch.mps.get_rng_state()}
    return {"rng": torch.get_rng_state()}


def _forget_steps_after(log: Path, step: int | None) -> None:
    """Drop the log records of steps run after the last save: a resumed run replays them. A new
    run (``step`` None) keeps an earlier log aside as ``log.N.jsonl``: a run killed before its
    first save, or one whose checkpoint was moved away (earlier versions emptied its log)."""
    if step is None:  # a link too (a "cp -rs" copy of a run), which the run would append through
        if log.is_symlink() or (log.exists() and log.stat().st_size):
            number = next(n for n in itertools.count(1) if not log.with_name(f"log.{n}.jsonl").exists())
            os.replace(log, log.with_name(f"log.{number}.jsonl"))
    elif log.exists() or log.is_symlink():  # a last line cut short by the kill is dropped too; a link
        # (a "cp -rs" copy of a run) is replaced, not the other run's log it names, which the resumed
        # steps were appended to, or made where it named none
        kept = [record for record in read_jsonl(log, appended=True) if record["step"] <= step] if log.exists() else []
        write_jsonl(kept, log, follow_link=False)


def _probe_k(rows: list[dict], config: TrainConfig) -> int:
    """The documents a probe row may read: as many as the stage's generator reads (top_k of the
    candidate pools of e2e and the retrieval stage, an instruction row's all), and at least
    top_k (QA probes beside SCP rows of one document)."""
    if config.stage in ("e2e", "retrieval"):  # pools in random order: their first k are not the best
        return config.top_k
    return max(config.top_k, *(len(row["docs"]) for row in rows))


def run_finished(state: dict | None, config: TrainConfig) -> bool:
    """Whether the trainer state of a run's output (None: no run) has taken all its steps."""
    return state is not None and state["step"] >= config.steps


def finished_message(output: str | Path, config: TrainConfig) -> str:
    """What a run asked again once finished says, from the CLI and from ``train``."""
    return f"{output} holds a finished run of {config.steps} steps: nothing to train"


def missed_probes(probes: dict[str, list[dict]], output: str | Path, step: int,
                  probe_every: int) -> dict[str, list[dict]]:
    """The probe sets due at ``step`` (a run's first, or a multiple of ``probe_every``) that the
    run's log does not hold: a run stopped while it probed, its last step's probe too, probes
    them when it resumes (they were lost for good)."""
    if not probes or step % probe_every:
        return {}
    log = Path(output) / "log.jsonl"
    done = {record.get("probe") for record in read_jsonl(log, appended=True)
            if record["step"] == step} if log.exists() else set()
    return {name: rows for name, rows in probes.items() if name not in done}


def probe_finished_run(model: ClaraModel, rows: list[dict], config: TrainConfig, output: str | Path,
                       probes: dict[str, list[dict]]) -> Path:
    """Log the probes of a finished run's last step that its log lacks (it stopped while it
    probed), with ``model`` holding the run's weights; no corpus is read. Returns the checkpoint."""
    _read_as_trained(model, config)
    if missed := missed_probes(probes, output, config.steps, config.probe_every):
        log = Path(output) / "log.jsonl"
        _forget_steps_after(log, config.steps)  # a probe line cut short is dropped, a linked log replaced
        with open(log, "a") as file:
            _probe(model, missed, _probe_k(rows, config), config.steps, file)
    return _holding(model, Path(output) / "checkpoint")


def _read_as_trained(model: ClaraModel, config: TrainConfig) -> None:
    """The generator reads as the stage trains it: the text stage's documents as text, the e2e
    stage's as many documents as it was trained on."""
    model.config.decoder_reads_text = config.stage == "text"
    if config.stage == "e2e":
        model.config.generation_top_k = config.top_k


def _probe(model: ClaraModel, probes: dict[str, list[dict]], k: int, step: int, log) -> None:
    """Log the reading gain (own, neutral and other memories) on each held-out probe set."""
    model.eval()
    for name, probe_rows in probes.items():
        log.write(json.dumps({"step": step, "probe": name, **evaluate_reading(model, probe_rows, k)}) + "\n")
    log.flush()
    model.train()


def check_for_model(model: ClaraModel, rows: list[dict], config: TrainConfig,
                    probes: dict[str, list[dict]] | None = None) -> None:
    """Refuse, before the first step (and, from the CLI, before a corpus is compressed), what
    only the loaded model tells: a refresh that gives the same memories back (an hours-long
    no-op on a large corpus); a row or probe holding one of its control tokens (a typed "<MEM0>"
    took a memory's place, so the run failed at the step that drew the row, and again at every
    resume, which replays the seed's batches); a row longer than its context window (trained,
    unsaid, at positions the model never saw); a text reader trained further by a stage that
    reads memories (its untrained compressor's, and the mark that refuses them was dropped at
    the save)."""
    if config.stage != "text":
        refuse_text_reader(model, f"the {config.stage} stage reads memories, which its generator was not trained on; "
                                  "start it from a CLaRa checkpoint")
    if config.refresh_every and model.config.memory_design != "tokens":
        raise ValueError(f"refresh_every re-encodes the corpus with the <MEM> rows trained so far; "
                         f"{model.config.memory_design} memories never read those rows, so they would come out the same")
    refuse_control_tokens(model, [row_text(row) for row in rows], "training row")
    for name, probe_rows in (probes or {}).items():
        refuse_control_tokens(model, [row_text(row) for row in probe_rows], f"probe {name}, row")
    if config.stage == "text":
        _refuse_long_rows(model, (text_prompt(model.tokenizer, row) for row in rows), len(rows), "the generator")
    elif config.stage != "retrieval":  # which trains the query reasoner alone
        width = (lambda row: config.top_k) if config.stage == "e2e" else (lambda row: len(row["docs"]))
        texts = (memory_prompt(model.tokenizer, model.document_placeholder, row, width(row)) for row in rows)
        placeholder = prompt_positions(model.tokenizer, model.document_placeholder)
        _refuse_long_rows(model, texts, len(rows), "the generator",
                          f"give them fewer documents (each reads as {placeholder} positions, however long) "
                          "or shorter questions and targets")


def _refuse_long_rows(reader: ClaraModel, texts: Iterable[str], count: int, name: str,
                      remedy: str = "cut their documents or targets") -> None:
    """Refuse the ``count`` training rows whose text (prompt and target, as ``reader`` reads
    them) is longer than its context window; ``remedy`` says how to shorten them (the default,
    where the documents are read as text)."""
    window = context_window(reader.lm)
    if window is None:
        return
    long = [(number, length) for number, length in enumerate(_token_counts(reader.tokenizer, texts, count))
            if length > window]
    if long:
        raise InvalidInputError(f"{len(long)} of the {count} training rows are longer than {name}'s context window "
                                f"of {window} positions, training row {long[0][0]} the first ({long[0][1]}): {remedy}")


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], count: int) -> Iterator[int]:
    """Each text's length in tokens."""
    for part in _in_parts(texts, count, "measuring rows"):
        yield from (len(ids) for ids in tokenizer(part, add_special_tokens=False)["input_ids"])


def _in_parts(texts: Iterable[str], count: int, desc: str) -> Iterator[list[str]]:
    """The ``count`` texts 1,024 at a time, to be tokenized a part at a time (a whole run's rows
    at once held every token id: 2 GB for 20,000 rows of five documents), with a bar for many."""
    texts = iter(texts)
    with tqdm(total=count, desc=desc, disable=count < 10_000, leave=False) as bar:
        while part := list(itertools.islice(texts, 1024)):
            yield part
            bar.update(len(part))


def check_run(rows: list[dict], config: TrainConfig, corpus: Sequence[str] | None, probes: dict[str, list[dict]],
              output: str | Path | None = None) -> dict | None:
    """Refuse a run its stage cannot train, before the first step (and, from the CLI, before
    the model loads and a corpus is compressed): bad rows, a corpus (its passages' texts)
    outside e2e, probes that would never be read or cannot be, a missing teacher, and an
    ``output`` that holds another run (other settings, rows or corpus) or no run it could
    resume. Returns the trainer state of the run ``output`` holds (None for a new one)."""
    check_training_rows(rows, config, corpus=corpus is not None)
    if config.teacher:
        read_config(Path(config.teacher))  # a CheckpointError naming it, before any model loads
    if corpus is not None and config.stage != "e2e":
        raise ValueError(f"a corpus store serves the e2e stage only, not {config.stage!r}")
    if probes and not config.probe_every:
        raise ValueError("probes are read every probe_every steps (--probe-every), and it is 0: set it, or pass "
                         "no probes")
    if config.probe_every and not probes:
        raise ValueError("probe_every (--probe-every) is read with probes (--probe) only: pass some, or leave it 0")
    if config.candidates != TrainConfig.candidates and corpus is None:
        raise ValueError("candidates (--candidates) sizes what is retrieved from a corpus store (--corpus): without "
                         "one, each row brings its own candidates")
    if config.stage == "e2e":  # its checkpoint's generator reads top_k documents: as many as it trained on
        width = min(config.candidates, len(corpus)) if corpus is not None else min(len(row["docs"]) for row in rows)
        if config.top_k > width:
            raise ValueError(f"top_k (--top-k) {config.top_k} is more than the {width} candidates of a row: the "
                             f"generator would train on {width} and its checkpoint read {config.top_k}")
    for name, probe_rows in probes.items():
        for number, row in enumerate(probe_rows):
            problem = reading_row_problem(row)
            if problem:
                raise InvalidInputError(f"probe {name}, row {number}: {problem}")
        try:
            reading_width(probe_rows, _probe_k(rows, config))
        except ValueError as error:
            raise ValueError(f"probe {name}: {error}") from error
    if output is None:
        return None
    state = _check_output(Path(output), config, rows, corpus)
    # found at the first save, after a corpus was compressed (a finished run writes only the probes it missed)
    if not run_finished(state, config) or missed_probes(probes, output, state["step"], config.probe_every):
        check_writable(output)
    return state


def _check_output(output: Path, config: TrainConfig, rows: list[dict], corpus: Sequence[str] | None) -> dict | None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file: name a folder for the run")
    log = output / "log.jsonl"
    if log.is_file() and not all(isinstance(record, dict) and isinstance(record.get("step"), int)
                                 for record in read_jsonl(log, appended=True)):
        raise ValueError(f"{log} holds records that are not a training log's (no step): not this library's "
                         "log, so it is left alone; use a new output folder")
    checkpoint = output / "checkpoint"
    recover_folder(checkpoint, CONFIG_FILE)  # a run killed between the swap's two renames left the last save aside
    state_path = checkpoint / TRAINER_STATE_FILE
    if not state_path.exists():
        if checkpoint.exists():
            raise ValueError(f"{checkpoint} holds no {TRAINER_STATE_FILE}, so the run that wrote it cannot resume "
                             f"(earlier versions kept it in {output}: move it into the checkpoint to resume); "
                             "use a new output folder")
        check_replaceable_folder(checkpoint, CONFIG_FILE, saved_again=True)
        return None
    state = _read_trainer_state(state_path)
    saved = {**dataclasses.asdict(TrainConfig(stage=config.stage)), **state["config"]}  # a knob added since: its default
    current = dataclasses.asdict(config)
    # a setting the stage never reads (saved before such settings were refused) changed nothing
    # trained; nor do where the saves fall, and the teacher's paths where its weights' digest is
    # kept (check_trained_from compares that: a path spelt otherwise, "t/" for "t", was refused;
    # its base model's weights are told by their fingerprint)
    free = config.unread_settings() | {"save_every"} | (
        {"teacher", "teacher_base_model"} if state.get("teacher_sha256") else set())
    changed = [f"{name}={current.get(name)!r} (was {saved.get(name)!r})"
               for name in sorted((saved.keys() | current.keys()) - free) if saved.get(name) != current.get(name)]
    if changed:
        raise ValueError(f"{output} was trained with another configuration: {', '.join(changed)}; "
                         "use a new output folder")
    if "rows_sha256" in state and state["rows_sha256"] != rows_sha256(rows):  # states saved before: unchecked
        raise ValueError(f"{output} was trained on other rows than these: resume it with the same data, or use a "
                         "new output folder")
    if "corpus_sha256" in state and state["corpus_sha256"] != corpus_sha256(corpus):
        raise ValueError(f"{output} was trained {'with another corpus' if state['corpus_sha256'] else 'without a corpus'}"
                         f": resume it with {'the same --corpus' if state['corpus_sha256'] else 'none'}, or use a new "
                         "output folder")
    check_replaceable_folder(checkpoint, CONFIG_FILE, saved_again=True)  # now, not at a save after hours of steps
    return state


def check_trained_from(state: dict, digests: dict[str, str], output: str | Path) -> None:
    """Refuse to resume a run, or to call it finished, when the weights it began from changed
    since (a stage before it was trained again in its folder): it went on from the old weights
    unsaid, and a finished one stood as the new stage's result. ``digests`` holds the SHA-256 of
    the weights that ``--init`` and ``--teacher`` name now; states saved before these were
    recorded are not checked."""
    for flag, digest in digests.items():
        if state.get(f"{flag.lstrip('-')}_sha256") not in (None, digest):
            raise CheckpointError(f"{output} was trained from other weights than its {flag} holds now (its files "
                                  "changed since the run began, or the path reaches another folder): train the "
                                  "stage again in a new output folder")


def rows_sha256(rows: list[dict]) -> str:
    """What tells a run's rows from others: the SHA-256 of their JSON."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def corpus_sha256(corpus: Sequence[str] | None) -> str | None:
    """What tells a run's corpus from others: the SHA-256 of its distinct passages, in no
    order (a corpus file and the store made of it list them alike), None for a run without one."""
    return None if corpus is None else rows_sha256(sorted(set(corpus)))


def train(model: ClaraModel, rows: list[dict], config: TrainConfig, output: str | Path,
          corpus: MemoryStore | None = None, probes: dict[str, list[dict]] | None = None) -> Path:
    """Train one stage; resume from ``output`` when it holds a trainer state. Returns the
    checkpoint folder (``output/checkpoint``).

    ``probes`` names held-out row sets (SCP or instruction rows) whose reading gain is logged
    every ``config.probe_every`` steps, and before the first step, as ``{"probe": name, ...}``.
    One run writes a folder at a time (``sole_writer``); a finished run in a folder where no
    lock can be made, which writes nothing, returns its checkpoint.
    """
    with sole_writer(output, "training run"), _undone_if_stopped(model) as undo:
        return _train_stage(model, rows, config, Path(output), corpus, probes or {}, undo)


def _train_stage(model: ClaraModel, rows: list[dict], config: TrainConfig, output: Path,
                 corpus: MemoryStore | None, probes: dict[str, list[dict]], undo: list) -> Path:
    passages = None if corpus is None else [document.text for document in corpus.get(corpus.all_ids())]
    state = check_run(rows, config, passages, probes, output)
    # once, or as the resumed state holds it (checked above): refreshes re-encode the same passages
    corpus_digest = state["corpus_sha256"] if state and "corpus_sha256" in state else corpus_sha256(passages)
    del passages
    weights = model.lm.get_input_embeddings().weight.dtype
    if weights != torch.float32:
        raise ValueError(f"training needs a float32 model, got {weights}: in bfloat16 every weight of an SCP run "
                         f"on a GPU was NaN by step 6 (docs/training-run.md, twenty-fourth session); "
                         f"load it with dtype='float32'")
    check_for_model(model, rows, config, probes)
    # the text stage reads its documents whole; the retrieval stage writes no target; a corpus
    # store's compression counted its own
    if config.stage not in ("text", "retrieval") and corpus is None:
        _warn_cut_documents(model, rows)
    finished = run_finished(state, config)
    teacher = None
    if config.distill_weight and not finished:  # loaded, and refused, before the model's weights and settings change
        teacher = _load_teacher(model, config.teacher, config.teacher_base_model)
    # its files as they were loaded (a save swapped in meanwhile is waited out), or a finished run's,
    # not loaded, hashed: a teacher trained again in its folder, or another reached by the same
    # relative path, taught a resumed run unsaid (or, named otherwise, returned a finished one)
    if state and config.distill_weight:
        check_trained_from(state, {"--teacher": teacher.weights_sha256 if teacher is not None
                                   else files_sha256(weight_files(Path(config.teacher)))}, output)
    teacher_digest = teacher.weights_sha256 if teacher is not None else (state or {}).get("teacher_sha256")
    init_digest = state.get("init_sha256") if state is not None else model.weights_sha256  # what check_trained_from reads
    if teacher is not None:  # which reads the rows' documents whole, as text
        _refuse_long_rows(teacher, (text_prompt(teacher.tokenizer, row) for row in rows), len(rows), "the teacher")
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "checkpoint"
    torch.manual_seed(config.seed)
    resuming = state is not None  # check_run refused a run it could not resume
    if resuming:
        undo.clear()  # the model is the saved run's from here: a stop resumes from its save
        load_trained_weights(model, checkpoint)
    else:
        prepare_stage(model, config)
    if finished:
        warnings.warn(finished_message(output, config), stacklevel=3)  # past train(), at its caller
        return probe_finished_run(model, rows, config, output, probes)
    _read_as_trained(model, config)
    # frozen instruct memories are cached, so the <MEM> rows that made them stay fixed too
    trainable = _trainable(config)
    # pooled memories read no <MEM> row (only a tied output head moves them): where the compressor
    # is frozen, they stay as its signature has them (e2e moved them, and the stores the compressor
    # had filled were refused as another's)
    rows_read = model.config.memory_design == "tokens" or ENCODER in trainable
    set_trainable(model, trainable, memory_embeddings=config.trains_memory_rows and rows_read)
    if state is not None and config.trains_memory_rows and not rows_read and sum(
            len(group["params"]) for group in state["optimizer"]["param_groups"]) > sum(
            p.requires_grad for p in model.parameters()):
        # an earlier version trained them here: a run it saved goes on as it began (its optimizer holds them)
        set_trainable(model, trainable, memory_embeddings=True)
    # a query reasoner that is a copy of the compressor (loaded so) follows the compressor this stage trains
    mirror = ENCODER in trainable and QUERY_REASONER not in trainable and _reasoner_is_compressor(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = _parameter_groups(model, parameters)
    if state is not None and len(state["optimizer"]["param_groups"]) != len(groups):
        groups = [{"params": parameters}]  # saved before the embedding had a group of its own: as it was
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    # a step stopped in this process (Ctrl-C, out of memory) left its first micro-batches' gradients,
    # which the resumed step added to its own
    model.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate(config))
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and model.device.type == "cuda":  # the dropout masks of a GPU run
            torch.cuda.set_rng_state(state["cuda_rng"], model.device)
        if "mps_rng" in state and model.device.type == "mps":
            torch.mps.set_rng_state(state["mps_rng"])
        start = state["step"]
    _forget_steps_after(output / "log.jsonl", start if resuming else None)
    candidates = CandidateMemories(model, corpus) if config.caches_memories else None
    loss_of = {  # (micro-batch, the step's rows) -> (loss, metrics)
        "scp": lambda batch, _: scp_loss(model, batch, config),
        "instruct": lambda batch, _: instruct_loss(model, batch, config, candidates, teacher),
        "e2e": lambda batch, _: e2e_loss(model, batch, config, candidates),
        "retrieval": lambda batch, step_rows: retrieval_loss(model, batch, config, candidates, step_rows),
        "text": lambda batch, _: text_loss(model, batch),
    }[config.stage]

    digest = (state or {}).get("rows_sha256") or rows_sha256(rows)  # a resumed run's rows: checked alike
    probe_k = _probe_k(rows, config)
    model.train()
    started = time.perf_counter() - (state or {}).get("seconds", 0.0)  # the log counts the run's time across resumes
    running = None
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {config.stage}")
    with open(output / "log.jsonl", "a") as log:
        if missed := missed_probes(probes, output, start, config.probe_every):
            _probe(model, missed, probe_k, start, log)
        for step in progress:
            if candidates and config.refresh_every and step and step % config.refresh_every == 0:
                candidates.refresh()
            reported: dict[str, list[float]] = {}
            batches = _batches(rows, config, step)
            step_rows = [row for batch in batches for row in batch]
            for batch in batches:
                loss, metrics = loss_of(batch, step_rows)
                (loss / config.grad_accum).backward()
                for key, value in {"loss": loss.item(), **metrics}.items():
                    reported.setdefault(key, []).append(value)
            # each over the micro-batches that measured it (a restatement gap needs a named
            # question, a recall a gold candidate, a memory cosine two documents)
            totals = {key: sum(values) / len(values) for key, values in reported.items()}
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            if not torch.isfinite(grad_norm):  # one such step would make every weight NaN, and every save after it
                raise FloatingPointError(f"step {step + 1}: the gradients are not finite (loss {totals['loss']}); "
                                         f"{checkpoint} keeps the last saved step")
            lr = scheduler.get_last_lr()[0]  # this step's; stepping the schedule gives the next one's
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running = totals["loss"] if running is None else 0.9 * running + 0.1 * totals["loss"]
            progress.set_postfix(loss=f"{running:.3f}")
            record = {"step": step + 1, **{k: round(v, 5) for k, v in totals.items()},
                      "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "seconds": round(time.perf_counter() - started, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                os.fsync(log.fileno())  # on disk before the save that covers it (a power loss lost its last lines)
                if mirror:
                    copy_adapter(model, ENCODER, QUERY_REASONER)
                save_checkpoint(model, checkpoint, trainer_state={
                    "step": step + 1, "config": dataclasses.asdict(config), "rows_sha256": digest,
                    "corpus_sha256": corpus_digest, "teacher_sha256": teacher_digest, "init_sha256": init_digest,
                    "seconds": time.perf_counter() - started,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), **_rng_states(model)})
                undo.clear()  # a stop from here on resumes from the save
            if probes and (step + 1) % config.probe_every == 0:  # after the save: a run stopped while probing keeps the step
                _probe(model, probes, probe_k, step + 1, log)
    return _holding(model, checkpoint)


@contextlib.contextmanager
def _undone_if_stopped(model: ClaraModel) -> Iterator[list[Callable[[], None]]]:
    """A new run stopped before its first save (Ctrl-C in a notebook, an error) gives the model
    object back as it began: every adapter and the embedding rows as they were (the steps train
    them in place, and the stage's start resets the generator or copies the compressor into the
    query reasoner), and its settings, what trains and its mode. The yielded list holds what puts
    them back (CPU copies), which the caller empties once the model is a saved run's: a new run
    given that object again trained on from them, or from a reset generator."""
    embeddings = {id(m.weight): m.weight for m in (model.lm.get_input_embeddings(), model.lm.get_output_embeddings())
                  if m is not None}
    weights = [p for name, p in model.lm.named_parameters() if "lora_" in name] + list(embeddings.values())
    copies = [weight.detach().to("cpu", copy=True) for weight in weights]
    settings = (model.config.decoder_reads_text, model.config.generation_top_k, model.trainable, model.training,
                [weight.requires_grad for weight in embeddings.values()])

    def put_back() -> None:
        with torch.no_grad():
            for weight, copy in zip(weights, copies):
                weight.copy_(copy)
        model.config.decoder_reads_text, model.config.generation_top_k, model.trainable, training, grads = settings
        for weight, grad in zip(embeddings.values(), grads):
            weight.requires_grad_(grad)
        model.train(training)  # its adapters' dropout as it was
        model._apply_trainable()  # and whose LoRA weights take gradients

    undo = [put_back]
    try:
        yield undo
    except BaseException:
        for step in undo:
            step()
        raise


def _warn_cut_documents(model: ClaraModel, rows: list[dict]) -> None:
    """Training reads a document's first doc_max_length tokens, as compression does, but a
    row's target (a reconstruction, an answer) may be about the rest, which its memories cannot
    hold: the rows' documents that long are counted in one warning, with the rows whose answer
    their documents hold past that cut alone (a cloze blank, or an Oracle answer, late in a long
    passage). The steps compress them without a word: a warning a step buried the progress bar."""
    texts = list(dict.fromkeys(document for row in rows for document in row["docs"]))
    limit = model.config.doc_max_length
    beginnings = list(_kept_texts(model.tokenizer, texts, limit))
    cut = sum(was_cut for _, was_cut in beginnings)
    if not cut:
        return
    whole = {text: text.lower() for text in texts}
    kept = {text: beginning.lower() for text, (beginning, _) in zip(texts, beginnings)}
    lost = [number for number, row in enumerate(rows)  # a reconstruction's document is its target: counted above
            if any(_past_the_cut(answer.lower(), row["docs"], whole, kept) for answer in trained_answers(row)
                   if answer not in row["docs"])]
    warnings.warn(f"{cut} of the rows' {len(texts)} documents are longer than doc_max_length ({limit} tokens): "
                  f"the compressor reads their first {limit}, and a target about the rest asks for what their "
                  f"memories cannot hold"
                  + (f"; {len(lost)} rows' answers are in their documents past the cut alone, training row "
                     f"{lost[0]} the first" if lost else ""), stacklevel=4)  # past _train_stage and train()


def _past_the_cut(answer: str, documents: list[str], whole: dict[str, str], kept: dict[str, str]) -> bool:
    """Whether (lower-cased) ``answer`` is in a document (``whole``, lower-cased) but in none of
    their kept beginnings."""
    return (any(answer in whole[document] for document in documents)
            and not any(answer in kept[document] for document in documents))


def _kept_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: int) -> Iterator[tuple[str, bool]]:
    """Each text's first ``limit`` tokens, as text (what the compressor reads of it), and
    whether that cut it: by the fast tokenizer's offsets, or a slow one's decoded tokens."""
    for part in _in_parts(texts, len(texts), "measuring documents"):
        if tokenizer.is_fast:
            spans = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            yield from ((text, False) if len(offsets) <= limit else (text[:offsets[limit - 1][1]], True)
                        for text, offsets in zip(part, spans))
        else:  # no offsets
            rows = tokenizer(part, add_special_tokens=False)["input_ids"]
            yield from ((text, False) if len(ids) <= limit else (tokenizer.decode(ids[:limit]), True)
                        for text, ids in zip(part, rows))


def _holding(model: ClaraModel, checkpoint: Path) -> Path:
    """The trained model, for use: in eval mode, named by the last save's files it now holds,
    not by the folder it was loaded from, and reasoning as that checkpoint loads."""
    model.eval()
    model._reason_with_compressor()
    model.name_or_path, model.weights_sha256 = str(checkpoint), files_sha256(weight_files(checkpoint))
    return checkpoint
