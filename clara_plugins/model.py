"""ClaraModel: one causal LM, three LoRA adapters, documents as memory tokens.

- ``encoder_adapter`` compresses a document into n memory vectors: pooled states of n equal
  chunks of its tokens, or the last-layer states at n appended ``<MEM>`` positions (Apple's
  design), as ``ClaraConfig.memory_design`` says;
- ``query_reasoner_adapter`` encodes a question the same way, for retrieval by cosine;
- ``decoder_adapter`` answers from a prompt whose ``<MEM>`` placeholders carry those vectors.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .atomic import writer_at_work
from .backbone import (FLOAT_DTYPES, FLOAT_NAMES, context_window, embedding_norm, end_of_sequence_ids, fingerprint,
                       load_base_model, memory_layer_problem, resolve_device, resolve_dtype)
from .checkpoint import files_sha256, load_trained_weights, read_config, save_checkpoint, weight_files
from .config import ADAPTER_NAMES, DEFAULT_BASE_MODEL, ClaraConfig
from .checks import check_positive_int, check_texts
from .errors import CheckpointError, InvalidInputError, one_line, warn_bounded
from .generation import collect_answers, greedy_steps, stream_text
from .prompts import question_prompt, turn_end_token
from .retrieval import top_k

ENCODER, QUERY_REASONER, DECODER = ADAPTER_NAMES


@dataclasses.dataclass
class CompressedDocuments:
    """Memory vectors of a batch of documents and how much of each text they saw."""

    memories: torch.Tensor  # [n_docs, n_mem, hidden]
    token_counts: list[int]  # document tokens before truncation
    truncated_tokens: list[int]  # tokens cut beyond doc_max_length


# base models CLaRa cannot adapt, by model type: MPT was compressed, then every answer failed
# inside peft; peft refuses LoRA on a state-space model's layers, advising a setting CLaRa has not;
# a recurrent model was compressed, then every answer failed on a bare KeyError at its second token
_UNREADABLE = {
    "mpt": "an MPT model, whose peft forward refuses inputs_embeds, through which the generator reads memories",
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"),
                    "a state-space model, whose layers LoRA cannot adapt: choose a transformer"),
    **dict.fromkeys(("recurrent_gemma", "rwkv"),
                    "a recurrent model, which returns no key-value cache for the generator's next token: choose a "
                    "transformer"),
}


def _unreadable(lm: PreTrainedModel) -> str | None:
    """Why CLaRa cannot read memories through this base model, or None. Gemma 3n and Gemma 4's
    small models add per-layer embeddings looked up by token id, which a memory vector has none
    of: Gemma 3n left that part out of every pass the generator made from inputs_embeds, Gemma 4
    failed on them."""
    if lm.config.model_type in _UNREADABLE:
        return _UNREADABLE[lm.config.model_type]
    if getattr(lm.config.get_text_config(), "hidden_size_per_layer_input", None):
        return ("a model with per-layer token embeddings (Gemma 3n, Gemma 4's E2B and E4B), which it looks up by "
                "token id and memory vectors have none of: choose a transformer without them")
    return None


class ClaraModel(torch.nn.Module):
    """CLaRa on any Hugging Face causal LM.

    The verbs: ``compress`` documents, ``encode_queries``, ``answer`` (batched) and
    ``stream_answer`` questions from memories, ``generate`` / ``stream`` any prompt whose
    document placeholders carry memories, and ``save_pretrained`` / ``from_pretrained``.
    Apple's method names remain as aliases, with this class's signatures and returns. The model is safe to share between threads
    and interleaved generators: every forward pass activates its adapter under one lock.
    The trainer's passes (``passes.py``) use the underscored ``_encode_tokens``,
    ``_decoder_inputs`` and ``_adapter``: an interface for training, not for users.

    >>> model = ClaraModel(ClaraConfig(compression_rate=16))        # offline SmolLM2 default
    >>> memories = model.compress(["Paris is the capital of France."]).memories
    >>> model.answer(["Capital of France?"], memories.unsqueeze(0))
    """

    def __init__(
        self,
        config: ClaraConfig | None = None,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, ClaraConfig):  # a path failed on dataclasses.replace
            raise InvalidInputError(f"config must be a ClaraConfig, got {type(config).__name__} {config!r:.60}: load a "
                                    "checkpoint with ClaraModel.from_pretrained")
        self.config = dataclasses.replace(config) if config else ClaraConfig()  # its own copy: training edits it
        self.name_or_path: str | None = None  # the checkpoint folder its weights were loaded from
        self.weights_sha256: str | None = None  # and those files' checksum (a folder may be saved again)
        self.device_ = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device_)
        lm, tokenizer = load_base_model(self.config.base_model, dtype)
        if (unread := _unreadable(lm)) is not None:
            raise ValueError(f"{self.config.base_model!r} is {unread}")
        if (problem := memory_layer_problem(lm, self.config.memory_layer)) is not None:
            raise ValueError(f"ClaraConfig.memory_layer is {self.config.memory_layer}, but {self.config.base_model!r} "
                             f"{problem}")
        self.base_fingerprint = fingerprint(lm, tokenizer)
        self.tokenizer = tokenizer
        self.base_vocab_size = len(tokenizer)
        self._embedding_norm = embedding_norm(lm)  # the size memory_scale gives every memory vector
        self._check_encoder_window(lm)  # before n_mem_tokens rows join the vocabulary (a header's 10**12 took them all)
        self._add_special_tokens(lm)
        lora = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft reads transformers' deprecated name on every load
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            self.lm = get_peft_model(lm, lora, adapter_name=ENCODER)
        for name in ADAPTER_NAMES[1:]:
            self.lm.add_adapter(name, lora)
        self._lock = threading.RLock()  # adapter switches and forward passes, across threads
        self.trainable: tuple[str, ...] = ()  # adapters whose LoRA weights train (see passes.py)
        # (matrix, its added rows as a checkpoint gave them): what compressor_signature signs
        self.given_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._apply_trainable()
        self.to(self.device_)
        self.eval()

    # ------------------------------------------------------------------ set-up

    def _check_encoder_window(self, lm: torch.nn.Module) -> None:
        """Refuse a doc_max_length whose longest framed document runs past the backbone's
        positions: a model with learned positions failed on an index, a rotary one compressed
        from positions it never saw."""
        window = context_window(lm)
        tok = self.tokenizer
        framing = 1 + (tok.bos_token_id is not None) + (tok.eos_token_id is not None)  # <ENC> bos ... eos
        appended = self.config.n_mem_tokens if self.config.memory_design == "tokens" else 0
        longest = framing + self.config.doc_max_length + appended
        if window and longest > window:
            raise ValueError(f"ClaraConfig.doc_max_length {self.config.doc_max_length} frames a document in {longest} "
                             f"positions, past {self.config.base_model!r}'s context window of {window}")

    def _add_special_tokens(self, lm: torch.nn.Module) -> None:
        """Append <MEM0..n-1>, <AE>, <ENC>, <SEP> to the vocabulary, in that order."""
        self.mem_tokens = [f"<MEM{i}>" for i in range(self.config.n_mem_tokens)]
        new_tokens = self.mem_tokens + ["<AE>", "<ENC>", "<SEP>"]
        # what text may not hold: CLaRa's tokens and the template's, listed or only marked special
        # and written by the template (Llama 3's <|eot_id|>); SmolLM2's <filename> is a word
        template = str(self.tokenizer.chat_template or "")
        written = {token.content for token in self.tokenizer.added_tokens_decoder.values()
                   if token.special and token.content in template}
        self.control_tokens = sorted({*new_tokens, *self.tokenizer.all_special_tokens, *written})
        clashes = [t for t in new_tokens if t in self.tokenizer.get_vocab()]
        if clashes:
            raise ValueError(f"the base tokenizer already has CLaRa's special tokens {clashes}")
        self.tokenizer.add_tokens(new_tokens, special_tokens=True)
        self.mem_token_ids = self.tokenizer.convert_tokens_to_ids(self.mem_tokens)
        self.enc_token_id = self.tokenizer.convert_tokens_to_ids("<ENC>")
        self.document_placeholder = "".join(self.mem_tokens) + "<SEP>"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:  # found at the first compression, as a bare TypeError
                raise ValueError(f"{self.config.base_model!r}'s tokenizer has neither a padding nor an end-of-sequence "
                                 "token: CLaRa pads its batches with one and ends its answers at the other")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        lm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self._init_new_rows(lm)
        # and the special token that ends the template's answer turn, where it is neither
        turn_end = turn_end_token(self.tokenizer)
        self.stop_token_ids = end_of_sequence_ids(lm, self.tokenizer) | ({turn_end} if turn_end is not None else set())

    def _init_new_rows(self, lm: torch.nn.Module) -> None:
        """New rows = mean old row + small seeded noise: reproducible, in the old rows' range."""
        generator = torch.Generator().manual_seed(0)
        matrices = {id(m.weight): m.weight for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
                    if m is not None}
        with torch.no_grad():
            for matrix in matrices.values():
                old = matrix[: self.base_vocab_size].float()
                noise = torch.randn(matrix.size(0) - self.base_vocab_size, matrix.size(1), generator=generator)
                matrix[self.base_vocab_size:] = (old.mean(0) + 0.1 * old.std(0) * noise).to(matrix.dtype)

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Run the block with one adapter active, holding the model's lock; the training choice
        is applied again after peft's switch, which resets it (``_apply_trainable``)."""
        with self._lock:
            if self.lm.active_adapter != name:
                self.lm.set_adapter(name)
                self._apply_trainable()
            yield

    def _apply_trainable(self) -> None:
        """The training choice (``trainable``): whose LoRA weights take gradients and, in training
        mode, whose dropout is on. peft resets both for an adapter it activates (requires_grad to
        it alone; from peft 0.22 its dropout to the model's mode, and a frozen generator read
        through fresh dropout masks again), so each switch applies it again."""
        for name, parameter in self.lm.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(any(f".{a}." in name for a in self.trainable))
        if self.training:
            self._frozen_dropouts_off()

    def train(self, mode: bool = True) -> "ClaraModel":
        """Training mode, but for the dropout of adapters that do not train: a frozen adapter
        reads as it will at inference (a frozen generator answered each e2e step through fresh
        dropout masks, so the query reasoner learned from a generator other than the one that
        answers)."""
        super().train(mode)
        if mode:
            self._frozen_dropouts_off()
        return self

    def _frozen_dropouts_off(self) -> None:
        """(In training mode) dropout on for the adapters that train, off for the others."""
        for module in self.lm.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name, dropout in dropouts.items():
                    dropout.train(name in self.trainable)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No gradients and dropout off for the block; a model in training mode returns to it.

        Taken per forward pass under the model's lock (threads share these switches: one
        thread's return to training mode ran another's pass with dropout on), and never held
        across a ``yield``: interleaved streams would leave them wrong.
        """
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.train()

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without its lock, which cannot be: the copy makes its own."""
        return {name: value for name, value in super().__getstate__().items() if name != "_lock"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().weight.size(1)

    # ------------------------------------------------------------ compression

    def _encoder_inputs(self, bodies: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``<ENC> bos text eos``, left-padded, then (``tokens`` design) the n <MEM> ids, with
        their position ids.

        Positions are those of Apple's layout, where every sequence is left-padded to
        doc_max_length + 3: a document compresses alone as in any batch (up to the rounding of
        kernels at other widths). Padding only to the batch's longest sequence gives the same
        states at a fraction of the cost.
        A longer document keeps doc_max_length tokens and its eos; Apple's tokenizer cuts the
        framed sequence instead, keeping one more text token and no eos.
        """
        prefix, suffix = self._document_frame()
        sequences = [prefix + body[: self.config.doc_max_length] + suffix for body in bodies]
        ids, mask = _left_pad(sequences, self.tokenizer.pad_token_id)
        n_appended = self.config.n_mem_tokens if self.config.memory_design == "tokens" else 0
        ids = torch.cat([ids, torch.tensor(self.mem_token_ids[:n_appended], dtype=torch.long).expand(len(bodies), -1)], 1)
        mask = torch.cat([mask, torch.ones(len(bodies), n_appended, dtype=torch.long)], dim=1)
        full_width = self.config.doc_max_length + len(prefix) + len(suffix)
        width = len(ids[0]) - n_appended
        positions = torch.arange(full_width - width, full_width + n_appended).expand(len(bodies), -1)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _document_frame(self) -> tuple[list[int], list[int]]:
        """The token ids around every document's text: ``<ENC> bos`` before it, ``eos`` after."""
        tok = self.tokenizer
        prefix = [self.enc_token_id] + ([tok.bos_token_id] if tok.bos_token_id is not None else [])
        return prefix, [tok.eos_token_id] if tok.eos_token_id is not None else []

    def _chunk_pooling(self, bodies: list[list[int]], width: int) -> torch.Tensor:
        """Weights [batch, n_mem, width] that pool each of n equal chunks of a document's tokens.

        Rows are left-padded and end with the frame's suffix, so a body of L tokens sits just
        before it. A body shorter than n gives some tokens to several chunks; an empty one
        pools the whole sequence.
        """
        n = self.config.n_mem_tokens
        prefix, suffix = (len(part) for part in self._document_frame())
        weights = torch.zeros(len(bodies), n, width)
        for row, body in enumerate(bodies):
            length = min(len(body), self.config.doc_max_length)
            end = width - suffix
            start = end - length
            if length == 0:
                start, end = width - prefix - suffix, width
            span = end - start
            for chunk in range(n):
                first = start + chunk * span // n
                last = max(start + (chunk + 1) * span // n, first + 1)
                if self.config.memory_pooling == "mean":
                    weights[row, chunk, first:last] = 1.0 / (last - first)
                else:
                    weights[row, chunk, last - 1] = 1.0
        return weights.to(self.device)

    def _encode_tokens(self, bodies: list[list[int]], adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory vectors [batch, n_mem, hidden] and the mean state of the document tokens
        [batch, hidden] (SCP's alignment target), from one forward pass.

        Beyond doc_max_length tokens a document keeps its start and a query its end, where a
        chat turn's question follows its instructions; in training and in use alike."""
        if adapter == QUERY_REASONER:
            bodies = [body[-self.config.doc_max_length:] for body in bodies]
        ids, mask, positions = self._encoder_inputs(bodies)
        pooled = self.config.memory_design == "pooled"
        layer = self.config.memory_layer if pooled else -1
        with self._adapter(adapter):
            backbone = self.lm.get_base_model().base_model  # the blocks and final norm, no lm_head
            output = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                              output_hidden_states=layer != -1)
        hidden = output.last_hidden_state if layer == -1 else output.hidden_states[layer]
        n_appended = 0 if pooled else self.config.n_mem_tokens
        document = hidden[:, : hidden.size(1) - n_appended]  # [batch, width, hidden]
        document_mask = mask[:, : hidden.size(1) - n_appended].unsqueeze(-1).to(hidden.dtype)
        document_mean = (document * document_mask).sum(1) / document_mask.sum(1)
        if pooled:
            memories = torch.einsum("bnw,bwh->bnh", self._chunk_pooling(bodies, document.size(1)).to(hidden.dtype),
                                    document)
        else:
            memories = hidden[:, -n_appended:, :]
        if self.config.memory_scale:  # the MSE's target too, or it would pull the states to another size
            memories, document_mean = (scaled_to(x, self._embedding_norm) for x in (memories, document_mean))
        return memories, document_mean

    def compress(
        self, documents: Sequence[str], batch_size: int = 8, show_progress: bool = False, warn: bool = True,
        *, progress: tqdm | None = None,
    ) -> CompressedDocuments:
        """Compress documents with the encoder adapter, reporting truncation (in the result, and
        unless ``warn`` is False a warning: a cut document's memories hold only its first
        ``doc_max_length`` tokens; ``compress_in_parts`` warns once for all its parts).

        Documents are batched by length (less padding); results come back in input order. An
        open ``progress`` bar is advanced by the documents done, in place of a bar of their own
        (``compress_in_parts`` shows one bar for all its parts).
        """
        documents = check_texts(documents, "documents")
        check_positive_int("batch_size", batch_size)  # below 1 no batch ran, and the empty tensor came back as memories
        bodies = self.tokenizer(documents, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(bodies)), key=lambda i: len(bodies[i]))
        memories = torch.empty(len(bodies), self.config.n_mem_tokens, self.hidden_size,
                               dtype=self.lm.get_input_embeddings().weight.dtype, device=self.device)
        with contextlib.nullcontext(progress) if progress is not None else \
                tqdm(total=len(bodies), desc="compressing", unit="doc", disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                memories[batch] = self._encode_for_use([bodies[i] for i in batch], ENCODER)
                bar.update(len(batch))
        counts = [len(b) for b in bodies]
        cut = [max(0, c - self.config.doc_max_length) for c in counts]
        if warn:
            report_cuts(cut, self.config.doc_max_length, stacklevel=3)
        return CompressedDocuments(memories, counts, cut)

    def encode_queries(self, questions: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Questions -> query-reasoner memory tensor [n_questions, n_mem, hidden]. A question
        longer than ``doc_max_length`` tokens keeps its end (where a chat turn puts the question
        after its instructions), with a warning."""
        questions = check_texts(questions, "questions")
        check_positive_int("batch_size", batch_size)
        bodies = self.tokenizer(questions, add_special_tokens=False)["input_ids"]
        long = sum(len(body) > self.config.doc_max_length for body in bodies)
        if long:
            warn_bounded(f"{long} of {len(bodies)} queries exceed doc_max_length={self.config.doc_max_length} "
                         "tokens; each is encoded from its last tokens", stacklevel=2)
        return torch.cat([self._encode_for_use(bodies[start:start + batch_size], QUERY_REASONER)
                          for start in range(0, len(bodies), batch_size)])

    def _encode_for_use(self, bodies: list[list[int]], adapter: str) -> torch.Tensor:
        """One encoder pass out of training: its inference switches set under the lock, per
        pass as ``_decode`` sets them (threads share the switches)."""
        with self._lock, self._inference():
            return self._encode_tokens(bodies, adapter)[0]

    def _reason_with_compressor(self) -> bool:
        """Before the end-to-end stage the query reasoner is the plain base model (a fresh LoRA's
        B matrices are zero), which would encode questions in another space than the trained
        compressor encodes documents: then it becomes a copy of the compressor. Whether it did."""
        def trained(adapter: str) -> bool:
            return any(bool(parameter.detach().any()) for key, parameter in self.lm.named_parameters()
                       if f".lora_B.{adapter}." in key)

        if not trained(ENCODER) or trained(QUERY_REASONER):
            return False
        copy_adapter(self, ENCODER, QUERY_REASONER)
        return True

    # -------------------------------------------------------------- answering

    def answer(
        self, questions: Sequence[str], memories: torch.Tensor, max_new_tokens: int | None = None
    ) -> list[str]:
        """Answer each question from its own documents' memories, [n_questions, k, n_mem, hidden],
        in the answering prompt the generator was trained on."""
        questions = check_texts(questions, "questions")
        refuse_control_tokens(self, questions, "question")
        memories = self._as_batched_memories(questions, memories)
        prompts = [question_prompt(self.tokenizer, q, memories.size(1), self.document_placeholder) for q in questions]
        return self.generate(prompts, list(memories), max_new_tokens)

    def stream_answer(
        self, question: str, memories: torch.Tensor, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """``answer`` for one question over [k, n_mem, hidden] memories, yielded piece by piece."""
        refuse_control_tokens(self, check_texts([question], "question"), "question")
        memories = self._as_batched_memories([question], memories)[0]
        prompt = question_prompt(self.tokenizer, question, len(memories), self.document_placeholder)
        return self.stream(prompt, memories, max_new_tokens)

    def generate(
        self, prompts: Sequence[str], memories: Sequence[torch.Tensor | None] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy completions of rendered prompts in which each document is
        ``document_placeholder``; ``memories[i]`` [k_i, n_mem, hidden] fills prompt i's
        placeholders in order (None or no list: prompts without documents)."""
        prompts = check_texts(prompts, "prompts")
        with torch.no_grad():  # each pass sets the inference switches itself, under the lock (_decode)
            steps = self._greedy(*self._decoder_inputs(prompts, memories)[:2], max_new_tokens)
            return collect_answers(self.tokenizer, steps, len(prompts), self.stop_token_ids)

    def stream(
        self, prompt: str, memories: torch.Tensor | None = None, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """``generate`` for one prompt, yielded piece by piece as the tokens decode; the prompt,
        its memories and the answer length are checked at the call, before the first piece."""
        prompts = check_texts([prompt], "prompt")
        with torch.no_grad():  # an embedding lookup: no dropout to switch off
            embeds, mask, _ = self._decoder_inputs(prompts, [memories])
        return stream_text(self.tokenizer, self._greedy(embeds, mask, max_new_tokens), self.stop_token_ids)

    def _decoder_inputs(
        self, texts: list[str], memories: Sequence[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings of left-padded texts whose <MEM> placeholders carry the memories.

        memories[i]: [k_i, n_mem, hidden] for text i (k_i documents), or None. Returns the
        input embeddings, the attention mask and the token ids.
        """
        groups = [None] * len(texts) if memories is None else [
            None if group is None else as_memories(group, f"prompt {row}'s memories") for row, group in enumerate(memories)]
        if len(groups) != len(texts):
            raise InvalidInputError(f"got {len(groups)} memory groups for {len(texts)} prompts")
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, mask = _left_pad(rows, self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        slots = torch.isin(ids, torch.tensor(self.mem_token_ids, device=self.device))
        shape = (self.config.n_mem_tokens, self.hidden_size)
        for row, (group, found) in enumerate(zip(groups, slots.sum(dim=1).tolist())):
            if group is not None and group.numel() and tuple(group.shape[1:]) != shape:  # would fill slots wrongly
                raise InvalidInputError(f"prompt {row}'s memories have shape {tuple(group.shape)}, not "
                                        f"[documents, {shape[0]}, {shape[1]}] (n_mem_tokens, hidden)")
            expected = 0 if group is None or not group.numel() else group.size(0) * group.size(1)
            if found != expected:
                raise InvalidInputError(
                    f"prompt {row} has {found} memory slots for {expected} memory vectors: each document "
                    "is one document_placeholder, and text must not contain CLaRa's <MEM> tokens"
                )
        embeds = self.lm.get_input_embeddings()(ids)
        # each group moved first: stored memories (CPU) and fresh ones (GPU) meet in one batch
        filled = [g.reshape(-1, g.size(-1)).to(device=embeds.device, dtype=embeds.dtype)
                  for g in groups if g is not None and g.numel()]
        if filled:
            values = torch.cat(filled)
            if not torch.isfinite(values).all():  # finite as given, past the range of an fp16 model's
                raise InvalidInputError(f"memories must be finite in the model's {embeds.dtype}: some lie past its "
                                        "range")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), values)
        return embeds, mask, ids

    def _answer_limit(self, max_new_tokens: int | None) -> int:
        """The tokens an answer may take: ``max_new_tokens``, checked (None: the config's limit)."""
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_positive_int("max_new_tokens", limit)
        return limit

    def _greedy(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | None) -> Iterator[torch.Tensor]:
        """Decoding steps, at most ``max_new_tokens`` (None: the config's limit)."""
        limit = self._answer_limit(max_new_tokens)
        window = context_window(self.lm)
        if window and embeds.size(1) + limit > window:  # past it, answers degrade unseen or positions overflow
            raise InvalidInputError(f"the prompt holds {embeds.size(1)} positions and the answer up to {limit} more, "
                                    f"past the model's context window of {window}: read fewer documents or a "
                                    "shorter history")
        return greedy_steps(self._decode, self.lm.get_input_embeddings(), embeds, mask, int(limit),
                            self.stop_token_ids)

    def _decode(self, **inputs: torch.Tensor):
        """One forward pass of the generator. The adapter and the inference switches are set
        per pass, so a search run between two streamed tokens cannot change the answer."""
        with self._adapter(DECODER), self._inference():
            return self.lm(**inputs)

    def _as_batched_memories(self, questions: list[str], compressed: torch.Tensor) -> torch.Tensor:
        """Accept [B*k, n, h] (Apple's layout) or [B, k, n, h]; return [B, k, n, h]."""
        compressed = as_memories(compressed, "compressed documents")
        n, h = self.config.n_mem_tokens, self.hidden_size
        given = tuple(compressed.shape)  # as the caller passed it, not as reshaped below
        if compressed.dim() < 3:  # one document's [n_mem, hidden]: "do not fit ... of shape (n, h)" named no cause
            raise InvalidInputError(f"compressed documents of shape {tuple(compressed.shape)} lack the documents' "
                                    f"dimension: give [documents, {n}, {h}] (one document's memories[None])")
        if compressed.dim() == 3 and compressed.size(0) % len(questions) == 0:
            compressed = compressed.reshape(len(questions), compressed.size(0) // len(questions),
                                            *compressed.shape[1:])
        if compressed.dim() != 4 or compressed.size(0) != len(questions) or compressed.shape[2:] != (n, h):
            raise InvalidInputError(
                f"compressed documents of shape {given} do not fit "
                f"{len(questions)} questions with memories of shape ({n}, {h})"
            )
        if compressed.dtype == torch.float64:  # numpy's default, cast before it moves: Apple's GPU refuses it
            compressed = compressed.float()
            if not torch.isfinite(compressed).all():  # as _decoder_inputs names values past the model's dtype
                raise InvalidInputError("memories must be finite in torch.float32: some lie past its range")
        return compressed.to(self.device)  # the model's own dtype, and its range check, come in _decoder_inputs

    # ------------------------------------------------------- Apple's method names

    def compress_documents(
        self, documents: Sequence[str], batch_size: int = 8, show_progress: bool = False
    ) -> torch.Tensor:
        """Apple's name: documents -> memories [n_docs, n_mem, hidden]; warns when text was cut."""
        return self._warned_memories(documents, batch_size, show_progress)

    def _warned_memories(self, documents: Sequence[str], batch_size: int = 8, show_progress: bool = False) -> torch.Tensor:
        """``compress``'s memories, its warning of cut text pointing at the code that called the
        public method calling this one (``compress``'s own pointed here)."""
        compressed = self.compress(documents, batch_size, show_progress, warn=False)
        report_cuts(compressed.truncated_tokens, self.config.doc_max_length, stacklevel=4)
        return compressed.memories

    def generate_from_compressed_documents_and_questions(
        self, questions: Sequence[str], compressed_documents: torch.Tensor, max_new_tokens: int | None = None
    ) -> list[str]:
        """Apple's name for ``answer``."""
        return self.answer(questions, compressed_documents, max_new_tokens)

    def generate_from_text(
        self, questions: Sequence[str], documents: Sequence[Sequence[str]], max_new_tokens: int | None = None
    ) -> list[str]:
        """Apple's name: compress each question's documents, then answer from all of them."""
        questions = check_texts(questions, "questions")
        refuse_control_tokens(self, questions, "question")  # before the documents are compressed
        self._answer_limit(max_new_tokens)  # as are these
        flat = self._flatten_document_lists(questions, documents)
        return self.answer(questions, self._warned_memories(flat), max_new_tokens)

    def generate_from_questions(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        k: int | None = None,
        max_new_tokens: int | None = None,
    ) -> tuple[list[str], torch.Tensor]:
        """Apple's name: the query reasoner keeps the top-k of each question's candidates, then
        the generator answers. Returns the answers and the chosen indices [n_questions, k'],
        k' = min(k, documents a question)."""
        questions = check_texts(questions, "questions")
        refuse_control_tokens(self, questions, "question")  # before the documents are compressed
        k = self.config.generation_top_k if k is None else k
        check_positive_int("k", k)  # 0 read the default k
        self._answer_limit(max_new_tokens)
        flat = self._flatten_document_lists(questions, documents)
        candidates = self._warned_memories(flat).reshape(len(questions), -1, self.config.n_mem_tokens,
                                                         self.hidden_size)
        chosen, top = top_k(self.encode_queries(questions), candidates, int(k), self.config.retrieval_key)
        return self.answer(questions, chosen, max_new_tokens), top

    @staticmethod
    def _flatten_document_lists(questions: list[str], documents: Sequence[Sequence[str]]) -> list[str]:
        if isinstance(documents, str) or len(documents) != len(questions) or \
                any(isinstance(docs, str) or not isinstance(docs, Sequence) for docs in documents):
            # a flat list of texts was measured by its characters ("got [4, 12]")
            raise InvalidInputError("documents must hold one list of documents per question")
        sizes = {len(docs) for docs in documents}
        if len(sizes) != 1:
            raise InvalidInputError(f"every question needs the same number of documents, got {sorted(sizes)}")
        return [doc for docs in documents for doc in check_texts(docs, "documents")]

    # ------------------------------------------------------------ persistence

    @classmethod
    def _of_checkpoint(cls, config: ClaraConfig, folder: str | Path, base_model_given: bool, device: str,
                       dtype: str | torch.dtype) -> "ClaraModel":
        """A model of a checkpoint's config, before its weights load. A base model the checkpoint
        records that fails to load names the checkpoint and the override: on another machine, a
        recorded folder or an uncached hub id failed without saying where the name came from.
        The LoRA weights drawn at random here are overwritten by the checkpoint's: drawn from a
        fork of torch's generator, so that loading leaves a caller's seeded stream as it was."""
        try:
            with torch.random.fork_rng(devices=[]):  # built on the CPU, then moved
                return cls(config, device=device, dtype=dtype)
        except OSError as error:
            if base_model_given or config.base_model == DEFAULT_BASE_MODEL:
                raise
            raise OSError(f"{one_line(error)}; {folder} records it as its base model: pass base_model= "
                          "(--base-model; a distillation teacher's: --teacher-base-model) naming a copy of the same "
                          "weights") from error

    def save_pretrained(self, folder: str | Path, dtype: str | torch.dtype | None = None) -> None:
        """Write config JSON + safetensors adapters and memory-token rows (see checkpoint.py);
        ``dtype=torch.float16`` (or ``"float16"``) halves the size."""
        if dtype is not None:
            dtype = resolve_dtype(dtype, torch.device("cpu"))  # integers: the weights cut, loaded without a complaint
        save_checkpoint(self, Path(folder), dtype)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        base_model: str | os.PathLike[str] | None = None,
        compression_rate: int | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
    ) -> "ClaraModel":
        """Load a checkpoint saved by ``save_pretrained``; ``base_model`` overrides its path.

        ``compression_rate`` reads a pooled checkpoint's documents at another rate than it was
        trained at: its memories pool finer or coarser chunks of the same compressor states.
        Appended-token checkpoints (Apple's design) learned one state per position and refuse.
        """
        _settled_identity(Path(folder))
        config = read_config(Path(folder))
        if base_model is not None:
            config = dataclasses.replace(config, base_model=base_model)
        if compression_rate not in (None, config.compression_rate):
            if config.memory_design != "pooled":
                raise CheckpointError(
                    f"checkpoint {folder} uses the {config.memory_design!r} memory design, whose memory tokens "
                    f"were trained one per position: it reads only at its own compression rate "
                    f"{config.compression_rate}, not {compression_rate}")
            config = dataclasses.replace(config, compression_rate=compression_rate)
        model = cls._of_checkpoint(config, folder, base_model is not None, device, dtype)
        # a training run saving into the folder swaps a new one in: files read across a swap
        # would mix two saves, so the read is done again until no swap fell within it
        for _ in range(_LOAD_TRIES):
            swaps = _settled_identity(Path(folder))
            try:
                load_trained_weights(model, Path(folder), another_rate=compression_rate is not None)
                weights_sha256 = files_sha256(weight_files(Path(folder)))
            except (OSError, CheckpointError):  # a file the swap took away, or one half written
                if _folder_identity(Path(folder)) == swaps:
                    raise
                continue
            if _folder_identity(Path(folder)) == swaps:
                break
        else:
            raise CheckpointError(f"{folder} was replaced by new saves {_LOAD_TRIES} times while it was read")
        model.name_or_path, model.weights_sha256 = str(folder), weights_sha256
        if model._reason_with_compressor():
            warnings.warn(f"{folder} has an untrained query reasoner (it was saved before the end-to-end stage): "
                          "questions are encoded by its compressor", stacklevel=2)
        return model


_LOAD_TRIES = 5
COMPRESS_PART = 1024  # texts compress_in_parts compresses at a time


# within ``tallied_cuts``: the tokens cut from each document compressed so far
_CUT_TALLY: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("cut_tally", default=None)


@contextlib.contextmanager
def tallied_cuts() -> Iterator[list[int]]:
    """The tokens cut from each document the block compresses, gathered instead of warned of."""
    cuts: list[int] = []
    token = _CUT_TALLY.set(cuts)
    try:
        yield cuts
    finally:
        _CUT_TALLY.reset(token)


@contextlib.contextmanager
def cuts_warned_once(limit: int, stacklevel: int) -> Iterator[None]:
    """Warn once, as the block ends (stopped too: its resume skips what it compressed), of the
    documents its compressions cut (``stacklevel`` from the caller's frame): a loop of
    compressions warned once a call, so that a corpus indexed 1,024 documents at a time warned
    up to a thousand times."""
    try:
        with tallied_cuts() as cuts:
            yield
    finally:
        if any(cuts):
            warn_bounded(_cut_message(cuts, limit), stacklevel=stacklevel + 2)  # past contextlib's frame and this one


def report_cuts(cut: Sequence[int], limit: int, stacklevel: int) -> None:
    """Warn of the documents ``compress`` cut (``cut``: tokens beyond ``limit`` per document),
    or, within ``tallied_cuts``, gather them."""
    cuts = _CUT_TALLY.get()
    if cuts is not None:
        cuts.extend(cut)
        return
    truncated = [i for i, tokens in enumerate(cut) if tokens]
    if truncated:  # counted from this function: 3 names its caller's caller
        warn_bounded(f"{_cut_message(cut, limit)} (documents {truncated[:10]}{'...' if len(truncated) > 10 else ''})",
                     stacklevel=stacklevel)


def _cut_message(cut: Sequence[int], limit: int) -> str:
    return (f"{sum(tokens > 0 for tokens in cut)} of {len(cut)} documents exceed doc_max_length={limit} tokens; "
            f"{sum(cut)} tokens were cut")


def refuse_text_reader(model: ClaraModel, use: str) -> None:
    """Refuse memory tokens made or read with a checkpoint of ``clara train --stage text``: its
    generator trained on text (and its compressor, without --init, not at all), so a store it
    fills or its answers and scores would pass for CLaRa's. Checked once loaded, where a save
    in progress has been waited out."""
    if model.config.decoder_reads_text:
        raise InvalidInputError(f"{model.name_or_path} is a text reader (clara train --stage text): {use}")


def refuse_control_tokens(model: ClaraModel, texts: Sequence[str], what: str) -> None:
    """Refuse texts holding one of the model's control tokens: a prompt is tokenized whole, so a
    typed "<|im_end|>" ended the turn (and could open a forged system turn), and a typed "<MEM0>"
    took a memory's place, refused only at generation, after the documents were compressed."""
    for number, text in enumerate(texts):
        typed = next((token for token in model.control_tokens if token in text), None)
        if typed:
            raise InvalidInputError(f"{what} {number} holds {typed!r}, one of the tokenizer's control tokens: "
                                    "remove it from the text")


def compress_in_parts(model: ClaraModel, texts: list[str], batch_size: int, show_progress: bool = False,
                      stacklevel: int = 2) -> np.ndarray:
    """fp16 memories [n, n_mem, hidden] of the texts as a store keeps them, compressed
    COMPRESS_PART at a time (a whole corpus in one call held the model's float32 memories and
    two copies: about 70 KB a passage at CR16), with one warning for the texts cut in the whole
    call (``stacklevel`` as the caller would give ``warnings.warn``). A store upsert, a Ray
    actor and a framework embedding compress alike, so their memories agree bit for bit."""
    compressed = np.empty((len(texts), model.config.n_mem_tokens, model.hidden_size), np.float16)
    cut: list[int] = []
    # left when done unless nested (leave=None): under `clara index`'s bar each group's bar stayed, a
    # line each 1,024 documents
    with tqdm(total=len(texts), desc="compressing", unit="doc", disable=not show_progress, leave=None) as bar:
        for start in range(0, len(texts), COMPRESS_PART):  # one bar for all the parts
            part = model.compress(texts[start:start + COMPRESS_PART], batch_size, warn=False, progress=bar)
            compressed[start:start + len(part.memories)] = fp16_memories(part.memories)
            cut += part.truncated_tokens
    report_cuts(cut, model.config.doc_max_length, stacklevel=stacklevel + 1)
    return compressed


def scaled_to(vectors: torch.Tensor, length: float) -> torch.Tensor:
    """Vectors [..., hidden] rescaled to one length, measured in float32: an fp16 vector whose
    entries all fit can be longer than fp16 holds (65504), and its length, an inf, made it zeros."""
    lengths = vectors.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return vectors * (length / lengths).to(vectors.dtype)


def fp16_memories(memories: torch.Tensor) -> np.ndarray:
    """Memories as the store keeps them, refused where fp16 cannot hold them."""
    memories = memories.detach().to(torch.float16).cpu()  # memories that carry gradients too
    if not torch.isfinite(memories).all():
        raise InvalidInputError("memories must be finite numbers within fp16's range (±65,504)")
    return memories.numpy()


def as_memories(value: object, what: str) -> torch.Tensor:
    """Memory tokens as a tensor: a numpy array (memories saved with np.save) is taken as one;
    anything else is refused by name, not met later as a missing tensor method, and so are
    values that are not finite floats (NaN memories answered "", integers were cast)."""
    if isinstance(value, np.ndarray):
        value = torch.tensor(value)  # a copy: a memory-mapped array is read-only
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{what} must be a tensor or numpy array of memory tokens, got a {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{what} must be floating point ({FLOAT_NAMES}), got {value.dtype}")
    if not torch.isfinite(value).all():
        raise InvalidInputError(f"{what} must be finite: they hold NaN or infinite values")
    return value


def _settled_identity(folder: Path) -> tuple[int, int, int] | None:
    """``_folder_identity`` once no save is between its two renames (for up to 5 s: the new
    folder comes in a moment); None where there is no folder and no writer at work."""
    for _ in range(100):
        identity = _folder_identity(folder)
        if identity is not None or not writer_at_work(folder):
            return identity
        time.sleep(0.05)
    return None


def _folder_identity(folder: Path) -> tuple[int, int, int] | None:
    """The folder a path names now (None between a save's two renames): a save swaps in a new
    folder (whose inode number may be an old one's again, its change time not)."""
    try:
        status = os.stat(folder)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def copy_adapter(model: ClaraModel, source: str, target: str) -> None:
    """Overwrite one adapter's LoRA weights with another's: the end-to-end stage starts its
    query reasoner as the encoder, and an untrained reasoner then retrieves as the compressor."""
    unknown = {source, target} - set(ADAPTER_NAMES)
    if unknown:
        raise ValueError(f"unknown adapters {sorted(unknown)}; known: {ADAPTER_NAMES}")
    parameters = dict(model.lm.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            if f".{source}." in name:
                parameters[name.replace(f".{source}.", f".{target}.")].copy_(parameter)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, attention mask) [batch, longest], padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask

