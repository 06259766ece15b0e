"""Our checkpoint format: round trip, base-model check, corrupted and partial files."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from clara_plugins import CheckpointError, ClaraModel
from conftest import CORPUS, build_tiny_base_model, randomize_adapters

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


def test_loading_a_checkpoint_leaves_the_callers_random_stream_as_it_was(tiny_model, tmp_path):
    # its LoRA weights, drawn at random and then overwritten, moved a user's seeded experiment on
    tiny_model.save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_half_precision_checkpoint_loads_into_a_float32_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    loaded = ClaraModel.from_pretrained(tmp_path / "half", device="cpu")
    assert torch.allclose(loaded.compress_documents(CORPUS[:2]), tiny_model.compress_documents(CORPUS[:2]),
                          atol=1e-2)


def test_saving_over_an_existing_checkpoint_keeps_the_files_it_does_not_write(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "eval.json").write_text('{"f1": 18.9}')
    (tmp_path / "ckpt" / "notes").mkdir()
    (tmp_path / "ckpt" / "notes" / "run.md").write_text("seed 4")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "eval.json").read_text() == '{"f1": 18.9}'
    assert (tmp_path / "ckpt" / "notes" / "run.md").read_text() == "seed 4"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folders left behind


def test_a_checkpoint_is_saved_in_a_dtype_named_as_the_loader_names_it_and_never_as_integers(tiny_model, tmp_path):
    # "float16" failed as an "invalid device string"; torch.int8 wrote the LoRA weights cut to integers
    from safetensors.torch import load_file

    tiny_model.save_pretrained(tmp_path / "half", dtype="float16")
    rows = load_file(str(tmp_path / "half" / "memory_embeddings.safetensors"))["input_rows"]
    assert rows.dtype == torch.float16
    for dtype in (torch.int8, torch.float8_e4m3fn):  # float8: a bare NotImplementedError from isfinite
        with pytest.raises(ValueError, match=f"floating-point dtype .*, got {dtype}"):
            tiny_model.save_pretrained(tmp_path / "int", dtype=dtype)
    assert not (tmp_path / "int").exists()


def test_a_checkpoint_whose_base_model_is_not_where_it_recorded_names_itself_and_the_override(tiny_config, tmp_path,
                                                                                                monkeypatch):
    # on another machine the base model's own error said neither where its name came from nor
    # how to give another
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # not half a minute of retries
    base = build_tiny_base_model(tmp_path / "base")
    ClaraModel(dataclasses.replace(tiny_config, base_model=str(base)), device="cpu").save_pretrained(tmp_path / "ckpt")
    base.rename(tmp_path / "moved")
    with pytest.raises(OSError, match=r"could not load base model .*; .*ckpt records it as its base model: pass "
                                      r"base_model= \(--base-model;"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    with pytest.raises(OSError, match="could not load base model") as refused:  # named by the caller: no advice
        ClaraModel.from_pretrained(tmp_path / "ckpt", base_model=str(base), device="cpu")
    assert "records it" not in str(refused.value)
    model = ClaraModel.from_pretrained(tmp_path / "ckpt", base_model=str(tmp_path / "moved"), device="cpu")
    assert model.config.base_model == str(tmp_path / "moved")
    # an integer dtype failed in transformers (for the default model, advising to delete its good copy)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=f"floating-point dtype .*, got {dtype}"):
            ClaraModel.from_pretrained(tmp_path / "ckpt", base_model=str(tmp_path / "moved"), device="cpu", dtype=dtype)


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


def test_a_damaged_checkpoint_leaves_the_model_it_loads_into_as_it_was(tiny_model, tiny_config, tmp_path):
    # the adapters were loaded one by one, the rows checked last: a resumed run's model was left
    # half-loaded; integer weights loaded, cast, unsaid; an untied model kept its seeded output rows
    from safetensors.torch import load_file, save_file

    from clara_plugins.checkpoint import adapters_sha256, load_trained_weights

    tiny_model.save_pretrained(tmp_path / "ckpt")
    model = ClaraModel(tiny_config, device="cpu")
    before = adapters_sha256(model)
    rows_file, adapter_file = tmp_path / "ckpt" / "memory_embeddings.safetensors", \
        tmp_path / "ckpt" / "adapter_decoder_adapter.safetensors"
    rows, adapter = load_file(rows_file), load_file(adapter_file)
    for damaged, message in (({**rows, "input_rows": rows["input_rows"] * float("nan")}, "NaN or infinite"),
                             ({**rows, "input_rows": rows["input_rows"].long()}, "int64 values, not floating point"),
                             ({**rows, "input_rows": rows["input_rows"].to(torch.float8_e4m3fn)},
                              "float8_e4m3fn values, not floating point"),
                             ({"input_rows": rows["input_rows"]}, "lacks the output rows")):
        save_file(damaged, rows_file)
        with pytest.raises(CheckpointError, match=message):
            load_trained_weights(model, tmp_path / "ckpt")
        assert adapters_sha256(model) == before
    save_file(rows, rows_file)
    for dtype in (torch.long, torch.float8_e5m2):
        save_file({key: value.to(dtype) for key, value in adapter.items()}, adapter_file)
        with pytest.raises(CheckpointError, match=f"{str(dtype)[6:]} values, not floating point"):
            load_trained_weights(model, tmp_path / "ckpt")
    adapter_file.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    with pytest.raises(CheckpointError, match="is a Git LFS pointer"):  # "corrupted: header too large"
        load_trained_weights(model, tmp_path / "ckpt")
    assert adapters_sha256(model) == before


def test_missing_or_foreign_files_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="clara_config.json is missing"):
        ClaraModel.from_pretrained(tmp_path, device="cpu")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    header = json.loads((tmp_path / "ckpt" / "clara_config.json").read_text())
    header["config"]["compression_rate"] = 8
    (tmp_path / "ckpt" / "clara_config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="does not fit|shape"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_a_header_whose_lora_rank_is_not_its_adapters_is_refused_before_they_are_built(tiny_model, tmp_path,
                                                                                      monkeypatch):
    # peft filled adapters of the header's rank first: 366 GB for SmolLM2 at a lora_r of 100,000
    from clara_plugins import model as model_module

    tiny_model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "clara_config.json"
    header = json.loads(path.read_text())
    header["config"].update(lora_r=100_000, lora_alpha=200_000)
    path.write_text(json.dumps(header))
    monkeypatch.setattr(model_module, "get_peft_model", lambda *a, **k: pytest.fail("adapters were built"))
    with pytest.raises(CheckpointError, match=f"adapter_encoder_adapter.safetensors holds adapters of rank "
                                              f"{tiny_model.config.lora_r}, and .*clara_config.json gives lora_r 100000"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_a_hand_edited_header_or_rows_file_is_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "clara_config.json"
    header = json.loads(path.read_text())
    for edited, message in [([header], "holds a JSON list, not a checkpoint header"),  # was a bare AttributeError
                            ({**header, "config": None}, "lacks its config"),  # and these bare KeyErrors
                            ({k: v for k, v in header.items() if k != "base_model_fingerprint"}, "lacks its config"),
                            ({**header, "base_model_fingerprint": None}, "lacks its config"),  # bare Attribute-,
                            ({**header, "base_model_fingerprint": {**header["base_model_fingerprint"],  # Key- and
                                                                   "weight_norms": ["1.0"]}}, "lacks its config"),
                            ({**header, "base_model_fingerprint": {  # TypeErrors
                                k: v for k, v in header["base_model_fingerprint"].items() if k != "weight_norms"}},
                             "lacks its config"),
                            # a NaN norm matched every base model of the architecture
                            ({**header, "base_model_fingerprint": {**header["base_model_fingerprint"],
                                                                   "weight_norms": [float("nan")]}}, "finite"),
                            # and a setting every header holds loaded at its default: adapters at another scale
                            ({**header, "config": {k: v for k, v in header["config"].items() if k != "lora_alpha"}},
                             "lacks the settings lora_alpha: damaged")]:
        path.write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    path.write_text(json.dumps(header))
    rows = tmp_path / "ckpt" / "memory_embeddings.safetensors"
    save_file({k: v for k, v in load_file(str(rows)).items() if k != "input_rows"}, str(rows))
    with pytest.raises(CheckpointError, match="memory_embeddings.safetensors lacks input_rows"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_memory_token_rows_that_are_not_finite_are_refused_by_file(tiny_model, tmp_path):
    # they loaded, and every document then compressed into NaN memories
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "ckpt")
    rows = tmp_path / "ckpt" / "memory_embeddings.safetensors"
    tensors = load_file(str(rows))
    tensors["input_rows"][0, 0] = float("nan")
    save_file(tensors, str(rows))
    with pytest.raises(CheckpointError, match="memory_embeddings.safetensors: memory-token embeddings hold NaN"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_a_checkpoint_older_than_the_memory_design_setting_loads_as_tokens(tiny_tokens_model, tmp_path):
    tiny_tokens_model.save_pretrained(tmp_path / "old")
    header = json.loads((tmp_path / "old" / "clara_config.json").read_text())
    del header["config"]["memory_design"], header["config"]["retrieval_key"]
    (tmp_path / "old" / "clara_config.json").write_text(json.dumps(header))
    loaded = ClaraModel.from_pretrained(tmp_path / "old", device="cpu")
    assert (loaded.config.memory_design, loaded.config.retrieval_key) == ("tokens", "flat")
    assert torch.allclose(outputs(loaded)[0], outputs(tiny_tokens_model)[0], atol=1e-6)


def test_a_tokens_checkpoint_saved_with_pooling_settings_it_never_read_still_loads(tiny_tokens_model, tmp_path):
    # the settings are refused beside the tokens design now: such a checkpoint no longer loaded or resumed
    tiny_tokens_model.save_pretrained(tmp_path / "old")
    header = json.loads((tmp_path / "old" / "clara_config.json").read_text())
    header["config"].update(memory_pooling="last", memory_layer=-2)
    (tmp_path / "old" / "clara_config.json").write_text(json.dumps(header))
    loaded = ClaraModel.from_pretrained(tmp_path / "old", device="cpu")
    assert (loaded.config.memory_pooling, loaded.config.memory_layer) == ("mean", -1)
    assert torch.allclose(outputs(loaded)[0], outputs(tiny_tokens_model)[0], atol=1e-6)
    # and a store it signed then opens with it
    from clara_plugins import MemoryStore

    store = MemoryStore(loaded)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    generation = store.save(tmp_path / "store")
    header = json.loads((generation / "store.json").read_text())
    header["compressor"]["memory_design"] = ["tokens", "last", -2, False]
    (generation / "store.json").write_text(json.dumps(header))
    assert MemoryStore.load(tmp_path / "store", loaded).all_ids() == ["a", "b"]


def test_the_memory_design_is_saved_with_the_checkpoint(tiny_config, tmp_path):
    import dataclasses

    model = ClaraModel(dataclasses.replace(tiny_config, memory_pooling="last", memory_layer=1, retrieval_key="flat"),
                       device="cpu")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert (loaded.config.memory_design, loaded.config.memory_pooling, loaded.config.memory_layer,
            loaded.config.retrieval_key) == ("pooled", "last", 1, "flat")


def test_saving_into_a_foreign_folder_is_refused_and_deletes_nothing(tiny_model, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own file")
    with pytest.raises(CheckpointError, match="did not write"):
        tiny_model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "my own file" and len(list(folder.iterdir())) == 1
    (tmp_path / "empty").mkdir()
    tiny_model.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "clara_config.json").exists()


def test_a_crash_between_the_two_renames_of_a_save_is_recovered(tiny_model, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_model.save_pretrained(folder)
    folder.rename(tmp_path / ".ckpt.old")  # what the first rename of the next save leaves
    loaded = ClaraModel.from_pretrained(folder, device="cpu")
    assert torch.allclose(outputs(loaded)[0], outputs(tiny_model)[0], atol=1e-6)
    assert folder.is_dir() and not (tmp_path / ".ckpt.old").exists()


@pytest.mark.parametrize("saved", [torch.float16, None])
def test_a_checkpoint_signs_its_compressor_alike_in_every_dtype(tiny_model, tmp_path, saved):
    """Stores written by a GPU run in bf16 or fp16 open with the same checkpoint on a CPU in fp32
    (an fp32 checkpoint read in fp16 rounded its added rows twice, and signed otherwise)."""
    from clara_plugins.checkpoint import compressor_signature
    from clara_plugins.checkpoint import check_compressor

    tiny_model.save_pretrained(tmp_path / "ckpt", dtype=saved)
    fp32 = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    fp16 = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.float16)
    bf16 = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16)
    signatures = [compressor_signature(model) for model in (fp32, fp16, bf16)]
    assert len({signature["encoder_sha256"] for signature in signatures}) == 1
    for signature in signatures[1:]:  # what a store checks: the base model within tolerance, the rest exactly
        check_compressor(signatures[0], signature, "a store")


@pytest.mark.parametrize("tied", [False, True])  # the default backbone ties its output rows to the input rows
def test_a_pooled_checkpoint_reads_at_another_rate_as_finer_chunks_of_the_same_states(tiny_config, tmp_path, tied):
    base = build_tiny_base_model(tmp_path / "base", tie=True) if tied else tiny_config.base_model
    tiny_model = ClaraModel(dataclasses.replace(tiny_config, base_model=str(base)), device="cpu")
    randomize_adapters(tiny_model)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    finer = ClaraModel.from_pretrained(tmp_path / "ckpt", compression_rate=8, device="cpu")
    assert (finer.config.compression_rate, finer.config.n_mem_tokens, tiny_model.config.n_mem_tokens) == (8, 8, 4)
    texts = ["Berlin is the capital of", "The Danube flows through Vienna,"]  # 8 and 24 tokens: even chunks
    assert [len(tiny_model.tokenizer(t)["input_ids"]) for t in texts] == [8, 24]
    coarse, fine = tiny_model.compress(texts).memories, finer.compress(texts).memories  # [2, 4 | 8, hidden]
    assert torch.allclose(fine.reshape(2, 4, 2, -1).mean(2), coarse, atol=1e-5)
    base = tiny_model.base_vocab_size  # <AE>, <ENC>, <SEP> keep their rows after the <MEM> rows
    assert torch.equal(finer.lm.get_input_embeddings().weight[base + 8:], tiny_model.lm.get_input_embeddings().weight[base + 4:])
    [answer] = finer.answer(["Which river flows through Vienna?"], fine[None, 1:])
    assert isinstance(answer, str)


def test_an_appended_token_checkpoint_reads_only_at_its_own_rate(tiny_tokens_model, tmp_path):
    tiny_tokens_model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="'tokens' memory design.*only at its own compression rate 16, not 8"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", compression_rate=8, device="cpu")
    assert ClaraModel.from_pretrained(tmp_path / "ckpt", compression_rate=16, device="cpu").config.n_mem_tokens == 4


def test_a_checkpoint_saved_before_end_to_end_encodes_questions_with_its_compressor(tiny_config, tmp_path):
    # its query reasoner was the plain base model, encoding questions in another space than documents
    model = ClaraModel(tiny_config, device="cpu")
    with torch.no_grad():
        for name, parameter in model.lm.named_parameters():
            if ".lora_B.encoder_adapter." in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "scp")
    with pytest.warns(UserWarning, match="untrained query reasoner"):
        loaded = ClaraModel.from_pretrained(tmp_path / "scp", device="cpu")
    assert torch.allclose(loaded.encode_queries(["Who won?"]), loaded.compress_documents(["Who won?"]), atol=1e-5)


def test_a_save_swapped_in_while_a_checkpoint_loads_is_read_whole(tiny_model, tmp_path, monkeypatch):
    # `clara eval` on a run's checkpoint while training saved into it: the files read before the
    # swap and those after made one model of two saves
    from clara_plugins import model as model_module
    from clara_plugins.checkpoint import files_sha256, weight_files

    tiny_model.save_pretrained(tmp_path / "ckpt")
    newer = ClaraModel(tiny_model.config, device="cpu")
    randomize_adapters(newer, seed=5)
    real = model_module.load_trained_weights
    reads = []

    def a_save_lands_mid_read(model, folder, **kwargs):
        real(model, folder, **kwargs)
        reads.append(folder)
        if len(reads) == 1:
            newer.save_pretrained(folder)

    monkeypatch.setattr(model_module, "load_trained_weights", a_save_lands_mid_read)
    loaded = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert len(reads) == 2
    assert torch.equal(loaded.compress(CORPUS[:2]).memories, newer.compress(CORPUS[:2]).memories)
    assert loaded.weights_sha256 == files_sha256(weight_files(tmp_path / "ckpt"))


def test_a_load_between_a_saves_two_renames_waits_for_the_new_folder(tiny_model, tmp_path, monkeypatch):
    # the folder's identity was read with os.stat, which raised: the load failed instead of trying again
    from clara_plugins import model as model_module

    tiny_model.save_pretrained(tmp_path / "ckpt")
    identity, calls = model_module._folder_identity, []

    def mid_swap_once(folder):
        calls.append(folder)
        if len(calls) == 1:  # the first look falls between the renames
            (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
            try:
                return identity(folder)
            finally:
                (tmp_path / ".ckpt.old").rename(tmp_path / "ckpt")
        return identity(folder)

    monkeypatch.setattr(model_module, "_folder_identity", mid_swap_once)
    loaded = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert len(calls) >= 3 and torch.equal(loaded.compress(CORPUS[:1]).memories, tiny_model.compress(CORPUS[:1]).memories)


def test_a_path_that_is_no_checkpoint_says_what_it_is(tiny_model, tmp_path):
    # every mix-up read "clara_config.json is missing", with nothing to say what to pass instead
    tiny_model.save_pretrained(tmp_path / "run" / "checkpoint")
    (tmp_path / "apple").mkdir()
    (tmp_path / "apple" / "adapters.pth").write_bytes(b"")
    for folder, hint in [("nowhere", r"\(no such folder\)"), ("run", r"\(a training run's output: its checkpoint is"),
                         ("apple", r"\(an Apple checkpoint: convert it with clara convert-apple\)")]:
        with pytest.raises(CheckpointError, match=f"clara_config.json is missing {hint}"):
            ClaraModel.from_pretrained(tmp_path / folder, device="cpu")


@pytest.mark.parametrize("through_link", [False, True])
def test_a_load_that_meets_the_folder_gone_before_its_config_is_read_waits(tiny_model, tmp_path, through_link):
    # the configuration was read before the wait for a save's second rename: the load failed; a
    # load through a link looked for the writer beside the link, not beside the folder it names
    import fcntl
    import os
    import threading

    tiny_model.save_pretrained(tmp_path / "ckpt")
    if through_link:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "link").symlink_to(tmp_path / "ckpt")
    staging = tmp_path / ".ckpt.0123456789abcdef"
    staging.mkdir()
    held = os.open(staging, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a writer between its two renames
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    writer = threading.Timer(0.1, lambda: (tmp_path / ".ckpt.old").rename(tmp_path / "ckpt"))
    writer.start()
    try:
        loaded = ClaraModel.from_pretrained(tmp_path / ("elsewhere/link" if through_link else "ckpt"), device="cpu")
    finally:
        writer.join()
        os.close(held)
    assert torch.equal(loaded.compress(CORPUS[:1]).memories, tiny_model.compress(CORPUS[:1]).memories)


def test_weights_that_are_not_finite_are_not_saved_over_a_good_checkpoint(tiny_model, tmp_path):
    # the save went through, and the load refused the only copy
    tiny_model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "clara_config.json").read_text()
    weight = next(p for name, p in tiny_model.lm.named_parameters() if "lora_A" in name)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or infinite values: not saved"):
        tiny_model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        weight[0, 0] = 1e6  # finite in float32, infinite in float16
    with pytest.raises(CheckpointError, match="holds NaN or infinite values in torch.float16"):
        tiny_model.save_pretrained(tmp_path / "ckpt", dtype="float16")
    assert (tmp_path / "ckpt" / "clara_config.json").read_text() == before
    ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_a_configuration_changed_so_it_would_not_load_is_not_saved_over_a_good_checkpoint(tiny_model, tmp_path):
    # the model's config is a public object: the save went through, and the load refused the only copy
    tiny_model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "clara_config.json").read_text()
    tiny_model.config.generation_top_k = "3"  # read as int(k) in the process, refused at a load
    with pytest.raises(CheckpointError, match="generation_top_k must be an int.*not saved to"):
        tiny_model.save_pretrained(tmp_path / "ckpt")
    tiny_model.config.generation_top_k = 3
    tiny_model.config.compression_rate *= 2  # rows for a rate the model was not built with
    with pytest.raises(CheckpointError, match="memory tokens, and the model has"):
        tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "clara_config.json").read_text() == before
    tiny_model.config.compression_rate //= 2
    # the adapters keep the shape and scale they were built with: lora_alpha loaded at another
    # scale, unsaid; lora_r and a layer past the base model's made the checkpoint unloadable
    for name, value in (("lora_alpha", 64), ("lora_r", 8), ("memory_layer", 9)):
        built = getattr(tiny_model.config, name)
        setattr(tiny_model.config, name, value)
        with pytest.raises(CheckpointError, match=f"no longer fits its weights: {name}={value}"):
            tiny_model.save_pretrained(tmp_path / "ckpt")
        setattr(tiny_model.config, name, built)
    assert (tmp_path / "ckpt" / "clara_config.json").read_text() == before
    tiny_model.config.generation_top_k = np.int64(2)  # read as a number, written as one (a bare TypeError in the write)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu").config.generation_top_k == 2


def test_a_base_model_folder_is_recorded_as_a_path_that_loads_from_anywhere(tiny_base, tiny_model, tmp_path,
                                                                            monkeypatch):
    # a relative folder was saved as written (the checkpoint loaded from that directory only),
    # and a Path given to from_pretrained made every later save fail on JSON
    from pathlib import Path

    from clara_plugins import ClaraConfig
    from clara_plugins.config import DEFAULT_BASE_MODEL

    monkeypatch.chdir(tiny_base.parent)
    assert ClaraConfig(base_model=f"./{tiny_base.name}").base_model == str(tiny_base)
    assert ClaraConfig(base_model=tiny_base.name).base_model == tiny_base.name  # shaped as a hub id
    # a Path is a folder whatever its shape (Path("./x") reads as "x", and was recorded relative)
    assert ClaraConfig(base_model=Path(f"./{tiny_base.name}")).base_model == str(tiny_base)
    monkeypatch.setenv("HOME", str(tiny_base.parent))  # "~/x", quoted or after an "=", reached no shell
    assert ClaraConfig(base_model=f"~/{tiny_base.name}").base_model == str(tiny_base)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = ClaraModel.from_pretrained(tmp_path / "ckpt", base_model=Path(f"../{tiny_base.parent.name}/"
                                                                             f"{tiny_base.name}"), device="cpu")
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "clara_config.json").read_text())["config"]["base_model"] == str(tiny_base)
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_BASE_MODEL).mkdir()  # a folder named as the default is not the default
    assert ClaraConfig().base_model == DEFAULT_BASE_MODEL



def test_a_checkpoint_loaded_with_another_chat_template_says_so(tiny_model, tmp_path):
    # the base model's fingerprint holds no template: a revised one changed every prompt, unsaid
    import shutil

    import transformers

    tiny_model.save_pretrained(tmp_path / "ckpt")
    base = tmp_path / "base"
    shutil.copytree(tiny_model.config.base_model, base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|{{ m['role'] }}|>", "<|{{ m['role'] }}|>\n")
    tokenizer.save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")  # its own template: no word
    with pytest.warns(UserWarning, match="trained on prompts that the chat template of .* now lays out otherwise"):
        ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", base_model=str(base))


def test_a_fingerprint_probe_that_is_not_finite_never_matches(tiny_model):
    # a NaN row norm compared as no difference: any base model matched (the stored side was checked, not the live one)
    from clara_plugins.backbone import fingerprint_mismatch

    fingerprint = tiny_model.base_fingerprint
    broken = {**fingerprint, "weight_norms": [float("nan"), *fingerprint["weight_norms"][1:]]}
    assert fingerprint_mismatch(fingerprint, fingerprint) is None
    assert fingerprint_mismatch(fingerprint, broken) == "weight probes hold NaN or infinite values"
