"""Our checkpoint format: round trip, base-model check, corrupted and partial files."""

import json

import pytest
import torch

from clara_plugins import CheckpointError, ClaraModel
from conftest import CORPUS

QUESTIONS = ["Who won Nobel prizes?"]


def outputs(model: ClaraModel) -> tuple[torch.Tensor, list[str]]:
    memories = model.compress_documents(CORPUS[:2])
    return memories, model.generate_from_compressed_documents_and_questions(QUESTIONS, memories)


def test_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    memories, answers = outputs(tiny_model)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "adapter_decoder_adapter.safetensors", "adapter_encoder_adapter.safetensors",
        "adapter_query_reasoner_adapter.safetensors", "clara_config.json", "memory_embeddings.safetensors"]
    loaded = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    loaded_memories, loaded_answers = outputs(loaded)
    assert torch.allclose(memories, loaded_memories, atol=1e-6)
    assert answers == loaded_answers
    assert torch.allclose(tiny_model.encode_queries(QUESTIONS), loaded.encode_queries(QUESTIONS), atol=1e-6)


def test_half_precision_checkpoint_loads_into_a_float32_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    loaded = ClaraModel.from_pretrained(tmp_path / "half", device="cpu")
    assert torch.allclose(loaded.compress_documents(CORPUS[:2]), tiny_model.compress_documents(CORPUS[:2]),
                          atol=1e-2)


def test_saving_over_an_existing_checkpoint_replaces_it(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folders left behind


def test_loading_onto_another_base_model_fails_clearly(tiny_model, other_tiny_base, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="trained on another base model"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", base_model=str(other_tiny_base), device="cpu")


def test_corrupted_safetensors_fails_clearly(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "adapter_decoder_adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter_decoder_adapter.safetensors is corrupted"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_missing_or_foreign_files_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="clara_config.json is missing"):
        ClaraModel.from_pretrained(tmp_path, device="cpu")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    header = json.loads((tmp_path / "ckpt" / "clara_config.json").read_text())
    header["config"]["compression_rate"] = 8
    (tmp_path / "ckpt" / "clara_config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="does not fit|shape"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
