"""Import of Apple's released CLaRa checkpoint folders (apple/CLaRa-7B-*).

Their layout: ``config.json`` (model_type "CLaRa"), ``adapters.pth`` (a pickled
{adapter name: LoRA state dict}) and ``decoder_first_last_layers.pth`` (the whole resized
embedding and lm_head matrices). The .pth files are read with ``weights_only=True`` only.
Every adapter present is loaded, whatever ``training_stage`` says (the reference loader drops
the trained generator of "stage1_2" checkpoints).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .atomic import check_replaceable_folder
from .checks import check_writable
from .checkpoint import (CONFIG_FILE, check_lora_rank, files_sha256, load_added_rows, load_adapter_weights,
                         read_torch_file, untied_output)
from .config import ADAPTER_NAMES, ClaraConfig
from .errors import CheckpointError
from .jsonfiles import read_json
from .model import DECODER, ENCODER, QUERY_REASONER, ClaraModel, copy_adapter

_PEFT_PREFIX = "base_model.model."


def read_apple_config(folder: Path, base_model: str | None) -> ClaraConfig:
    """Translate Apple's config.json into a ClaraConfig on a base model the user can reach."""
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} is not an Apple CLaRa checkpoint: config.json is missing")
    apple = read_json(path, CheckpointError)
    if not isinstance(apple, dict):
        raise CheckpointError(f"{path} holds a JSON {type(apple).__name__}, not a checkpoint's configuration")
    if apple.get("model_type") != "CLaRa":
        raise CheckpointError(f"{path} has model_type {apple.get('model_type')!r}, expected 'CLaRa'")
    if not apple.get("different_mem_tokens", True) or not apple.get("sep", True):
        raise CheckpointError(f"{path}: only checkpoints with different_mem_tokens and sep are supported")
    if base_model is not None:
        base_model = os.fspath(base_model)
        if Path(base_model).is_dir():  # a folder named from here ("mistral") is read from anywhere
            base_model = os.path.abspath(base_model)
        if base_model.startswith("/") and not Path(base_model).exists():
            raise CheckpointError(f"base model {base_model} does not exist")
    base = base_model or apple.get("decoder_model_name")
    if not isinstance(base, str) or not base or (base.startswith("/") and not Path(base).exists()):
        raise CheckpointError(
            f"{path} names base model {apple.get('decoder_model_name')!r}, which is not reachable "
            "here: pass base_model= (or --base-model) with a local copy of it"
        )
    if "compr_rate" not in apple:
        raise CheckpointError(f"{path} has no compr_rate: the compression rate its memories were trained at")
    try:  # a null, a word or a number out of range is named with its file
        lora_r = int(apple.get("lora_r", 16))
        return ClaraConfig(
            base_model=base,
            compression_rate=int(apple["compr_rate"]),
            memory_design="tokens",
            retrieval_key="flat",
            doc_max_length=int(apple.get("doc_max_length", 256)),
            lora_r=lora_r,
            lora_alpha=2 * lora_r,
            generation_top_k=int(apple.get("generation_top_k", 5)),
            max_new_tokens=int(apple.get("max_new_tokens", 128)),
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def _load_pth(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    return read_torch_file(path)


def _peft_key(apple_key: str, adapter: str) -> str:
    """Apple's key (transformers' adapter state dict) -> our peft key, adapter name removed."""
    key = apple_key.replace(f".{adapter}.", ".")
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX):]
    return _PEFT_PREFIX + key


def load_apple_checkpoint(
    folder: str | Path, *, base_model: str | None = None, device: str = "auto", dtype: str | torch.dtype = "auto"
) -> ClaraModel:
    """A ClaraModel with every adapter and the memory-token rows of an Apple checkpoint."""
    folder = Path(folder)
    config = read_apple_config(folder, base_model)
    adapters = _load_pth(folder / "adapters.pth")
    matrices = _load_pth(folder / "decoder_first_last_layers.pth")
    if not isinstance(adapters, dict) or not adapters:
        raise CheckpointError(f"{folder}/adapters.pth holds no adapter")
    unknown = set(adapters) - set(ADAPTER_NAMES)
    if unknown:
        raise CheckpointError(f"{folder}/adapters.pth holds unknown adapters {sorted(unknown)}")
    missing = {ENCODER, DECODER} - set(adapters)
    if missing:
        raise CheckpointError(f"{folder}/adapters.pth lacks {sorted(missing)}: no compressor or generator to load")
    for name, state in adapters.items():  # before the base model loads
        if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                  for key, value in state.items()):
            raise CheckpointError(f"{folder}/adapters.pth: {name} is not a state dict of named tensors")
    if not isinstance(matrices, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                 for key, value in matrices.items()):
        raise CheckpointError(f"{folder}/decoder_first_last_layers.pth is not a state dict of named tensors")
    embed = _matrix(matrices, "embed_tokens.weight", folder)
    check_lora_rank(config.lora_r, {tensor.shape[0] for state in adapters.values() for key, tensor in state.items()
                                    if ".lora_A." in key and tensor.ndim == 2},
                    folder / "adapters.pth", folder / "config.json")
    model = ClaraModel._of_checkpoint(config, folder, base_model is not None, device, dtype)
    output = untied_output(model)
    # an untied model without Apple's head kept its own seeded rows for the added tokens
    head = _matrix(matrices, "lm_head.weight", folder, required=output is not None)
    for name, state in adapters.items():
        peft_state = {_peft_key(key, name): tensor for key, tensor in state.items() if "lora_" in key}
        load_adapter_weights(model, name, peft_state, source=f"{folder / 'adapters.pth'}[{name}]")
    if QUERY_REASONER not in adapters:
        # stages 1 and 1_2 save no query reasoner; the end-to-end stage starts it as the encoder,
        # so questions are encoded by the compressor, never by an untrained (identity) adapter
        copy_adapter(model, ENCODER, QUERY_REASONER)
        warnings.warn(f"{folder} has no query reasoner (it was saved before the end-to-end stage): questions "
                      "are encoded by its compressor", stacklevel=2)
    _check_base_rows(model, embed, model.lm.get_input_embeddings().weight, folder, "embedding")
    if output is not None:
        _check_base_rows(model, head, output, folder, "output")
    base = model.base_vocab_size
    load_added_rows(model, embed[base:], None if output is None else head[base:],
                    source=str(folder / "decoder_first_last_layers.pth"))
    model.name_or_path = str(folder)
    model.weights_sha256 = files_sha256([folder / "adapters.pth", folder / "decoder_first_last_layers.pth"])
    return model


def _matrix(matrices: dict, suffix: str, folder: Path, required: bool = True) -> torch.Tensor | None:
    found = [tensor for key, tensor in matrices.items() if key.endswith(suffix)]
    if not found and required:
        raise CheckpointError(f"{folder}/decoder_first_last_layers.pth has no {suffix}")
    return found[0] if found else None


def _check_base_rows(model: ClaraModel, matrix: torch.Tensor, ours: torch.Tensor, folder: Path, what: str) -> None:
    """Apple's matrix must extend this base model's (``what``: embedding or output), or it
    belongs to another model."""
    if matrix.shape != ours.shape:
        raise CheckpointError(
            f"{folder}: {what} matrix {tuple(matrix.shape)} does not fit the base model "
            f"{model.config.base_model!r} resized to {tuple(ours.shape)}"
        )
    theirs = matrix[: model.base_vocab_size].float()
    mine = ours[: model.base_vocab_size].detach().float().cpu()
    if (theirs - mine).abs().max() > 1e-2 * mine.abs().max():
        raise CheckpointError(
            f"{folder} was trained on another base model than {model.config.base_model!r}: "
            f"the {what} rows of the base vocabulary differ"
        )


def convert_apple_checkpoint(
    source: str | Path, destination: str | Path, *, base_model: str | None = None
) -> ClaraModel:
    """Apple folder -> this project's checkpoint folder (safetensors + JSON)."""
    check_replaceable_folder(Path(destination), CONFIG_FILE)  # before minutes of loading a 7B model
    # a file where a parent folder goes, or a read-only folder where the save stages a sibling: found at the save
    for folder in (Path(destination), Path(destination).absolute().parent):
        check_writable(folder)
    model = load_apple_checkpoint(source, base_model=base_model, device="cpu", dtype=torch.float32)
    model.save_pretrained(destination)
    return model

