"""The checkpoint shipped in the package, and which model `load_model` gives when none is named."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from clara_plugins.cli import main
from clara_plugins.config import DEFAULT_BASE_MODEL
from clara_plugins.corpora import read_examples
from clara_plugins.rows import instruct_rows
from clara_plugins.reading import evaluate_reading
from clara_plugins.pretrained import default_checkpoint, load_model
from conftest import CORPUS, SHARED_DATA


def test_the_shipped_checkpoint_is_small_fp16_safetensors_for_the_default_backbone():
    folder = default_checkpoint(16)
    assert folder is not None, "clara_plugins/checkpoints/smollm2-135m-instruct-cr16 is missing"
    files = sorted(folder.iterdir())
    assert {path.suffix for path in files} == {".json", ".safetensors"}  # nothing to unpickle
    assert sum(path.stat().st_size for path in files) <= 40 * 2**20
    config = json.loads((folder / "clara_config.json").read_text())["config"]
    assert config["base_model"] == DEFAULT_BASE_MODEL and config["compression_rate"] == 16
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as tensors:
            assert {str(tensors.get_slice(name).get_dtype()) for name in tensors.keys()} == {"F16"}


def test_no_checkpoint_ships_for_other_rates():
    assert default_checkpoint(4) is None


def test_load_model_takes_the_named_checkpoint(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", device="cpu")
    assert loaded.config == tiny_model.config and loaded.name_or_path == str(tmp_path / "ckpt")
    assert torch.equal(loaded.compress(CORPUS[:1]).memories, tiny_model.compress(CORPUS[:1]).memories)


def test_load_model_reads_a_checkpoint_at_its_own_rate_or_the_asked_one(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt", device="cpu").config.compression_rate == 16
    assert load_model(tmp_path / "ckpt", compression_rate=8, device="cpu").config.n_mem_tokens == 8


def test_load_model_reads_the_shipped_checkpoint_at_another_rate_not_an_untrained_model(tiny_model, tmp_path,
                                                                                        monkeypatch, recwarn):
    from conftest import randomize_adapters

    randomize_adapters(tiny_model)
    tiny_model.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr("clara_plugins.pretrained.default_checkpoint",
                        lambda rate=16: tmp_path / "shipped" if rate == 16 else None)
    monkeypatch.setattr("clara_plugins.pretrained.DEFAULT_BASE_MODEL", tiny_model.config.base_model)
    model = load_model(compression_rate=8, device="cpu")
    assert model.config.n_mem_tokens == 8 and not [w for w in recwarn if "untrained" in str(w.message)]
    lora = [{name: value for name, value in m.lm.state_dict().items() if "lora_" in name} for m in (model, tiny_model)]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])


def test_load_model_on_another_backbone_is_fresh_at_the_asked_rate(tiny_base):
    with pytest.warns(UserWarning, match="adapters are untrained"):
        model = load_model(base_model=str(tiny_base), compression_rate=4, device="cpu")
    assert model.config.base_model == str(tiny_base) and model.config.compression_rate == 4


@pytest.mark.slow
def test_the_default_model_is_the_shipped_checkpoint_and_reads_its_memory_tokens():
    """On the first 8 held-out NQ Oracle rows the answers' CE must be clearly lower from each
    question's own memories than from the neutral control and another question's (on 60 rows:
    2.86 / 3.87 / 4.08 nats per token; the previous, Apple-design checkpoint gained 0.13)."""
    path = SHARED_DATA / "nq" / "dev.jsonl"
    if not path.exists():
        pytest.skip(f"benchmark samples not found at {path}")
    model = load_model(device="cpu")  # no checkpoint named: the shipped one
    assert model.config.memory_design == "pooled"
    rows = instruct_rows(read_examples(path, limit=300), "oracle")  # NQ dev 0-299, as in the model card
    result = evaluate_reading(model, rows[:8])
    assert result["target_ce_own_documents"] < 3.3
    assert result["target_ce_own_documents"] < result["target_ce_neutral_documents"] - 0.3
    assert result["reading_gain"] > 0.5


@pytest.mark.slow
def test_the_shipped_checkpoint_read_at_cr8_answers_the_danube_question_from_its_passage(capsys):
    """The README's example at --compression-rate 8: 32 finer chunks of the same states give the
    Black Forest (the 16 of CR16 give "Bratlyn, Germany")."""
    examples = Path(__file__).parents[1] / "docs" / "examples" / "documents.txt"
    main(["ask", "--docs", str(examples), "--question", "Where does the Danube rise?", "--compression-rate", "8",
          "--json", "--device", "cpu"])
    answer = json.loads(capsys.readouterr().out)
    assert "Black Forest" in answer["answer"] and answer["sources"][0]["first_words"].startswith("The Danube")
