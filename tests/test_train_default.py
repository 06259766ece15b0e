"""benchmarks/train_default.sh, the recipe of the default checkpoint, end to end at smoke-test size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clara_plugins import ClaraConfig, ClaraModel
from conftest import SHARED_DATA, SHARED_FILES, build_tiny_base_model, randomize_adapters

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_default.sh"


def _run_smoke_recipe(tmp_path: Path, **sizes: str) -> Path:
    """Run the script at smoke-test size (``sizes`` override the defaults below); returns its OUT."""
    if not all((SHARED_DATA / name).exists() for name in SHARED_FILES):
        pytest.skip("needs ../shared/data")
    base = tmp_path / "base"  # a test may have built it first, for a checkpoint on it
    if not base.exists():
        build_tiny_base_model(base)
    out = tmp_path / "run"
    environment = {**os.environ, "DATA": str(SHARED_DATA), "OUT": str(out), "BASE_MODEL": str(base),
                   "DEVICE": "cpu", "SCP_STEPS": "2", "SCP_BATCH": "4", "SCP_ACCUM": "2", "SCP_LR": "1e-4",
                   "SCP_MORE_STEPS": "2", "SCP_MORE_BATCH": "8", "SCP_MORE_ACCUM": "2", "TEXT_STEPS": "2",
                   "DISTILL_STEPS": "2", "DISTILL_MORE_STEPS": "2", "RESTATE_STEPS": "2", "E2E_STEPS": "2",
                   "RETRIEVAL_STEPS": "2", "RETRIEVAL_BATCH": "4", "RETRIEVAL_ACCUM": "2", "BATCH": "2", "LIMIT": "6",
                   "EVAL_LIMIT": "3", "CONTROL_SHIFTS": "1 2", "RECALL_LIMIT": "3", "PROBE_EVERY": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **sizes}
    run = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.slow
def test_the_recipe_trains_every_stage_and_writes_the_model_card_numbers(tmp_path):
    out = _run_smoke_recipe(tmp_path)
    assert not (out / "instruct").exists()  # the shipped recipe has no instruction stage before end-to-end
    for stage in ("scp", "scp_more", "e2e", "retrieval", "text", "distill", "distill_more", "distill_restate"):
        log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [record["step"] for record in log if "probe" not in record] == [1, 2]
        if stage == "scp" or stage.startswith("distill"):  # the reading margin is on, and the probes ran
            assert all("reading_gain" in record for record in log)
            assert [record["step"] for record in log if "probe" in record][-1] == 2
        if stage.startswith("distill"):  # the text reader teaches, and both held-out probes ran
            assert all("distill" in record for record in log if "probe" not in record)
            assert {record["probe"] for record in log if "probe" in record} == {"probe_nq5", "probe_hotpot5"}
    def config(stage):
        return torch.load(out / stage / "checkpoint" / "trainer_state.pt", weights_only=True)["config"]

    assert {key: config("scp")[key] for key in ("batch_size", "grad_accum", "schedule", "lr")} == \
        {"batch_size": 2, "grad_accum": 2, "schedule": "constant", "lr": 1e-4}
    assert {key: config("scp_more")[key] for key in ("batch_size", "grad_accum", "schedule", "lr", "seed")} == \
        {"batch_size": 4, "grad_accum": 2, "schedule": "constant", "lr": 3e-4, "seed": 1}
    assert (config("distill")["restate_weight"], config("distill")["seed"]) == (1.0, 4)
    assert (config("distill_restate")["restate_weight"], config("distill_restate")["seed"]) == (1.0, 9)
    assert all("retrieval" in json.loads(line) for line in (out / "retrieval" / "log.jsonl").read_text().splitlines())
    clara = json.loads((out / "eval" / "nq_oracle_clara.json").read_text())
    assert [a["system"] for a in clara["answers"]] == ["clara", "control", "text", "none"]
    assert clara["answers"][1]["shifts"] == [1, 2] and "f1_above_control" in clara
    assert clara["reading"]["examples"] == 3
    recall = json.loads((out / "eval" / "recall_hotpotqa_e2e20.json").read_text())
    assert [r["retriever"] for r in recall["retrieval"]] == ["compressor", "reasoner", "dense", "bm25"]
    assert all(json.loads((out / "eval" / f"reading_{probe}.json").read_text())["reading"]["examples"] == 16
               for probe in ("probe_reconstruct", "probe_qa"))
    assert (out / "cr16-fp16" / "clara_config.json").exists()
    scp_kinds = {json.loads(line).get("data_type", "question")
                 for line in (out / "rows" / "scp.jsonl").read_text().splitlines()}
    assert scp_kinds == {"question", "reconstruct", "continue"}


@pytest.mark.slow
def test_an_instruction_stage_hands_its_generator_to_end_to_end_and_scp_continues_at_another_rate(tmp_path):
    build_tiny_base_model(tmp_path / "base")
    shipped = ClaraModel(ClaraConfig(base_model=str(tmp_path / "base"), compression_rate=16), device="cpu")
    randomize_adapters(shipped)
    shipped.save_pretrained(tmp_path / "shipped", dtype=torch.float16)  # as the default checkpoint is shipped
    out = _run_smoke_recipe(tmp_path, INSTRUCT_STEPS="2", SCP_MORE_STEPS="0", RETRIEVAL_STEPS="0", DISTILL_STEPS="1",
                            DISTILL_MORE_STEPS="0", RESTATE_STEPS="0", TEXT_STEPS="1", EVAL_LIMIT="2",
                            CONTROL_SHIFTS="1", RECALL_LIMIT="2", SCP_INIT=str(tmp_path / "shipped"), CR="8")
    assert not (out / "scp_more").exists() and not (out / "retrieval").exists()
    for stage in ("scp", "instruct", "e2e", "distill"):  # read at CR8 from the start, and passed on
        assert json.loads((out / stage / "checkpoint" / "clara_config.json").read_text())["config"][
            "compression_rate"] == 8
    encoder = load_file(out / "scp" / "checkpoint" / "adapter_encoder_adapter.safetensors")
    start = load_file(tmp_path / "shipped" / "adapter_encoder_adapter.safetensors")
    assert all(torch.allclose(encoder[name], start[name].float(), atol=0.05) for name in start)  # continued from it
    assert (out / "cr8-fp16" / "clara_config.json").exists()

    def generator(stage):
        return load_file(out / stage / "checkpoint" / "adapter_decoder_adapter.safetensors")

    trained, kept, before = generator("instruct"), generator("e2e"), generator("scp")
    assert all(torch.equal(trained[name], kept[name]) for name in trained)  # e2e started from it, generator frozen
    assert not all(torch.equal(trained[name], before[name]) for name in trained)
    assert (out / "eval" / "nq_oracle_clara.json").exists()


@pytest.mark.slow
def test_scp_runs_apart_from_the_later_stages_as_on_a_gpu_machine(tmp_path):
    """PARTS: the rows here, SCP on a machine without the data (its fp16 checkpoint comes back),
    then the later stages and the evaluations here, from that checkpoint."""
    sizes = dict(SCP_MORE_STEPS="0", RETRIEVAL_STEPS="0", DISTILL_STEPS="1", DISTILL_MORE_STEPS="0", RESTATE_STEPS="0",
                 TEXT_STEPS="1", EVAL_LIMIT="2", CONTROL_SHIFTS="1", RECALL_LIMIT="2")
    # the data folder as the README names it for every command: $CLARA_DATA (DATA= read only)
    out = _run_smoke_recipe(tmp_path, PARTS="rows", DATA="", CLARA_DATA=str(SHARED_DATA), **sizes)
    assert (out / "rows" / "scp.jsonl").exists() and not (out / "scp").exists()
    _run_smoke_recipe(tmp_path, PARTS="scp", DATA=str(tmp_path / "no-data"), **sizes)
    assert (out / "scp-fp16" / "clara_config.json").exists() and not (out / "e2e").exists()
    carried = tmp_path / "carried"
    (out / "scp-fp16").rename(carried)
    _run_smoke_recipe(tmp_path, PARTS="later eval", SCP_CHECKPOINT=str(carried), **sizes)
    start = load_file(carried / "adapter_decoder_adapter.safetensors")
    kept = load_file(out / "e2e" / "checkpoint" / "adapter_decoder_adapter.safetensors")
    assert all(torch.equal(kept[name], start[name].float()) for name in start)  # e2e started from it, generator frozen
    assert (out / "cr16-fp16" / "clara_config.json").exists() and (out / "eval" / "nq_oracle_clara.json").exists()


def test_an_unknown_part_is_refused_before_anything_is_written(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(tmp_path / "run"), "PARTS": "rows sp"},
                         capture_output=True, text=True)
    assert run.returncode == 2 and "PARTS: unknown part sp" in run.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("batch, accum, values", [("SCP_BATCH", "SCP_ACCUM", ("6", "4")),
                                                   ("SCP_BATCH", "SCP_ACCUM", ("6", "0")),
                                                   ("SCP_BATCH", "SCP_ACCUM", ("16", "2.5")),
                                                   ("SCP_MORE_BATCH", "SCP_MORE_ACCUM", ("32", "3")),
                                                   ("RETRIEVAL_BATCH", "RETRIEVAL_ACCUM", ("6", "4"))])
def test_a_step_that_does_not_split_into_equal_micro_batches_is_refused_before_anything_is_written(
        tmp_path, batch, accum, values):
    out = tmp_path / "run"
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "OUT": str(out), batch: values[0], accum: values[1]},
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert f"{batch} ({values[0]}) must split into {accum} ({values[1]}) equal micro-batches" in run.stderr
    assert not out.exists()


def test_limit_caps_each_conversion_and_never_raises_its_own_limit():
    # LIMIT=500 was appended after --skip 200 --limit 469 and won: dev 669-684, the probe questions, were trained on
    source = SCRIPT.read_text()
    start = source.index("convert() {")
    function = source[start:source.index("\n}\n", start) + 3]
    script = (f'clara() {{ echo "$@"; }}\n{function}'
              "LIMIT=500; convert a b --skip 200 --limit 469; convert a b\n"
              "LIMIT=5; convert a b --limit 16\nLIMIT=; convert a b --limit 16; convert a b\n")
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert run.stdout.splitlines() == ["convert-data a b --skip 200 --limit 469", "convert-data a b --limit 500",
                                       "convert-data a b --limit 5", "convert-data a b --limit 16", "convert-data a b"]
