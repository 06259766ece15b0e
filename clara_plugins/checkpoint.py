"""The project's checkpoint format: small, safe to load, tied to one base model.

A checkpoint folder holds only what training changes:

- ``clara_config.json``: format version, the ClaraConfig, the base model's fingerprint;
- ``adapter_<name>.safetensors``: one file per LoRA adapter (peft keys);
- ``memory_embeddings.safetensors``: the embedding rows of the added special tokens
  (and the output rows when the model does not tie them);
- in a training run's checkpoint, ``trainer_state.pt`` (``torch.load(weights_only=True)``):
  the step, optimizer and schedule a resumed run continues from. Saving the model again
  (``save_pretrained``, e.g. in fp16 to ship it) leaves it out.

The base model's own weights are never copied; loading onto another base model fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .atomic import recover_folder, write_folder_atomically
from .backbone import FLOAT_DTYPES, FLOAT_NAMES, fingerprint_mismatch, lfs_pointer, memory_layer_problem
from .config import ADAPTER_NAMES, ClaraConfig
from .errors import CheckpointError, StoreError
from .jsonfiles import read_json
from .prompts import layout_sha256



class AdaptedModel(Protocol):
    """What a checkpoint is written from and loaded into (a ClaraModel)."""

    config: ClaraConfig
    lm: torch.nn.Module
    base_vocab_size: int
    base_fingerprint: dict
    hidden_size: int
    tokenizer: PreTrainedTokenizerBase
    mem_token_ids: list[int]
    given_rows: list[tuple[torch.Tensor, torch.Tensor]]


FORMAT = "clara-plugins/1"
CONFIG_FILE = "clara_config.json"
EMBEDDINGS_FILE = "memory_embeddings.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"  # a training run's step, optimizer and schedule, saved with its weights


def adapter_file(name: str) -> str:
    return f"adapter_{name}.safetensors"


def save_checkpoint(model: AdaptedModel, folder: Path, dtype: torch.dtype | None = None,
                    trainer_state: dict | None = None) -> None:
    """Write the checkpoint into a temporary folder, then swap it in place. A non-empty
    folder that is not a checkpoint is refused (CheckpointError), never overwritten.

    ``dtype`` (e.g. torch.float16) stores the weights smaller; loading casts them back.
    ``trainer_state`` (a training run's) is written in the same swap, so that a run killed
    while saving resumes from weights and an optimizer of one step.
    """
    def stored(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().cpu()
        return (tensor.to(dtype) if dtype is not None else tensor).contiguous()

    adapters = {name: {k: stored(v) for k, v in get_peft_model_state_dict(
        model.lm, adapter_name=name, save_embedding_layers=False).items()} for name in ADAPTER_NAMES}
    embeddings = {"input_rows": stored(added_rows(model, model.lm.get_input_embeddings().weight))}
    if (output := untied_output(model)) is not None:
        embeddings["output_rows"] = stored(added_rows(model, output))
    try:  # the config is a public, mutable object: a setting changed since would save a checkpoint that cannot load
        saved = ClaraConfig.from_dict(model.config.to_dict())
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the model's configuration no longer holds: {error}; not saved to {folder}") from error
    if saved.n_mem_tokens != len(model.mem_token_ids):
        raise CheckpointError(f"the model's configuration gives {saved.n_mem_tokens} memory tokens, and the model has "
                              f"{len(model.mem_token_ids)}: set compression_rate and doc_max_length back; not saved to "
                              f"{folder}")
    # the adapters keep the shape and scale they were built with (a changed lora_alpha loaded at
    # another scale, unsaid; a changed lora_r or memory_layer made the checkpoint unloadable)
    lora = model.lm.peft_config[ADAPTER_NAMES[0]]
    changed = [f"{name}={getattr(saved, name)!r} (built with {built!r})" for name, built in
               (("lora_r", lora.r), ("lora_alpha", lora.lora_alpha), ("lora_dropout", lora.lora_dropout))
               if getattr(saved, name) != built]
    if (problem := memory_layer_problem(model.lm, saved.memory_layer)) is not None:
        changed.append(f"memory_layer={saved.memory_layer} (the base model {problem})")
    if changed:
        raise CheckpointError(f"the model's configuration no longer fits its weights: {', '.join(changed)}: set "
                              f"them back; not saved to {folder}")
    header = {"format": FORMAT, "config": saved.to_dict(), "base_model_fingerprint": model.base_fingerprint,
              "layout_sha256": layout_sha256(model.tokenizer)}
    for part, tensors in [*adapters.items(), ("embeddings", embeddings)]:  # loading refuses them: never saved over a good copy
        bad = next((key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()), None)
        if bad is not None:
            raise CheckpointError(f"{part} weight {bad} holds NaN or infinite values{' in ' + str(dtype) if dtype else ''}: "
                                  f"not saved to {folder}")

    def write(staging: Path) -> None:
        for name, state in adapters.items():
            save_file(state, str(staging / adapter_file(name)))
        save_file(embeddings, str(staging / EMBEDDINGS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, staging / TRAINER_STATE_FILE)

    try:
        write_folder_atomically(folder, write, marker=CONFIG_FILE, owned=(TRAINER_STATE_FILE,))
    except FileExistsError as error:
        raise CheckpointError(str(error)) from error


def files_sha256(paths: Sequence[Path]) -> str:
    """One SHA-256 over the files' bytes, in order: what tells a checkpoint saved again in
    place (retrained, under the same folder) from the one it replaced."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint's weight files: the three adapters and the added rows."""
    return [*(folder / adapter_file(name) for name in ADAPTER_NAMES), folder / EMBEDDINGS_FILE]


def compressor_signature(model: AdaptedModel) -> dict:
    """What fixes a document's memories: base model, sizes, design, encoder weights, <MEM> rows.

    Stores of compressed documents record it and refuse to mix with another compressor. The
    weights are hashed rounded to bf16 (peft keeps the adapters in fp32 in any model), and the
    added rows as the checkpoint gave them while the model's are their cast: a checkpoint signs
    alike in fp32 on a CPU and in bf16 or fp16 on a GPU, so a store filled by GPU workers opens
    on a CPU (read in fp16, an fp32 checkpoint's rows, rounded twice, signed otherwise).
    """
    config = model.config
    return {
        "base_model_fingerprint": model.base_fingerprint,
        "compression_rate": config.compression_rate,
        "doc_max_length": config.doc_max_length,
        "memory_shape": [config.n_mem_tokens, model.hidden_size],
        "memory_design": [config.memory_design, config.memory_pooling, config.memory_layer, config.memory_scale],
        "encoder_sha256": adapters_sha256(model, ADAPTER_NAMES[:1]),
    }


def adapters_sha256(model: AdaptedModel, adapters: Sequence[str] = ADAPTER_NAMES) -> str:
    """The SHA-256 of the named adapters' weights and the added rows, rounded to bf16 (see
    ``compressor_signature``): what tells apart models of one configuration, saved or not."""
    digest = hashlib.sha256()
    tensors = []
    for adapter in adapters:
        weights = get_peft_model_state_dict(model.lm, adapter_name=adapter, save_embedding_layers=False)
        if not any(weights[k].any() for k in weights if "lora_B" in k):
            # a fresh adapter adds nothing, whatever its random A matrices: two fresh models of one
            # configuration signed otherwise, and refused each other's stores (clara index, then ask)
            digest.update(f"{adapter} adds nothing".encode())
            continue
        tensors += [weights[k] for k in sorted(weights)]
    tensors.append(_signed_rows(model, model.lm.get_input_embeddings().weight))
    if ADAPTER_NAMES[-1] in adapters and (output := untied_output(model)) is not None:
        tensors.append(_signed_rows(model, output))  # the generator's: the compressor never reads them
    for tensor in tensors:
        digest.update(tensor.detach().bfloat16().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def untied_output(model: AdaptedModel) -> torch.Tensor | None:
    """The output embedding matrix where it is not the input one (Mistral's), else None."""
    output = model.lm.get_output_embeddings()
    if output is None or output.weight is model.lm.get_input_embeddings().weight:
        return None
    return output.weight


def _signed_rows(model: AdaptedModel, matrix: torch.Tensor) -> torch.Tensor:
    """The added rows of ``matrix`` as a checkpoint gave them, while the model's are still their
    cast; else the model's own (trained since, or never loaded)."""
    rows = added_rows(model, matrix)
    for written, given in model.given_rows:
        if written is matrix and torch.equal(given.to(device=rows.device, dtype=rows.dtype), rows):
            return given
    return rows


def added_rows(model: AdaptedModel, matrix: torch.Tensor) -> torch.Tensor:
    """The rows of the special tokens CLaRa appended to the vocabulary."""
    return matrix.detach()[model.base_vocab_size:]


def read_header(folder: Path) -> dict:
    """The checkpoint's JSON header, checked for format."""
    recover_folder(folder, CONFIG_FILE)
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} is not a CLaRa checkpoint: {CONFIG_FILE} is missing{_what_it_is(folder)}")
    header = read_json(path, CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} holds a JSON {type(header).__name__}, not a checkpoint header")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
    fingerprint = header.get("base_model_fingerprint")
    if (not isinstance(header.get("config"), dict) or not isinstance(fingerprint, dict)
            or not isinstance(fingerprint.get("weight_norms"), list)
            or not all(isinstance(norm, (int, float)) and math.isfinite(norm) for norm in fingerprint["weight_norms"])):
        raise CheckpointError(f"{path} lacks its config (an object) or base_model_fingerprint (an object with a "
                              "list of finite weight_norms: a NaN matched every base model)")
    return header


def _what_it_is(folder: Path) -> str:
    """What a path that is no checkpoint holds, when it is one of the likely mix-ups."""
    if not folder.exists():
        return " (no such folder)"
    if (folder / "checkpoint" / CONFIG_FILE).exists():
        return f" (a training run's output: its checkpoint is {folder / 'checkpoint'})"
    if (folder / "adapters.pth").exists():
        return " (an Apple checkpoint: convert it with clara convert-apple)"
    return ""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    _refuse_lfs_pointer(path)  # read as a header "too large"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupted or not a safetensors file: {error}") from error


def read_torch_file(path: Path) -> object:
    """A torch file read on the CPU without running code it may hold (``weights_only``); any
    failure is a CheckpointError naming the file. Torch's own message advised loading with
    weights_only=False, which runs that code; a text file met other exceptions than a damaged one."""
    _refuse_lfs_pointer(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # e.g. an IndexError for a page of text, an UnpicklingError for code
        raise CheckpointError(f"{path} is damaged, or not a file of tensors that can be read safely "
                              f"({type(error).__name__})") from error


def _refuse_lfs_pointer(path: Path) -> None:
    """A weight file of a repository cloned without Git LFS is a short text naming the file."""
    if lfs_pointer(path):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the file it names: fetch it (git lfs pull)")


def read_config(folder: Path) -> ClaraConfig:
    """The ClaraConfig a checkpoint was trained with, its ``lora_r`` checked against its
    compressor's file (its header alone) before adapters are built of that rank."""
    config = _config_of(read_header(folder), folder)
    path = folder / adapter_file(ADAPTER_NAMES[0])
    try:
        with safe_open(str(path), framework="pt") as weights:
            ranks = {weights.get_slice(key).get_shape()[0] for key in weights.keys() if ".lora_A." in key}
    except (SafetensorError, OSError):  # missing or damaged: named where the weights load
        ranks = set()
    check_lora_rank(config.lora_r, ranks, path, folder / CONFIG_FILE)
    return config


def check_lora_rank(lora_r: int, ranks: set[int], weights: str | Path, settings: str | Path) -> None:
    """Refuse settings whose LoRA rank is not their adapters' before any adapter is built: a
    header's lora_r of 100,000 made peft fill 366 GB of adapters for SmolLM2."""
    if ranks and ranks != {lora_r}:
        raise CheckpointError(f"{weights} holds adapters of rank {', '.join(map(str, sorted(ranks)))}, and {settings} "
                              f"gives lora_r {lora_r}: one of them is damaged")


# the settings of the first format; the ones added since are filled in for older headers below
_ALWAYS_SAVED = ("base_model", "compression_rate", "doc_max_length", "lora_r", "lora_alpha", "lora_dropout",
                 "generation_top_k", "max_new_tokens")


def _config_of(header: dict, folder: Path) -> ClaraConfig:
    values = dict(header["config"])
    # every header holds these, so one without is damaged (a missing lora_alpha loaded at the
    # default: adapters at another scale, and wrong answers, without a word)
    missing = [name for name in _ALWAYS_SAVED if name not in values]
    if missing:
        raise CheckpointError(f"{folder / CONFIG_FILE} lacks the settings {', '.join(missing)}: damaged")
    # checkpoints written before the memory design was a setting all used appended <MEM> tokens
    values.setdefault("memory_design", "tokens")
    values.setdefault("retrieval_key", "flat")  # and before the retrieval key was, the flattened memory
    if values["memory_design"] == "tokens":  # saved before pooling settings were refused beside it: never read
        values.update(memory_pooling=ClaraConfig.memory_pooling, memory_layer=ClaraConfig.memory_layer)
    try:
        return ClaraConfig.from_dict(values)
    except ValueError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from error


# ClaraConfig fields a model may set otherwise than the checkpoint it loads: the base model's
# path (its fingerprint is checked instead), how it generates, and the text stage's reading mode
_SETTINGS_OUTSIDE_WEIGHTS = ("base_model", "generation_top_k", "max_new_tokens", "decoder_reads_text")


def check_same_configuration(config: ClaraConfig, folder: Path, *, another_rate: bool = False,
                             header: dict | None = None) -> ClaraConfig:
    """The configuration a checkpoint was trained with; another ``config`` in the settings its
    weights depend on is refused (``another_rate``: as ``load_trained_weights``)."""
    saved = _config_of(read_header(folder) if header is None else header, folder)
    outside = _SETTINGS_OUTSIDE_WEIGHTS + (("compression_rate",) if another_rate and saved.memory_design == "pooled"
                                           else ())
    changed = [f"{name}={getattr(config, name)!r} (was {getattr(saved, name)!r})"
               for name in (field.name for field in dataclasses.fields(ClaraConfig))
               if name not in outside and getattr(config, name) != getattr(saved, name)]
    if changed:
        raise CheckpointError(f"checkpoint {folder} was trained with another model configuration: "
                              f"{', '.join(changed)}; load or resume it with the same settings (a run with others: "
                              "another output)")
    return saved


def load_trained_weights(model: AdaptedModel, folder: Path, *, another_rate: bool = False) -> None:
    """Check the base-model fingerprint and the model's configuration, then load the three
    adapters and the rows; a missing, empty or non-finite one is an error, never a silently
    untrained adapter. The adapters would load into a model of another memory design or
    retrieval key without a complaint (a training run resumed with other settings).

    ``another_rate`` lets a pooled checkpoint load into a model of another compression rate,
    as ``ClaraModel.from_pretrained`` asks when told to: pooled memories are means over chunks
    of the compressor's states, and no weight belongs to one chunk."""
    header = read_header(folder)
    problem = fingerprint_mismatch(header["base_model_fingerprint"], model.base_fingerprint)
    if problem:
        raise CheckpointError(
            f"checkpoint {folder} was trained on another base model than {model.config.base_model!r}: {problem}"
        )
    if header.get("layout_sha256") not in (None, layout_sha256(model.tokenizer)):  # saved before it was recorded: unknown
        warnings.warn(f"{folder} was trained on prompts that the chat template of {model.config.base_model!r} now "
                      "lays out otherwise (another copy or revision of its base model?): its answers may read worse",
                      stacklevel=3)
    current = model.config
    saved = check_same_configuration(current, folder, another_rate=another_rate, header=header)
    adapters = {name: _read_safetensors(folder / adapter_file(name)) for name in ADAPTER_NAMES}
    embeddings = _read_safetensors(folder / EMBEDDINGS_FILE)
    if "input_rows" not in embeddings:
        raise CheckpointError(f"{folder / EMBEDDINGS_FILE} lacks input_rows, the rows of CLaRa's added tokens")
    others = model.lm.get_input_embeddings().weight.size(0) - model.base_vocab_size - current.n_mem_tokens
    # every file is checked before any weight changes: a damaged one left a resumed run's model half-loaded
    for name, state in adapters.items():
        _check_adapter_weights(model, name, state, source=str(folder / adapter_file(name)))
    targets = _row_targets(model, *(_rows_at_rate(rows, saved.n_mem_tokens, current.n_mem_tokens, others)
                                    for rows in (embeddings["input_rows"], embeddings.get("output_rows"))),
                           source=str(folder / EMBEDDINGS_FILE))
    for name, state in adapters.items():
        set_peft_model_state_dict(model.lm, state, adapter_name=name)
    _write_rows(model, targets)


def _rows_at_rate(rows: torch.Tensor | None, saved_n_mem: int, n_mem: int, others: int) -> torch.Tensor | None:
    """The added rows (<MEM0..n-1>, then the ``others``: <AE>, <ENC>, <SEP>) of a pooled
    checkpoint, for a model that reads at another rate: every <MEM> input embedding is
    overwritten by a memory, so those rows hold places (and, with tied embeddings, output rows
    the generator was trained never to write), and are repeated or cut to n. Rows that do not
    fit the checkpoint's own rate are left for ``load_added_rows`` to refuse."""
    if rows is None or saved_n_mem == n_mem or len(rows) != saved_n_mem + others:
        return rows
    return rows[torch.cat([torch.arange(n_mem) % saved_n_mem, torch.arange(saved_n_mem, len(rows))])]


def load_adapter_weights(model: AdaptedModel, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load one adapter's peft-keyed tensors; every key must fit the model, and every value
    must be a finite float."""
    _check_adapter_weights(model, name, state, source)
    set_peft_model_state_dict(model.lm, state, adapter_name=name)


def _check_adapter_weights(model: AdaptedModel, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    expected = get_peft_model_state_dict(model.lm, adapter_name=name, save_embedding_layers=False)
    if not state:
        raise CheckpointError(f"{source}: adapter {name} is empty")
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or extra:
        raise CheckpointError(
            f"{source}: adapter {name} does not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{source}: {name}/{key} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")
        if tensor.dtype not in FLOAT_DTYPES:  # an integer file loaded, cast, unsaid
            raise CheckpointError(f"{source}: {name}/{key} holds {tensor.dtype} values, not floating point "
                                  f"({FLOAT_NAMES})")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {name}/{key} holds NaN or infinite values")


def load_added_rows(model: AdaptedModel, input_rows: torch.Tensor, output_rows: torch.Tensor | None,
                    source: str) -> None:
    """Write the special-token rows into the (resized) embedding matrices; they must fit them,
    be finite floats, and come with output rows exactly where the model has an output matrix
    of its own."""
    _write_rows(model, _row_targets(model, input_rows, output_rows, source))


def _row_targets(model: AdaptedModel, input_rows: torch.Tensor, output_rows: torch.Tensor | None,
                 source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(matrix, rows) pairs, checked."""
    output = untied_output(model)
    if output is None and output_rows is not None:  # they overwrote the input rows just loaded
        raise CheckpointError(f"{source} holds output rows of the added tokens, and the model ties its output "
                              "matrix to its input one")
    if output is not None and output_rows is None:  # the model's own seeded rows were kept, unsaid
        raise CheckpointError(f"{source} lacks the output rows of the added tokens, which the model's own output "
                              "matrix needs")
    targets = [(model.lm.get_input_embeddings().weight, input_rows)]
    if output is not None:
        targets.append((output, output_rows))
    for matrix, rows in targets:
        expected = (matrix.size(0) - model.base_vocab_size, matrix.size(1))
        if tuple(rows.shape) != expected:
            raise CheckpointError(
                f"{source}: memory-token embeddings have shape {tuple(rows.shape)}, expected {expected} "
                "(another compression rate or base model?)"
            )
        if rows.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: memory-token embeddings hold {rows.dtype} values, not floating point "
                                  f"({FLOAT_NAMES})")
        if not torch.isfinite(rows).all():  # every memory compressed with them would be NaN
            raise CheckpointError(f"{source}: memory-token embeddings hold NaN or infinite values")
    return targets


def _write_rows(model: AdaptedModel, targets: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for matrix, rows in targets:
            matrix[model.base_vocab_size:] = rows.to(device=matrix.device, dtype=matrix.dtype)
    # what is signed; a copy, not a view of a whole matrix read (Apple's)
    model.given_rows = [(matrix, rows.detach().float().cpu().clone()) for matrix, rows in targets]


RECOMPRESS = "read it with the model that wrote it, or compress its documents again with this one"
_OTHER_COMPRESSOR_REMEDY = f"{RECOMPRESS} into a new folder"


def check_compressor(stored: dict, current: dict, folder: str | Path, remedy: str = _OTHER_COMPRESSOR_REMEDY) -> None:
    """Refuse to mix memories from different compressors; ``remedy`` says what to do instead."""
    if not isinstance(stored, dict) or not isinstance(stored.get("base_model_fingerprint"), dict):
        raise StoreError(f"{folder}: its header's compressor signature is not one this library writes (no base "
                         "model fingerprint)")
    stored = {"memory_design": ["tokens", "mean", -1, False], **stored}  # stores older than the setting
    design = stored["memory_design"]
    if isinstance(design, list) and len(design) == 4 and design[0] == "tokens":  # pooling settings it never read
        stored["memory_design"] = ["tokens", ClaraConfig.memory_pooling, ClaraConfig.memory_layer, design[3]]
    # a pooled compressor reads at any rate; a tokens-design one only at its own
    rate_alone = stored["memory_design"] == current.get("memory_design") and stored["memory_design"][0] == "pooled" \
        and stored.get("doc_max_length") == current.get("doc_max_length")
    for key in ("compression_rate", "doc_max_length", "memory_shape", "memory_design"):
        if stored.get(key) != current.get(key):
            hint = f"load the model at compression rate {stored.get(key)}" if key == "compression_rate" and rate_alone \
                else remedy
            raise StoreError(f"{folder} was written with {key}={stored.get(key)}, this model has "
                             f"{current.get(key)}: {hint}")
    try:  # the header is the one file no checksum covers
        problem = fingerprint_mismatch(stored["base_model_fingerprint"], current["base_model_fingerprint"],
                                       ("the store's", "this model's"))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # torch.tensor of nulls: a RuntimeError
        raise StoreError(f"{folder}: its header's base model fingerprint is malformed ({error!r:.80})") from error
    if problem:
        raise StoreError(f"{folder} was written by another base model: {problem}; {remedy}")
    if stored.get("encoder_sha256") != current.get("encoder_sha256"):
        raise StoreError(f"{folder} was written by another compressor (different encoder adapter weights or <MEM> "
                         f"rows): {remedy}")
