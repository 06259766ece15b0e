"""The project's checkpoint format: small, safe to load, tied to one base model.

A checkpoint folder holds only what training changes:

- ``clara_config.json``: format version, the ClaraConfig, the base model's fingerprint;
- ``adapters.safetensors``: the three LoRA adapters, keys ``{adapter}/{peft key}``;
- ``memory_embeddings.safetensors``: the embedding rows of the added special tokens
  (and the output rows when the model does not tie them).

The base model's own weights are never copied; loading onto another base model fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import write_folder_atomically
from .backbone import fingerprint_mismatch
from .config import ADAPTER_NAMES, ClaraConfig
from .errors import CheckpointError

if TYPE_CHECKING:
    from .model import ClaraModel

FORMAT = "clara-plugins/1"
CONFIG_FILE = "clara_config.json"
ADAPTERS_FILE = "adapters.safetensors"
EMBEDDINGS_FILE = "memory_embeddings.safetensors"


def save_checkpoint(model: "ClaraModel", folder: Path) -> None:
    """Write the checkpoint into a temporary folder, then swap it in place."""
    adapters = {}
    for name in ADAPTER_NAMES:
        for key, tensor in get_peft_model_state_dict(model.lm, adapter_name=name,
                                                     save_embedding_layers=False).items():
            adapters[f"{name}/{key}"] = tensor.detach().cpu().contiguous()
    embeddings = {"input_rows": added_rows(model, model.lm.get_input_embeddings().weight)}
    output = model.lm.get_output_embeddings()
    if output is not None and output.weight is not model.lm.get_input_embeddings().weight:
        embeddings["output_rows"] = added_rows(model, output.weight)
    header = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "base_model_fingerprint": model.base_fingerprint,
    }

    def write(staging: Path) -> None:
        save_file(adapters, str(staging / ADAPTERS_FILE))
        save_file(embeddings, str(staging / EMBEDDINGS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")

    write_folder_atomically(folder, write)


def added_rows(model: "ClaraModel", matrix: torch.Tensor) -> torch.Tensor:
    """The rows of the special tokens CLaRa appended to the vocabulary."""
    return matrix.detach()[model.base_vocab_size:].cpu().contiguous()


def read_header(folder: Path) -> dict:
    """The checkpoint's JSON header, checked for format."""
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} is not a CLaRa checkpoint: {CONFIG_FILE} is missing")
    try:
        header = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupted or not a safetensors file: {error}") from error


def load_checkpoint(
    cls: type["ClaraModel"], folder: Path, *, base_model: str | None, device: str, dtype
) -> "ClaraModel":
    """Build the model on its base LM, check the fingerprint, then load the trained weights."""
    header = read_header(folder)
    config = ClaraConfig.from_dict(header["config"])
    adapters = _read_safetensors(folder / ADAPTERS_FILE)
    embeddings = _read_safetensors(folder / EMBEDDINGS_FILE)
    if base_model is not None:
        config.base_model = base_model
    model = cls(config, device=device, dtype=dtype)
    problem = fingerprint_mismatch(header["base_model_fingerprint"], model.base_fingerprint)
    if problem:
        raise CheckpointError(
            f"checkpoint {folder} was trained on another base model than {config.base_model!r}: {problem}"
        )
    load_adapter_weights(model, adapters, source=str(folder / ADAPTERS_FILE))
    load_added_rows(model, embeddings["input_rows"], embeddings.get("output_rows"))
    return model


def load_adapter_weights(model: "ClaraModel", adapters: dict[str, torch.Tensor], source: str) -> None:
    """Load ``{adapter}/{peft key}`` tensors; every key of every adapter present must fit."""
    for name in ADAPTER_NAMES:
        prefix = f"{name}/"
        state = {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)}
        if not state:
            continue
        expected = get_peft_model_state_dict(model.lm, adapter_name=name, save_embedding_layers=False)
        missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or extra:
            raise CheckpointError(
                f"{source}: adapter {name} does not fit this model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"{source}: {name}/{key} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(expected[key].shape)}"
                )
        set_peft_model_state_dict(model.lm, state, adapter_name=name)
    unknown = {k.split("/", 1)[0] for k in adapters} - set(ADAPTER_NAMES)
    if unknown:
        raise CheckpointError(f"{source}: unknown adapters {sorted(unknown)}")


def load_added_rows(model: "ClaraModel", input_rows: torch.Tensor, output_rows: torch.Tensor | None) -> None:
    """Write the special-token rows into the (resized) embedding matrices."""
    targets = [(model.lm.get_input_embeddings().weight, input_rows)]
    output = model.lm.get_output_embeddings()
    if output_rows is not None and output is not None:
        targets.append((output.weight, output_rows))
    for matrix, rows in targets:
        expected = (matrix.size(0) - model.base_vocab_size, matrix.size(1))
        if tuple(rows.shape) != expected:
            raise CheckpointError(
                f"memory-token embeddings have shape {tuple(rows.shape)}, expected {expected} "
                "(another compression rate or base model?)"
            )
        with torch.no_grad():
            matrix[model.base_vocab_size:] = rows.to(matrix.dtype)
