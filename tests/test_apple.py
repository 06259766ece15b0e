"""Import of Apple's checkpoint layout, written here from a tiny model."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from clara_plugins import CheckpointError, ClaraModel
from clara_plugins.apple import load_apple_checkpoint
from clara_plugins.cli import main
from conftest import CORPUS


def write_apple_checkpoint(model: ClaraModel, folder: Path, stage: str = "stage1_2",
                           names: tuple[str, ...] = ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")) -> None:
    """The files Apple's save_pretrained writes: config.json and two weights-only pickles."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True)
    config = {
        "model_type": "CLaRa", "decoder_model_name": "/mnt/private/mistral", "compr_rate":
        model.config.compression_rate, "doc_max_length": model.config.doc_max_length,
        "generation_top_k": 5, "max_new_tokens": model.config.max_new_tokens, "training_stage": stage, "lora": True, "lora_r": model.config.lora_r,
        "sep": True, "different_mem_tokens": True, "pure_inference": False,
        "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    adapters = {  # transformers' get_adapter_state_dict keys: "model.layers.0...lora_A.weight"
        name: {k.removeprefix("base_model.model."): v.clone()
               for k, v in get_peft_model_state_dict(model.lm, adapter_name=name,
                                                                 save_embedding_layers=False).items()}
        for name in names
    }
    torch.save(adapters, folder / "adapters.pth")
    torch.save({"model.embed_tokens.weight": model.lm.get_input_embeddings().weight.detach().clone(),
                "lm_head.weight": model.lm.get_output_embeddings().weight.detach().clone()},
               folder / "decoder_first_last_layers.pth")


def answer(model: ClaraModel) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    memories = model.compress_documents(CORPUS[:3])
    answers, top = model.generate_from_questions(["Where is the tower?"], [CORPUS[:3]], k=2)
    return memories, answers, top


def test_import_loads_every_adapter_including_the_stage1_2_generator(tiny_tokens_model, tiny_base, tmp_path):
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    imported = load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")
    for name, parameter in tiny_tokens_model.lm.named_parameters():
        assert torch.equal(parameter, dict(imported.lm.named_parameters())[name]), name


def test_a_checkpoint_saved_before_the_end_to_end_stage_encodes_questions_with_its_compressor(
        tiny_tokens_model, tiny_base, tmp_path):
    # its missing query reasoner stayed a fresh adapter: questions were encoded by the plain base model
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple", names=("encoder_adapter", "decoder_adapter"))
    with pytest.warns(UserWarning, match="no query reasoner"):
        imported = load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")
    weights = dict(imported.lm.named_parameters())
    reasoner = {name: value for name, value in weights.items() if ".query_reasoner_adapter." in name}
    assert reasoner and all(torch.equal(value, weights[name.replace(".query_reasoner_adapter.", ".encoder_adapter.")])
                            for name, value in reasoner.items())
    assert any(value.abs().sum() > 0 for name, value in reasoner.items() if "lora_B" in name)  # not a fresh adapter
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "no-generator", names=("encoder_adapter",))
    with pytest.raises(CheckpointError, match="lacks \\['decoder_adapter'\\]"):
        load_apple_checkpoint(tmp_path / "no-generator", base_model=str(tiny_base), device="cpu")


def test_conversion_round_trips_outputs(tiny_tokens_model, tiny_base, tmp_path):
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    main(["convert-apple", str(tmp_path / "apple"), str(tmp_path / "ours"), "--base-model", str(tiny_base)])
    converted = ClaraModel.from_pretrained(tmp_path / "ours", device="cpu")
    before, after = answer(tiny_tokens_model), answer(converted)
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert before[1] == after[1] and torch.equal(before[2], after[2])


@pytest.mark.parametrize("in_the_way", ["file", "folder", "file above"])
def test_a_destination_in_the_way_is_refused_before_the_model_loads(tiny_tokens_model, tiny_base, tmp_path,
                                                                    monkeypatch, capsys, in_the_way):
    # it was found after minutes of loading the 7B model, and exited 4 (a bad checkpoint), not 3
    from clara_plugins import apple

    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    destination = {"file": tmp_path / "notes.txt", "folder": tmp_path / "mine",
                   "file above": tmp_path / "notes.txt" / "converted"}[in_the_way]  # found at the save, once loaded
    if in_the_way != "folder":
        (tmp_path / "notes.txt").write_text("keep me")
    else:
        destination.mkdir()
        (destination / "notes.txt").write_text("keep me")
    monkeypatch.setattr(apple, "load_apple_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-apple", str(tmp_path / "apple"), str(destination), "--base-model", str(tiny_base)])
    assert exit_info.value.code == 3 and str(destination) in capsys.readouterr().err
    assert (tmp_path / "notes.txt" if in_the_way != "folder" else destination / "notes.txt").read_text() == "keep me"


def test_unreachable_base_model_asks_for_a_local_path(tiny_tokens_model, tmp_path, monkeypatch):
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    with pytest.raises(CheckpointError, match="pass base_model="):
        load_apple_checkpoint(tmp_path / "apple", device="cpu")
    # the path given was blamed on Apple's configuration
    with pytest.raises(CheckpointError, match=f"base model {tmp_path / 'typo'} does not exist"):
        load_apple_checkpoint(tmp_path / "apple", base_model=tmp_path / "typo", device="cpu")
    # a hub id out of reach (Apple's usual decoder_model_name) failed without naming the override
    config = json.loads((tmp_path / "apple" / "config.json").read_text())
    (tmp_path / "apple" / "config.json").write_text(json.dumps({**config, "decoder_model_name": "nobody/no-such-model"}))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # not half a minute of retries
    with pytest.raises(OSError, match=r"'nobody/no-such-model'.*apple records it as its base model: pass base_model="):
        load_apple_checkpoint(tmp_path / "apple", device="cpu")


def test_a_config_whose_lora_rank_is_not_its_adapters_is_refused_before_they_are_built(tiny_tokens_model, tmp_path,
                                                                                      monkeypatch):
    from clara_plugins import model as model_module

    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    config = json.loads((tmp_path / "apple" / "config.json").read_text())
    (tmp_path / "apple" / "config.json").write_text(json.dumps({**config, "lora_r": 100_000}))
    monkeypatch.setattr(model_module, "get_peft_model", lambda *a, **k: pytest.fail("adapters were built"))
    with pytest.raises(CheckpointError, match=f"adapters.pth holds adapters of rank {tiny_tokens_model.config.lora_r}, "
                                              "and .*config.json gives lora_r 100000"):
        load_apple_checkpoint(tmp_path / "apple", base_model=tiny_tokens_model.config.base_model, device="cpu")


def test_checkpoint_of_another_base_model_is_refused(tiny_tokens_model, other_tiny_base, tmp_path):
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    with pytest.raises(CheckpointError, match="another base model"):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(other_tiny_base), device="cpu")


def test_pickles_with_code_are_refused(tiny_tokens_model, tiny_base, tmp_path):
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    torch.save({"encoder_adapter": {"x": Path("not-a-tensor")}}, tmp_path / "apple" / "adapters.pth")
    with pytest.raises(CheckpointError, match="adapters.pth is damaged, or not a file of tensors that can be read safely"):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")


@pytest.mark.parametrize("content,message", [(b"Repository not found\n", "is damaged, or not a file of tensors"),
                                             (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer")])
def test_a_download_that_is_no_file_of_tensors_is_named(tiny_tokens_model, tiny_base, tmp_path, capsys, content,
                                                        message):
    # a page of text failed on "pop from empty list"; an LFS pointer got torch's advice to load with
    # weights_only=False, which runs whatever code a file holds
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    (tmp_path / "apple" / "adapters.pth").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-apple", str(tmp_path / "apple"), str(tmp_path / "out"), "--base-model", str(tiny_base)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 4 and message in error and "adapters.pth" in error and "weights_only" not in error


def test_an_output_matrix_apart_from_the_embeddings_is_required_and_checked(tiny_tokens_model, other_tiny_base,
                                                                            tiny_base, tmp_path):
    # without lm_head an untied model kept its own seeded rows; another model's head was taken
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    matrices = tmp_path / "apple" / "decoder_first_last_layers.pth"
    saved = torch.load(matrices, weights_only=True)
    torch.save({"model.embed_tokens.weight": saved["model.embed_tokens.weight"]}, matrices)
    with pytest.raises(CheckpointError, match="has no lm_head.weight"):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")
    other = ClaraModel(dataclasses.replace(tiny_tokens_model.config, base_model=str(other_tiny_base)), device="cpu")
    torch.save({**saved, "lm_head.weight": other.lm.get_output_embeddings().weight.detach().clone()}, matrices)
    with pytest.raises(CheckpointError, match="the output rows of the base vocabulary differ"):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")


def test_a_base_model_folder_named_from_here_is_recorded_whole(tiny_tokens_model, tiny_base, tmp_path, monkeypatch):
    # --base-model mistral (a folder in the working directory) was recorded as "mistral": a hub id elsewhere
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    monkeypatch.chdir(Path(tiny_base).parent)
    model = load_apple_checkpoint(tmp_path / "apple", base_model=Path(tiny_base).name, device="cpu")
    assert model.config.base_model == str(Path(tiny_base).resolve())


def test_an_adapter_that_is_not_a_state_dict_is_named(tiny_tokens_model, tiny_base, tmp_path, monkeypatch):
    # an AttributeError ('list' object has no attribute 'items') before, after the base model loaded
    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    monkeypatch.setattr(ClaraModel, "__init__", lambda *a, **k: pytest.fail("the base model was loaded"))
    for adapters in ({"encoder_adapter": [torch.zeros(2)], "decoder_adapter": {}},
                     {"encoder_adapter": {1: torch.zeros(2)}, "decoder_adapter": {}},
                     {"encoder_adapter": {"a.lora_A.weight": [0.0]}, "decoder_adapter": {}}):  # a list: after the load
        torch.save(adapters, tmp_path / "apple" / "adapters.pth")
        with pytest.raises(CheckpointError, match="adapters.pth: encoder_adapter is not a state dict of named"):
            load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")
    # and the matrices: a bare tensor, or no embedding rows, were found after the base model loaded
    torch.save({"encoder_adapter": {}, "decoder_adapter": {}}, tmp_path / "apple" / "adapters.pth")
    for broken, message in [(torch.zeros(2), "decoder_first_last_layers.pth is not a state dict of named tensors"),
                            ({"lm_head.weight": torch.zeros(2)}, "decoder_first_last_layers.pth has no embed_tokens")]:
        torch.save(broken, tmp_path / "apple" / "decoder_first_last_layers.pth")
        with pytest.raises(CheckpointError, match=message):
            load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")


@pytest.mark.parametrize("config,message", [
    ([{"model_type": "CLaRa"}], r"config.json holds a JSON list, not a checkpoint's configuration"),
    ({"model_type": "CLaRa"}, r"config.json has no compr_rate: the compression rate its memories were trained at"),
    # a bare TypeError, ValueError and AttributeError before
    ({"model_type": "CLaRa", "compr_rate": None}, r"config.json: int\(\) argument must be"),
    ({"model_type": "CLaRa", "compr_rate": "16x"}, r"config.json: invalid literal for int\(\)"),
    ({"model_type": "CLaRa", "compr_rate": 16, "doc_max_length": 8}, r"config.json: doc_max_length \(8\) must be"),
])
def test_a_config_of_the_wrong_shape_is_named(tiny_base, tmp_path, config, message):
    (tmp_path / "apple").mkdir()
    (tmp_path / "apple" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")
