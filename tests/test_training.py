"""The three training stages and both retriever estimators on the tiny model."""

import dataclasses
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from clara_benchmarks.text_reader import read_text
from clara_plugins import CheckpointError, ClaraModel, InvalidInputError, MemoryStore, TrainConfig, atomic, passes, training
from clara_plugins.checkpoint import adapters_sha256
from clara_plugins.model import copy_adapter
from clara_plugins.passes import completion_log_likelihood, set_trainable
from clara_plugins.prompts import question_prompt, scp_prompt
from clara_plugins.retrieval import cosine_scores
from clara_plugins.training import CandidateMemories, e2e_loss, retrieval_loss, train
from conftest import CORPUS, randomize_adapters

INSTRUCT = [{"question": "Who won prizes?", "docs": CORPUS[:2], "answer": "Marie Curie"},
            {"question": "Where is the tower?", "docs": CORPUS[1:3], "answer": "Paris"}]
SCP = [{"data_type": "qa", "question": ["What flows through Vienna?"], "answers": ["The Danube"],
        "docs": [CORPUS[3]]},
       {"data_type": "paraphrase", "answers": ["Curie won two Nobel Prizes."], "docs": [CORPUS[4]]},
       {"data_type": "reconstruct", "answers": [CORPUS[0]], "docs": [CORPUS[0]]}]
E2E = [{"question": "Who won Nobel prizes?", "docs": CORPUS, "answer": "Marie Curie", "pos_index": [4]},
       {"question": "What is the capital of Germany?", "docs": CORPUS, "answers": ["Berlin"], "pos_index": [2]}]


def lora(model: ClaraModel, adapter: str) -> dict[str, torch.Tensor]:
    weights = {n: p.detach().clone() for n, p in model.lm.named_parameters() if f".{adapter}." in n}
    assert weights, f"no parameters of adapter {adapter!r}"  # or every all(...) over them would pass
    return weights


def test_completion_log_likelihood_matches_a_manual_count(tiny_model):
    memories = tiny_model.compress_documents(CORPUS[:2]).unsqueeze(0)
    tok, slot = tiny_model.tokenizer, tiny_model.document_placeholder
    prompt = question_prompt(tok, "Who?", 2, slot)
    full = question_prompt(tok, "Who?", 2, slot, "Marie Curie")
    with torch.no_grad():
        ll, count = completion_log_likelihood(tiny_model, [prompt], [full], memories)
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        slots = torch.isin(ids, torch.tensor(tiny_model.mem_token_ids)).unsqueeze(-1)
        embeds = tiny_model.lm.get_input_embeddings()(ids).masked_scatter(slots, memories.reshape(-1, 32))
        tiny_model.lm.set_adapter("decoder_adapter")
        logprobs = torch.log_softmax(tiny_model.lm(inputs_embeds=embeds).logits[0], -1)
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    manual = sum(logprobs[t - 1, ids[0, t]] for t in range(start, ids.size(1)))
    assert int(count) == ids.size(1) - start
    assert torch.allclose(ll[0], manual, atol=1e-4)
    with torch.no_grad():  # a padded batch gives the same numbers
        short = question_prompt(tok, "Q?", 2, slot)
        batched, _ = completion_log_likelihood(tiny_model,
            [prompt, short], [full, question_prompt(tok, "Q?", 2, slot, "A much longer answer here")],
            memories.expand(2, -1, -1, -1))
    assert torch.allclose(batched[0], ll[0], atol=1e-4)


@pytest.mark.parametrize("stage,rows", [("scp", SCP), ("instruct", INSTRUCT)])
def test_compressor_stages_learn(tiny_model, tmp_path, stage, rows):
    config = TrainConfig(stage=stage, steps=25, batch_size=2, grad_accum=1, lr=3e-2, save_every=100)
    encoder_before = lora(tiny_model, "encoder_adapter")
    train(tiny_model, rows, config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 25 and {"loss", "ce", "mse", "memory_cosine", "lr", "grad_norm"} <= log[0].keys()
    # the tiny base's frozen random lm_head bounds its logits near 0 (CE ~ ln 307 = 5.7):
    # a drop of 0.05 nats is far outside step-to-step noise on these fixed rows
    assert log[-1]["ce"] < log[0]["ce"] - 0.05
    assert any(not torch.equal(v, lora(tiny_model, "encoder_adapter")[k]) for k, v in encoder_before.items())
    assert (tmp_path / "checkpoint" / "clara_config.json").exists()


def test_a_frozen_adapter_reads_without_dropout_in_training_mode(tiny_model):
    # the e2e stage's frozen generator read through fresh dropout masks each pass: the query
    # reasoner learned from a generator other than the one that answers
    prompt, full = ["Where does the Danube rise?"], ["Where does the Danube rise? In the Black Forest."]
    for trained, alike in ((["query_reasoner_adapter"], True), (["decoder_adapter"], False)):
        tiny_model.train()
        set_trainable(tiny_model, trained)
        first, again = (completion_log_likelihood(tiny_model, prompt, full)[0] for _ in range(2))
        assert torch.equal(first, again) == alike


def test_rescaled_memories_are_not_pulled_into_one_vector():
    # each memory vector at the embedding norm (memory_scale): their mean is shorter than the
    # target, which has that norm too, so the MSE was zero only for n copies of one vector
    target = torch.tensor([[3.0, 0.0]])
    apart = torch.tensor([[[3.0, 3.0], [3.0, -3.0]]]) / 2 ** 0.5  # both of norm 3, their mean along the target
    assert training.memory_mse(apart, target, rescaled=True).item() == pytest.approx(0.0, abs=1e-10)
    assert training.memory_mse(apart, target, rescaled=False).item() > 0.1  # unscaled memories: compared as they are
    one = torch.tensor([[[3.0, 0.0], [3.0, 0.0]]])
    assert training.memory_mse(one, target, rescaled=True).item() == pytest.approx(0.0, abs=1e-10)


def test_memory_cosine_pairs_different_documents_only(tiny_model):
    # an SCP row and its paraphrase row encode one document twice: that pair's cosine of about 1 was counted
    from clara_plugins.passes import encode_with_gradients

    tiny_model.eval()  # no dropout: one document's two encodings are one
    paraphrase = {"data_type": "paraphrase", "answers": ["Vienna lies on the Danube."], "docs": SCP[0]["docs"]}
    _, metrics = training.scp_loss(tiny_model, [SCP[0], paraphrase, SCP[1]], TrainConfig(stage="scp"))
    distinct = encode_with_gradients(tiny_model, [SCP[0]["docs"][0], SCP[1]["docs"][0]])[0]
    assert metrics["memory_cosine"] == pytest.approx(training.memory_cosine(distinct), abs=1e-5)


def test_memory_cosine_hand_worked():
    same = torch.ones(3, 2, 4)
    assert training.memory_cosine(same) == pytest.approx(1.0)
    # two documents of one vector each: (1, 0) and (1, 1) -> cos 45 degrees
    assert training.memory_cosine(torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])) == pytest.approx(0.5 ** 0.5)
    opposite = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[-1.0, -2.0], [0.0, -1.0]]])
    assert training.memory_cosine(opposite) == pytest.approx(-1.0)


def test_an_unknown_scp_kind_is_named():
    with pytest.raises(ValueError, match="'summary'.*'reconstruct'"):
        scp_prompt(None, "<slot>", "summary")


def test_reading_margin_pays_for_reading_and_probes_are_logged(tiny_model, tmp_path):
    rows = [{"data_type": "reconstruct", "answers": [d], "docs": [d]} for d in CORPUS[:4]]
    config = TrainConfig(stage="scp", steps=12, batch_size=4, grad_accum=1, lr=3e-2, margin_weight=1.0,
                         margin=2.0, probe_every=6)
    train(tiny_model, rows, config, tmp_path, probes={"held_out": rows})
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps, probes = [r for r in log if "probe" not in r], [r for r in log if "probe" in r]
    assert [p["step"] for p in probes] == [0, 6, 12] and {p["probe"] for p in probes} == {"held_out"}
    assert {"target_ce_neutral_documents", "reading_gain"} <= probes[0].keys()
    # the loss holds the margin term: CE + relu(2 - gain) + mse_weight * MSE
    first = steps[0]
    assert first["loss"] == pytest.approx(first["ce"] + max(0.0, 2.0 - first["reading_gain"]) + 0.1 * first["mse"],
                                          abs=1e-3)


def test_the_reading_margin_pairs_a_row_with_another_rows_documents(tiny_model, monkeypatch):
    # a QA row and its paraphrase share their document: rolled by one, each read its own
    # memories as "another's", a gain of 0 that pushed the other pairs harder
    rows = [{"data_type": "qa", "question": ["Where is the tower?"], "answers": ["Paris"], "docs": [CORPUS[1]]},
            {"data_type": "paraphrase", "answers": ["The tower stands in Paris."], "docs": [CORPUS[1]]},
            {"data_type": "reconstruct", "answers": [CORPUS[4]], "docs": [CORPUS[4]]}]
    read = []
    decoder_loss = training._decoder_loss
    monkeypatch.setattr(training, "_decoder_loss", lambda model, prompts, full, memories:
                        read.append(memories) or decoder_loss(model, prompts, full, memories))
    memories = tiny_model.compress_documents([row["docs"][0] for row in rows])
    config = TrainConfig(stage="scp", margin_weight=1.0, batch_size=3)
    monkeypatch.setattr(training, "encode_with_gradients",
                        lambda model, texts: (memories[:len(texts)], memories[:len(texts)].mean(1)))
    partners = training.other_rows(rows, 1)
    assert partners == [2, 2, 0]  # the paraphrase's next row with another document is the third
    _, metrics = training.scp_loss(tiny_model, rows, config)
    assert len(read) == 1 and torch.equal(read[0], memories[[2, 2, 0]].unsqueeze(1)) and "reading_gain" in metrics
    same = [rows[0], rows[1]]  # nothing to compare with: no margin term, and no pass for it
    read.clear()
    _, metrics = training.scp_loss(tiny_model, same, dataclasses.replace(config, batch_size=2))
    assert read == [] and "reading_gain" not in metrics


def test_the_null_document_is_a_real_option_of_the_realm_prior():
    # a fixed logit of 0 against candidates' cosine / 0.02 (about 40) gave it a prior of e^-40
    logits = torch.tensor([[42.5, 41.5, 40.0, 39.0, 37.5]])
    prior = training._realm_prior(logits, null_document=True)
    assert prior.shape == (1, 6) and prior[0, -1].exp() > 0.05
    assert torch.allclose(training._realm_prior(logits, null_document=False), torch.log_softmax(logits, dim=1))


def test_a_run_stopped_while_it_probes_keeps_the_step_it_saved(tiny_model, tmp_path, monkeypatch):
    """A time box that stops a run during a probe must not lose the steps since the last save."""
    real = training._probe

    def stopped_at_step_2(model, probes, k, step, log):
        if step == 2:
            raise KeyboardInterrupt
        real(model, probes, k, step, log)

    monkeypatch.setattr(training, "_probe", stopped_at_step_2)
    rows = [{"data_type": "reconstruct", "answers": [d], "docs": [d]} for d in CORPUS[:4]]
    config = TrainConfig(stage="scp", steps=4, batch_size=2, grad_accum=1, probe_every=2, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, rows, config, tmp_path, probes={"held_out": rows, "second": rows})
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "checkpoint" / "clara_config.json").exists()

    # resumed, it probes the step it stopped in (lost for good: the run went on from step 3),
    # and stopped in its last step's probe, once more (a finished run never probed it)
    def stopped_in_the_second_probe_of_step_4(model, probes, k, step, log):
        real(model, {name: rows for name, rows in probes.items() if step < 4 or name == "held_out"}, k, step, log)
        if step == 4 and "second" in probes:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_probe", stopped_in_the_second_probe_of_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, rows, config, tmp_path, probes={"held_out": rows, "second": rows})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="holds a finished run"):
        train(tiny_model, rows, config, tmp_path, probes={"held_out": rows, "second": rows})
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(record["step"], record.get("probe")) for record in log] == [
        (0, "held_out"), (0, "second"), (1, None), (2, None), (2, "held_out"), (2, "second"), (3, None), (4, None),
        (4, "held_out"), (4, "second")]
    # a copy of the run whose log is a link (cp -rs) probes into a log of its own
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "copy" / "checkpoint")
    (tmp_path / "elsewhere.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log[:-1]))
    (tmp_path / "copy" / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.warns(UserWarning, match="holds a finished run"):
        train(tiny_model, rows, config, tmp_path / "copy", probes={"held_out": rows, "second": rows})
    assert len((tmp_path / "elsewhere.jsonl").read_text().splitlines()) == len(log) - 1
    assert [json.loads(line) for line in (tmp_path / "copy" / "log.jsonl").read_text().splitlines()][-1] == log[-1]


def test_a_save_follows_the_log_lines_it_covers_on_disk(tiny_model, tmp_path, monkeypatch):
    # the log was flushed, never synced: after a power loss a checkpoint could outlive the last
    # lines of the steps it holds, and the resumed log lacked them
    events = []
    real_fsync, real_save = os.fsync, training.save_checkpoint
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
                        or real_fsync(fd))
    monkeypatch.setattr(training, "save_checkpoint", lambda *a, **k: events.append("save") or real_save(*a, **k))
    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1, save_every=1)
    train(tiny_model, INSTRUCT, config, tmp_path)
    saves = [number for number, event in enumerate(events) if event == "save"]
    assert len(saves) == 2 and all(events[number - 1] == "log.jsonl" for number in saves)


def test_instruct_stage_can_keep_the_previous_generator(tiny_model, tmp_path):
    before = lora(tiny_model, "decoder_adapter")
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1, lr=0.0, keep_generator=True)
    train(tiny_model, INSTRUCT, config, tmp_path)
    assert all(torch.equal(v, lora(tiny_model, "decoder_adapter")[k]) for k, v in before.items())


def test_instruct_stage_starts_from_a_fresh_decoder(tiny_model, tmp_path):
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1, lr=0.0)
    train(tiny_model, INSTRUCT, config, tmp_path)
    assert all(v.abs().sum() == 0 for k, v in lora(tiny_model, "decoder_adapter").items() if "lora_B" in k)


def test_instruct_with_a_frozen_compressor_trains_only_the_decoder(tiny_model, tmp_path):
    encoder, embeddings = lora(tiny_model, "encoder_adapter"), tiny_model.lm.get_input_embeddings().weight.detach().clone()
    memories_before = tiny_model.compress_documents(CORPUS[:3])
    config = TrainConfig(stage="instruct", steps=25, batch_size=2, grad_accum=1, lr=3e-2, freeze_compressor=True)
    train(tiny_model, INSTRUCT, config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "mse" not in log[0] and log[-1]["ce"] < log[0]["ce"] - 0.05
    assert all(torch.equal(v, lora(tiny_model, "encoder_adapter")[k]) for k, v in encoder.items())
    assert torch.equal(embeddings, tiny_model.lm.get_input_embeddings().weight)
    assert torch.equal(memories_before, tiny_model.compress_documents(CORPUS[:3]))
    assert any(v.abs().sum() > 0 for k, v in lora(tiny_model, "decoder_adapter").items() if "lora_B" in k)


def test_the_restatement_margin_makes_the_questions_own_name_a_costly_answer(tiny_config, tiny_model, tmp_path):
    rows = [{"question": "Where does the Danube rise?", "docs": CORPUS[2:4], "answer": "the Black Forest"},
            {"question": "Who won prizes?", "docs": CORPUS[3:5], "answer": "Marie Curie"}]  # names nothing
    danube, restated = rows[:1], [{**rows[0], "answer": "Danube"}]

    def gap_after(weight: float, model: ClaraModel) -> float:
        config = TrainConfig(stage="instruct", steps=25, batch_size=2, grad_accum=1, lr=3e-2, freeze_compressor=True,
                             keep_generator=True, restate_weight=weight,
                             restate_margin=5.0 if weight else TrainConfig.restate_margin)  # read with a weight only
        train(model, rows, config, tmp_path / str(weight))
        memories = model.compress_documents(rows[0]["docs"]).unsqueeze(0)
        with torch.no_grad():
            return float(training._mean_log_likelihood(model, danube, memories)
                         - training._mean_log_likelihood(model, restated, memories))

    twin = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(twin)  # the same weights as tiny_model
    plain = gap_after(0.0, twin)
    assert gap_after(1.0, tiny_model) > plain + 0.25
    log = [json.loads(line) for line in (tmp_path / "1.0" / "log.jsonl").read_text().splitlines()]
    # one named row of two: the term is relu(5 - gap) / 2 while the gap is below the margin
    assert log[0]["loss"] == pytest.approx(log[0]["ce"] + (5.0 - log[0]["restate_gap"]) / 2, abs=1e-4)


def test_the_restatement_term_reuses_the_answers_pass_and_reads_the_name_once(tiny_model, monkeypatch):
    rows = [{"question": "Where does the Danube rise?", "docs": CORPUS[2:4], "answer": "the Black Forest"},
            {"question": "Who won prizes?", "docs": CORPUS[3:5], "answer": "Marie Curie"}]
    config = TrainConfig(stage="instruct", batch_size=2, freeze_compressor=True, keep_generator=True,
                         restate_weight=1.0, restate_margin=5.0, margin_weight=0.0)
    frozen = CandidateMemories(tiny_model)
    completions = []
    counted = passes.completion_log_probs
    for module in (training, passes):  # the reading loss calls it directly, the name's pass through passes
        monkeypatch.setattr(module, "completion_log_probs", lambda *a, **k: completions.append(a[2]) or counted(*a, **k))
    set_trainable(tiny_model, ["decoder_adapter"])
    tiny_model.eval()  # no dropout: the same loss is computed again below from the same weights
    loss, metrics = training.instruct_loss(tiny_model, rows, config, frozen)
    assert len(completions) == 2 and len(completions[1]) == 1 and "Danube" in completions[1][0]
    decoder = [p for n, p in tiny_model.lm.named_parameters() if ".decoder_adapter." in n]
    grads = torch.autograd.grad(loss, decoder)

    # the same loss with the answer read again in a pass of its own: the gradient must agree
    memories = frozen.for_rows(rows, config)[0]
    prompts = [question_prompt(tiny_model.tokenizer, r["question"], 2, tiny_model.document_placeholder) for r in rows]
    full = [question_prompt(tiny_model.tokenizer, r["question"], 2, tiny_model.document_placeholder, r["answer"])
            for r in rows]
    ce = training._decoder_loss(tiny_model, prompts, full, memories)
    gap = (training._mean_log_likelihood(tiny_model, rows[:1], memories[:1])
           - training._mean_log_likelihood(tiny_model, [{**rows[0], "answer": "Danube"}], memories[:1]))
    reference = ce + torch.relu(5.0 - gap).sum() / 2
    assert metrics["restate_gap"] == pytest.approx(float(gap), abs=1e-4)
    for grad, expected in zip(grads, torch.autograd.grad(reference, decoder), strict=True):
        assert torch.allclose(grad, expected, atol=1e-5)


@pytest.mark.parametrize("knobs, problem", [
    ({"stage": "scp", "freeze_compressor": True}, "freeze_compressor contradicts the scp stage"),
    ({"stage": "e2e", "keep_generator": True}, "keep_generator needs the instruct stage"),
    ({"stage": "e2e", "null_document": True}, "null_document needs the realm estimator"),
    ({"stage": "instruct", "teacher": "runs/text"}, "a teacher is read only with distill_weight"),
    ({"stage": "scp", "grad_clip": 0.0}, "grad_clip must be above 0"),
    ({"stage": "scp", "weight_decay": -0.1}, "weight_decay must be a finite number of at least 0"),
    ({"stage": "scp", "adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
    ({"stage": "instruct", "retrieval_weight": 1.0}, "read by the e2e stage alone, got the instruct stage"),
    ({"stage": "scp", "estimator": "realm"}, "read by the e2e stage alone, got the scp stage"),
    ({"stage": "instruct", "margin": 1.5}, r"margin \(--margin\): not read by the instruct stage"),
    ({"stage": "instruct", "restate_margin": 2.0}, r"restate_margin \(--restate-margin\): not read"),
    ({"stage": "scp", "temperature": 0.1}, r"temperature \(--temperature\): not read by the scp stage"),
    ({"stage": "e2e", "gold_term": "each"}, r"^gold_term \(--gold-term\): not read"),  # the message's guide names
    ({"stage": "text", "mse_weight": 0.5}, r"^mse_weight \(--mse-weight\): not read"),  # every knob: anchored
    ({"stage": "instruct", "freeze_compressor": True, "mse_weight": 0.5}, r"^mse_weight \(--mse-weight\): not read"),
])
def test_a_knob_its_stage_would_ignore_is_refused(knobs, problem):
    # each was silently ignored (or, for grad_clip 0, scaled every gradient to nothing)
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**knobs)


def test_weight_decay_leaves_the_vocabulary_outside_the_memory_rows(tiny_model, tmp_path):
    # AdamW decayed every row of the embedding (and the tied output), though only the <MEM>
    # rows train and are saved: the model in memory was not the one that reloads
    before = tiny_model.lm.get_input_embeddings().weight.detach().clone()
    train(tiny_model, SCP, TrainConfig(stage="scp", steps=2, batch_size=2, grad_accum=1, lr=1e-2,
                                       weight_decay=0.5), tmp_path)
    changed = (tiny_model.lm.get_input_embeddings().weight - before).abs().sum(-1).nonzero().flatten()
    assert set(changed.tolist()) <= set(tiny_model.mem_token_ids)


def test_the_optimizer_runs_with_the_configured_moment_decays(tiny_model, tmp_path):
    # fixed at (0.9, 0.95) in the trainer, beside a config said to hold every knob
    train(tiny_model, SCP, TrainConfig(stage="scp", steps=1, batch_size=1, grad_accum=1, adam_beta1=0.8,
                                       adam_beta2=0.99), tmp_path)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)


def test_each_step_logs_the_learning_rate_it_ran_at(tiny_model, tmp_path):
    # the log gave the next step's: the first warm-up step's twice over, and 0 for the last step
    train(tiny_model, SCP, TrainConfig(stage="scp", steps=4, batch_size=1, grad_accum=1, lr=1e-3,
                                       warmup_ratio=0.5), tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["lr"] for entry in log] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_a_metric_is_averaged_over_the_micro_batches_that_measured_it(tiny_config, tmp_path):
    # a micro-batch without a gold candidate counted as recall and retrieval loss 0: halved here
    def first_step(rows: list[dict], grad_accum: int) -> dict:
        torch.manual_seed(0)
        model = ClaraModel(dataclasses.replace(tiny_config, lora_dropout=0.0), device="cpu")
        randomize_adapters(model)
        folder = tmp_path / str(grad_accum)
        train(model, rows, TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=grad_accum, top_k=2,
                                       retrieval_weight=1.0, schedule="constant"), folder)
        return json.loads((folder / "log.jsonl").read_text().splitlines()[0])

    with_one_gold, alone = first_step([{**E2E[0], "pos_index": []}, E2E[1]], 2), first_step([E2E[1]], 1)
    assert with_one_gold["recall@2"] == alone["recall@2"]
    assert with_one_gold["retrieval"] == pytest.approx(alone["retrieval"], rel=1e-4) and alone["retrieval"] > 0


def test_a_trained_model_names_the_checkpoint_it_now_holds(tiny_model, tmp_path):
    # it kept the folder it was loaded from, and so did its chat model's cache key
    tiny_model.save_pretrained(tmp_path / "init")
    model = ClaraModel.from_pretrained(tmp_path / "init", device="cpu")
    loaded = model.weights_sha256
    checkpoint = train(model, SCP, TrainConfig(stage="scp", steps=1, batch_size=1, grad_accum=1, lr=1e-2), tmp_path / "run")
    assert model.name_or_path == str(checkpoint) and model.weights_sha256 not in (None, loaded)
    reloaded = ClaraModel.from_pretrained(checkpoint, device="cpu")
    assert reloaded.weights_sha256 == model.weights_sha256
    # and it encodes questions as its checkpoint does once loaded
    assert torch.allclose(model.encode_queries(["Who won?"]), reloaded.encode_queries(["Who won?"]), atol=1e-5)


def test_the_restatement_margin_needs_the_instruct_stage():
    with pytest.raises(ValueError, match="restate_weight needs the instruct stage"):
        TrainConfig(stage="scp", restate_weight=1.0)


@pytest.mark.parametrize("stage, rows", [("instruct", INSTRUCT), ("scp", SCP)])
def test_a_frozen_generator_trains_only_the_compressor(tiny_model, tmp_path, stage, rows):
    decoder, embeddings = lora(tiny_model, "decoder_adapter"), tiny_model.lm.get_input_embeddings().weight.detach().clone()
    memories_before = tiny_model.compress_documents(CORPUS[:3])
    config = TrainConfig(stage=stage, steps=2, batch_size=2, grad_accum=1, lr=1e-2,
                         keep_generator=stage == "instruct", freeze_generator=True)
    train(tiny_model, rows, config, tmp_path)
    assert all(torch.equal(v, lora(tiny_model, "decoder_adapter")[k]) for k, v in decoder.items())
    assert torch.equal(embeddings, tiny_model.lm.get_input_embeddings().weight)
    assert not torch.equal(memories_before, tiny_model.compress_documents(CORPUS[:3]))
    for conflicting in ({"keep_generator": False}, {"freeze_compressor": True}):
        with pytest.raises(ValueError, match="freeze_generator needs"):
            TrainConfig(stage="instruct", freeze_generator=True, **{"keep_generator": True, **conflicting})


def test_text_stage_fine_tunes_the_decoder_that_reads_text(tiny_model, tmp_path):
    question, documents = INSTRUCT[0]["question"], [INSTRUCT[0]["docs"]]
    plain = read_text(tiny_model, [question], documents, max_new_tokens=6)
    config = TrainConfig(stage="text", steps=25, batch_size=2, grad_accum=1, lr=3e-2)
    checkpoint = train(tiny_model, INSTRUCT, config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["ce"] < log[0]["ce"] - 0.05
    reloaded = ClaraModel.from_pretrained(checkpoint, device="cpu")
    assert reloaded.config.decoder_reads_text
    tuned = read_text(reloaded, [question], documents, max_new_tokens=6)
    assert tuned == read_text(tiny_model, [question], documents, max_new_tokens=6)
    assert tuned != plain  # the fine-tuned decoder, not the plain base model, reads the text


@pytest.mark.parametrize("stage", ["retrieval", "instruct"])
def test_a_text_reader_is_refused_by_a_stage_that_reads_memories(tiny_model, tmp_path, stage):
    # its decoder kept (retrieval), the checkpoint saved unmarked and passed clara ask's refusal
    tiny_model.config.decoder_reads_text = True
    rows = E2E if stage == "retrieval" else INSTRUCT
    with pytest.raises(ValueError, match=f"is a text reader \\(clara train --stage text\\): the {stage} stage reads"):
        train(tiny_model, rows, TrainConfig(stage=stage, steps=1, batch_size=1, grad_accum=1), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    train(tiny_model, INSTRUCT, TrainConfig(stage="text", steps=1, batch_size=1, grad_accum=1), tmp_path / "text")


def test_distillation_pulls_the_generator_towards_the_teacher_reading_text(tiny_config, tiny_model, tmp_path):
    text = TrainConfig(stage="text", steps=25, batch_size=2, grad_accum=1, lr=3e-2)
    teacher = train(ClaraModel(tiny_config, device="cpu"), INSTRUCT, text, tmp_path / "teacher")
    config = TrainConfig(stage="instruct", steps=25, batch_size=2, grad_accum=1, lr=3e-2, freeze_compressor=True,
                         keep_generator=True, distill_weight=1.0, teacher=str(teacher))
    train(tiny_model, INSTRUCT, config, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(log[0]["ce"] + log[0]["distill"], abs=1e-4)
    assert log[-1]["distill"] < 0.7 * log[0]["distill"]


@pytest.mark.parametrize("stage", ["instruct", "retrieval"])
def test_a_probe_set_of_end_to_end_pools_is_refused_before_the_first_step(tiny_model, tmp_path, stage):
    # the reading gain read the first 5 of each shuffled 20-candidate pool: random candidates
    # (and the retrieval stage, whose own rows are such pools, read them whole)
    pool = [{"question": "Who?", "docs": CORPUS, "answer": "Marie Curie", "pos_index": [4]}] * 2
    config = TrainConfig(stage=stage, steps=1, batch_size=1, grad_accum=1, probe_every=1)
    rows = INSTRUCT if stage == "instruct" else E2E
    with pytest.raises(ValueError, match="probe pools: row 0 has 6 documents, more than k=5"):
        train(tiny_model, rows, config, tmp_path, probes={"pools": pool})
    assert not (tmp_path / "checkpoint").exists()


def test_probes_read_as_many_documents_as_the_instruction_rows(tiny_model, tmp_path):
    # a probe of the training rows' own shape (six documents) was refused at k=5 while they trained
    rows = [{"question": f"Question {i}?", "docs": [f"{doc} ({i})" for doc in CORPUS], "answer": "Paris"}
            for i in range(2)]
    config = TrainConfig(stage="instruct", steps=1, batch_size=2, grad_accum=1, probe_every=1)
    train(tiny_model, rows, config, tmp_path, probes={"same_shape": rows})
    probes = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "probe" in line]
    assert [p["step"] for p in probes] == [0, 1]


def test_a_run_saved_with_one_optimizer_group_resumes_with_weight_decay(tiny_model, tmp_path, monkeypatch):
    # runs saved before the embedding had a group of its own failed in torch's load_state_dict
    config = TrainConfig(stage="scp", steps=2, batch_size=2, grad_accum=1, lr=1e-2, weight_decay=0.1, save_every=1)
    real_loss, calls = training.scp_loss, []

    def crash_in_step_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_parameter_groups", lambda model, parameters: [{"params": parameters}])
        patch.setattr(training, "scp_loss", crash_in_step_two)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_model, SCP, config, tmp_path)
    train(tiny_model, SCP, config, tmp_path)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_loading_the_teacher_leaves_the_random_state_of_the_run(tiny_model, tmp_path):
    # a resumed distillation run restores its RNG, then loads the teacher: drawing the teacher's
    # initial weights from it gave the resumed steps other dropout masks than the whole run's
    tiny_model.save_pretrained(tmp_path / "teacher")
    before = torch.get_rng_state()
    training._load_teacher(tiny_model, str(tmp_path / "teacher"), "")
    assert torch.equal(torch.get_rng_state(), before)


def test_the_distillation_term_is_the_kl_from_the_teacher():
    labels = torch.tensor([[-100, 3, 1], [2, 0, 4]])
    teacher, student = torch.randn(2, 3, 5).log_softmax(-1), torch.randn(2, 3, 5).log_softmax(-1)
    valid = labels != -100
    expected = torch.nn.functional.kl_div(student[valid], teacher[valid], log_target=True, reduction="batchmean")
    assert training._distillation_loss(teacher, labels, student, labels) == pytest.approx(float(expected), abs=1e-5)
    assert training._distillation_loss(teacher, labels, teacher, labels) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="tokenizes the answers differently"):
        training._distillation_loss(teacher, labels.flip(0), student, labels)


def test_a_teacher_with_another_vocabulary_or_stage_is_refused(tiny_config, tiny_model, tmp_path):
    base = tmp_path / "base"  # the tiny backbone with one more token in its vocabulary
    shutil.copytree(tiny_config.base_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(base)
    ClaraModel(dataclasses.replace(tiny_config, base_model=str(base)), device="cpu").save_pretrained(tmp_path / "t")
    config = TrainConfig(stage="instruct", steps=1, batch_size=2, grad_accum=1, distill_weight=1.0,
                         teacher=str(tmp_path / "t"))
    randomize_adapters(tiny_model, seed=3)
    adapters = adapters_sha256(tiny_model)
    with pytest.raises(ValueError, match="another vocabulary"):
        train(tiny_model, INSTRUCT, config, tmp_path / "run")
    # refused before the stage set a fresh generator adapter in the caller's model
    assert adapters_sha256(tiny_model) == adapters and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="distill_weight needs the instruct stage"):
        TrainConfig(stage="scp", distill_weight=1.0, teacher=str(tmp_path / "t"))


def test_a_teacher_whose_base_model_moved_takes_one_of_its_own(tiny_config, tiny_model, tmp_path, monkeypatch):
    # the student's --base-model did not reach the teacher: a teacher trained on another machine
    # could not be read, and the error's advice named an option the teacher never read
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # not half a minute of retries
    shutil.copytree(tiny_config.base_model, tmp_path / "base")
    ClaraModel(dataclasses.replace(tiny_config, base_model=str(tmp_path / "base")),
               device="cpu").save_pretrained(tmp_path / "t")
    (tmp_path / "base").rename(tmp_path / "moved")
    config = TrainConfig(stage="instruct", steps=1, batch_size=2, grad_accum=1, distill_weight=1.0,
                         teacher=str(tmp_path / "t"))
    with pytest.raises(OSError, match="records it as its base model: .*a distillation teacher's: --teacher-base-model"):
        train(tiny_model, INSTRUCT, config, tmp_path / "run")
    train(tiny_model, INSTRUCT, dataclasses.replace(config, teacher_base_model=str(tmp_path / "moved")),
          tmp_path / "run")
    assert "distill" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    with pytest.raises(ValueError, match="teacher_base_model is read only with a teacher"):
        TrainConfig(stage="instruct", teacher_base_model=str(tmp_path / "moved"))


@pytest.mark.parametrize("design", ["pooled", "tokens"])
def test_a_teacher_trained_at_another_rate_teaches_when_pooled(tiny_config, tiny_model, tmp_path, design):
    """The teacher reads text: a pooled one is read at the student's rate, so that both have
    the same <MEM> tokens; an appended-token one cannot change its rate and is refused."""
    teacher = dataclasses.replace(tiny_config, compression_rate=32, memory_design=design,
                                  retrieval_key="mean" if design == "pooled" else "flat")
    ClaraModel(teacher, device="cpu").save_pretrained(tmp_path / "t")
    config = TrainConfig(stage="instruct", steps=1, batch_size=2, grad_accum=1, distill_weight=1.0,
                         teacher=str(tmp_path / "t"))
    if design == "tokens":
        with pytest.raises(CheckpointError, match="only at its own compression rate 32, not 16"):
            train(tiny_model, INSTRUCT, config, tmp_path / "run")
    else:
        train(tiny_model, INSTRUCT, config, tmp_path / "run")
        assert "distill" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("estimator,null", [("straight-through", False), ("realm", False), ("realm", True)])
def test_e2e_trains_reasoner_and_generator_with_a_frozen_compressor(tiny_model, tmp_path, estimator, null):
    encoder = lora(tiny_model, "encoder_adapter")
    rows_before = tiny_model.lm.get_input_embeddings().weight.detach().clone()
    config = TrainConfig(stage="e2e", steps=3, batch_size=2, grad_accum=1, lr=1e-3, top_k=2,
                         estimator=estimator, null_document=null, schedule="constant")
    train(tiny_model, E2E, config, tmp_path)
    after = lora(tiny_model, "query_reasoner_adapter")
    assert all(torch.equal(v, lora(tiny_model, "encoder_adapter")[k]) for k, v in encoder.items())
    assert any(not torch.equal(after[k.replace("encoder_adapter", "query_reasoner_adapter")], v)
               for k, v in encoder.items())  # started as a copy of the encoder, then moved
    changed = (tiny_model.lm.get_input_embeddings().weight - rows_before).abs().sum(-1).nonzero().flatten()
    assert set(changed.tolist()) <= set(tiny_model.mem_token_ids)
    assert "recall@2" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])


def test_e2e_keeps_the_compressors_signature_and_the_stores_it_filled_in_the_pooled_design(tiny_config, tmp_path):
    # its <MEM> rows, which pooled memories never read, moved through the tied output head (the
    # default backbone's): the e2e checkpoint refused the stores its own frozen compressor had filled
    from conftest import build_tiny_base_model

    tied = build_tiny_base_model(tmp_path / "base", tie=True)
    tiny_model = ClaraModel(dataclasses.replace(tiny_config, base_model=str(tied)), device="cpu")
    randomize_adapters(tiny_model)
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2])
    store.save(tmp_path / "store")
    config = TrainConfig(stage="e2e", steps=2, batch_size=2, grad_accum=1, lr=1e-2, top_k=2, schedule="constant")
    train(tiny_model, E2E, config, tmp_path / "run")
    assert tiny_model.config.memory_design == "pooled"
    assert len(MemoryStore.load(tmp_path / "store", tiny_model)) == 2


def test_a_pooled_e2e_run_an_earlier_version_saved_resumes_as_it_began(tiny_config, tmp_path, monkeypatch):
    # that version trained the <MEM> rows here: its optimizer held them, and the resume failed on
    # "loaded state dict has a different number of parameter groups"
    from conftest import build_tiny_base_model

    tied = build_tiny_base_model(tmp_path / "base", tie=True)
    model = ClaraModel(dataclasses.replace(tiny_config, base_model=str(tied)), device="cpu")
    config = TrainConfig(stage="e2e", steps=2, batch_size=2, grad_accum=1, lr=1e-2, top_k=2, schedule="constant",
                         save_every=1)
    real_set, real_save = training.set_trainable, torch.save

    def crash_saving_step_two(state, *args, **kwargs):
        if isinstance(state, dict) and state.get("step") == 2:
            raise KeyboardInterrupt
        return real_save(state, *args, **kwargs)

    with monkeypatch.context() as earlier:  # the earlier version's rule, and a kill at the second save
        earlier.setattr(training, "set_trainable", lambda m, adapters, memory_embeddings: real_set(m, adapters, True))
        earlier.setattr(torch, "save", crash_saving_step_two)
        with pytest.raises(KeyboardInterrupt):
            train(model, E2E, config, tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint" / "memory_embeddings.safetensors"))["input_rows"]
    train(model, E2E, config, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert not torch.equal(model.lm.get_input_embeddings().weight[model.base_vocab_size:], saved)  # as it began


def test_the_e2e_stage_starts_its_query_reasoner_as_the_compressor(tiny_model, tmp_path):
    # what the "moved" checks above measure from: randomize_adapters gives the two other weights
    encoder, reasoner = lora(tiny_model, "encoder_adapter"), lora(tiny_model, "query_reasoner_adapter")
    assert any(not torch.equal(reasoner[k.replace("encoder_adapter", "query_reasoner_adapter")], v)
               for k, v in encoder.items())
    train(tiny_model, E2E, TrainConfig(stage="e2e", steps=1, batch_size=2, grad_accum=1, lr=0.0, top_k=2), tmp_path)
    encoder, reasoner = lora(tiny_model, "encoder_adapter"), lora(tiny_model, "query_reasoner_adapter")
    assert all(torch.equal(reasoner[k.replace("encoder_adapter", "query_reasoner_adapter")], v)
               for k, v in encoder.items())


def test_a_reasoner_loaded_as_the_compressors_copy_follows_it_through_a_compressor_stage(tiny_model, tmp_path):
    # scp run again from such a checkpoint saved the reasoner as the compressor it started from
    copy_adapter(tiny_model, "encoder_adapter", "query_reasoner_adapter")
    train(tiny_model, SCP, TrainConfig(stage="scp", steps=2, batch_size=1, grad_accum=1, lr=1e-2), tmp_path)
    encoder, reasoner = lora(tiny_model, "encoder_adapter"), lora(tiny_model, "query_reasoner_adapter")
    assert all(torch.equal(reasoner[k.replace("encoder_adapter", "query_reasoner_adapter")], v)
               for k, v in encoder.items())


def test_e2e_with_a_frozen_generator_trains_the_query_reasoner_alone(tiny_model, tmp_path):
    decoder = lora(tiny_model, "decoder_adapter")
    rows_before = tiny_model.lm.get_input_embeddings().weight.detach().clone()
    config = TrainConfig(stage="e2e", steps=2, batch_size=2, grad_accum=1, lr=1e-3, top_k=2,
                         freeze_generator=True, retrieval_weight=1.0, schedule="constant")
    train(tiny_model, E2E, config, tmp_path)
    assert all(torch.equal(v, lora(tiny_model, "decoder_adapter")[k]) for k, v in decoder.items())
    assert torch.equal(tiny_model.lm.get_input_embeddings().weight, rows_before)
    reasoner, encoder = lora(tiny_model, "query_reasoner_adapter"), lora(tiny_model, "encoder_adapter")
    assert any(not torch.equal(reasoner[k.replace("encoder_adapter", "query_reasoner_adapter")], v)
               for k, v in encoder.items())
    with pytest.raises(ValueError, match="freeze_generator needs"):
        TrainConfig(stage="retrieval", freeze_generator=True)
    # the end-to-end stage always freezes the compressor, so saying so as well is no conflict
    assert TrainConfig(stage="e2e", freeze_generator=True, freeze_compressor=True).freeze_generator


def test_straight_through_gradient_reaches_the_query_reasoner(tiny_model):
    set_trainable(tiny_model, ["query_reasoner_adapter", "decoder_adapter"], memory_embeddings=True)
    tiny_model.train()
    loss, _ = e2e_loss(tiny_model, E2E, TrainConfig(stage="e2e", top_k=2), CandidateMemories(tiny_model))
    loss.backward()
    grads = [p.grad for n, p in tiny_model.lm.named_parameters() if "lora_B.query_reasoner_adapter" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_gold_retrieval_term_raises_the_gold_candidates_score(tiny_model):
    """With retrieval_weight the query reasoner is pulled towards the rows' gold candidates."""
    candidates = CandidateMemories(tiny_model)
    config = TrainConfig(stage="e2e", top_k=2, retrieval_weight=10.0, temperature=0.1)
    set_trainable(tiny_model, ["query_reasoner_adapter"], memory_embeddings=False)
    tiny_model.eval()  # no dropout: both runs take the same steps from the same start but for the weight

    def gold_margin() -> float:
        with torch.no_grad():
            memories, gold = candidates.for_rows(E2E, config)
            queries = tiny_model.encode_queries([row["question"] for row in E2E])
            scores = cosine_scores(queries, memories, tiny_model.config.retrieval_key)
        return sum(float(s[g].mean() - s.mean()) for s, g in zip(scores, gold) if g)

    parameters = [p for p in tiny_model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in parameters]

    def margin_after_training(weight: float) -> float:
        """The gold margin after 3 SGD steps from the same start, with this retrieval weight."""
        for parameter, value in zip(parameters, start):
            parameter.data.copy_(value)
        weighted = dataclasses.replace(config, retrieval_weight=weight)
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        for _ in range(3):
            loss, metrics = e2e_loss(tiny_model, E2E, weighted, candidates)
            if weight:
                assert loss.item() == pytest.approx(metrics["ce"] + weight * metrics["retrieval"], rel=1e-5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return gold_margin()

    before = gold_margin()
    language_modelling_only = margin_after_training(0.0)
    assert margin_after_training(config.retrieval_weight) > max(before, language_modelling_only)


def test_the_retrieval_stage_trains_the_query_reasoner_alone(tiny_model, tmp_path):
    others = {name: lora(tiny_model, name) for name in ("encoder_adapter", "decoder_adapter")}
    reasoner = lora(tiny_model, "query_reasoner_adapter")
    rows_before = tiny_model.lm.get_input_embeddings().weight.detach().clone()
    config = TrainConfig(stage="retrieval", steps=2, batch_size=2, grad_accum=1, lr=1e-2, top_k=2)
    train(tiny_model, E2E, config, tmp_path)
    assert all(torch.equal(v, lora(tiny_model, name)[k]) for name, before in others.items() for k, v in before.items())
    assert torch.equal(tiny_model.lm.get_input_embeddings().weight, rows_before)
    assert any(not torch.equal(v, lora(tiny_model, "query_reasoner_adapter")[k]) for k, v in reasoner.items())
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert {"retrieval", "recall@2"} <= set(last)
    with pytest.raises(ValueError, match="e2e stage only"):
        train(tiny_model, E2E, config, tmp_path / "corpus", corpus=MemoryStore(tiny_model))
    with pytest.raises(ValueError, match=r"training row 1 \(retrieval stage\): .* this row has no pos_index"):
        train(tiny_model, [E2E[0], {**E2E[1], "pos_index": []}], config, tmp_path / "no-gold")


def test_a_candidate_in_two_pools_of_a_batch_is_scored_once(tiny_model):
    """Both rows offer the same six texts: each question's softmax runs over six candidates, not
    twelve, so one row's gold is no duplicate negative of its own."""
    config = TrainConfig(stage="retrieval", temperature=0.1)
    loss, _ = retrieval_loss(tiny_model, E2E, config, CandidateMemories(tiny_model))
    with torch.no_grad():
        scores = cosine_scores(tiny_model.encode_queries([row["question"] for row in E2E]),
                               tiny_model.compress_documents(CORPUS), tiny_model.config.retrieval_key)
        expected = -torch.stack([torch.log_softmax(s / 0.1, dim=0)[row["pos_index"][0]]
                                 for s, row in zip(scores, E2E)]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=2e-3)  # the cache keeps fp16 memories


@pytest.mark.parametrize("field", ["steps", "batch_size", "grad_accum", "save_every", "top_k", "candidates"])
def test_a_run_needs_at_least_one_step_row_and_micro_batch(field):
    with pytest.raises(ValueError, match=f"{field} must be at least 1, got 0"):
        TrainConfig(stage="retrieval", **{field: 0})


@pytest.mark.parametrize("field,value,message", [
    ("refresh_every", -1, "refresh_every must be at least 0"), ("probe_every", -1, "probe_every must be at least 0"),
    ("lr", -1e-4, "lr must be a finite number of at least 0"), ("temperature", 0.0, "temperature must be a finite number above 0"),
    # negative weights trained their terms the wrong way; warm-up past the last step never reached lr
    ("distill_weight", -1.0, "distill_weight must be a finite number of at least 0"), ("margin_weight", -1.0, "margin_weight must be"),
    ("mse_weight", -0.1, "mse_weight must be"), ("retrieval_weight", -1.0, "retrieval_weight must be"),
    ("restate_weight", -1.0, "restate_weight must be"), ("warmup_ratio", 2.0, "warmup_ratio is a share"),
])
def test_settings_a_run_would_fail_on_midway_are_refused_up_front(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(stage="e2e", **{field: value})


@pytest.mark.parametrize("stage,batch_size", [("scp", 1), ("instruct", 1), ("e2e", 4)])
def test_a_reading_margin_that_could_never_apply_is_refused(stage, batch_size):
    # at batch_size 1 (the default) the margin had no other row to pair with, and added nothing
    with pytest.raises(ValueError, match=f"got the {stage} stage with batch_size {batch_size}"):
        TrainConfig(stage=stage, margin_weight=1.0, batch_size=batch_size)
    TrainConfig(stage=stage, margin_weight=0.0, batch_size=batch_size)


def test_gradient_accumulation_keeps_the_retrieval_stages_negatives(tiny_config, tmp_path):
    """Two rows with disjoint pools: one micro-batch of two and two micro-batches of one give the
    same loss and update, each row ranked against both pools (accumulation only saves memory)."""
    rows = [{**E2E[0], "docs": CORPUS[:3], "pos_index": [0]}, {**E2E[1], "docs": CORPUS[3:], "pos_index": [1]}]

    def first_step(batch_size: int, grad_accum: int) -> tuple[dict, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = ClaraModel(dataclasses.replace(tiny_config, lora_dropout=0.0), device="cpu")
        randomize_adapters(model)
        before = lora(model, "query_reasoner_adapter")
        config = TrainConfig(stage="retrieval", steps=1, batch_size=batch_size, grad_accum=grad_accum, top_k=2,
                             lr=1e-2, warmup_ratio=0.0, grad_clip=1e9)
        folder = tmp_path / f"{batch_size}x{grad_accum}"
        train(model, rows, config, folder)
        update = {k: v - before[k] for k, v in lora(model, "query_reasoner_adapter").items()}
        return json.loads((folder / "log.jsonl").read_text().splitlines()[0]), update

    (whole, whole_update), (accumulated, accumulated_update) = first_step(2, 1), first_step(1, 2)
    assert accumulated["retrieval"] == pytest.approx(whole["retrieval"], abs=1e-4)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3) and whole["grad_norm"] > 0.1
    assert accumulated["recall@2"] == whole["recall@2"]
    moved = [k for k, v in whole_update.items() if v.abs().max() > 1e-3]
    assert moved and all(torch.allclose(accumulated_update[k], whole_update[k], atol=1e-4) for k in moved)


@pytest.mark.parametrize("killed", ["in step 4", "while saving step 4", "between the renames of step 4's save",
                                    "while logging step 4", "in step 4, resumed by the same model"])
def test_resume_reproduces_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch, killed):
    def fresh() -> ClaraModel:
        torch.manual_seed(0)  # LoRA A matrices are drawn at construction
        return ClaraModel(tiny_config, device="cpu")

    config = TrainConfig(stage="instruct", steps=4, batch_size=1, grad_accum=2, lr=1e-3, save_every=2)
    whole = fresh()
    train(whole, INSTRUCT, config, tmp_path / "whole")

    calls = {"n": 0}
    real_loss, real_save, real_replace = training.instruct_loss, torch.save, os.replace

    def crash_in_step_four(*args):
        calls["n"] += 1
        # steps 1-3 made 6 micro-batches; step 4 dies, step 3 was logged but not saved; resumed by
        # the same model, after its first micro-batch's gradients (the resumed step 3 added them)
        if calls["n"] == (8 if "same model" in killed else 7):
            raise KeyboardInterrupt
        return real_loss(*args)

    def crash_saving_step_four(state, *args, **kwargs):  # the weights of step 4 may be written, its state is not
        if isinstance(state, dict) and state.get("step") == 4:
            raise KeyboardInterrupt
        return real_save(state, *args, **kwargs)

    def crash_between_the_renames(source, target):  # the old checkpoint is set aside, the new one not yet in
        if Path(target).name == "checkpoint" and (Path(target).parent / ".checkpoint.old").exists():
            raise KeyboardInterrupt
        return real_replace(source, target)

    if killed.startswith("in step 4") or killed == "while logging step 4":
        monkeypatch.setattr(training, "instruct_loss", crash_in_step_four)
    elif killed == "while saving step 4":
        monkeypatch.setattr(torch, "save", crash_saving_step_four)
    else:
        monkeypatch.setattr(os, "replace", crash_between_the_renames)
    stopped = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(stopped, INSTRUCT, config, tmp_path / "resumed")
    if killed == "while logging step 4":  # its record cut short
        with open(tmp_path / "resumed" / "log.jsonl", "a") as log:
            log.write('{"step": 4, "lo')
    monkeypatch.undo()
    resumed, passes = stopped if "same model" in killed else fresh(), []
    monkeypatch.setattr(training, "instruct_loss", lambda *args: passes.append(1) or real_loss(*args))
    train(resumed, INSTRUCT, config, tmp_path / "resumed")
    assert len(passes) == 4  # steps 3 and 4, two micro-batches each: resumed from the save of step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the replayed step 3 is logged once
    for a, b in zip(whole.lm.parameters(), resumed.lm.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_run_killed_before_its_first_save_starts_its_log_again(tiny_model, tmp_path, monkeypatch):
    real_loss = training.instruct_loss
    calls = {"n": 0}

    def crash_in_step_two(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_loss(*args)

    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1, lr=1e-3, save_every=2)
    monkeypatch.setattr(training, "instruct_loss", crash_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, INSTRUCT, config, tmp_path)
    with open(tmp_path / "log.jsonl", "a") as log:  # and was writing a record when it died
        log.write('{"step": 2, "lo')
    monkeypatch.undo()
    train(tiny_model, INSTRUCT, config, tmp_path)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "log.1.jsonl").read_text().startswith('{"step": 1')  # the killed run's, kept aside


def test_a_finished_runs_log_is_kept_when_its_checkpoint_was_moved_away(tiny_model, tmp_path):
    # the next run in the folder emptied it
    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1)
    train(tiny_model, INSTRUCT, config, tmp_path)
    log = (tmp_path / "log.jsonl").read_text()
    shutil.move(tmp_path / "checkpoint", tmp_path.parent / f"{tmp_path.name}-moved")
    train(tiny_model, INSTRUCT, config, tmp_path)
    assert (tmp_path / "log.1.jsonl").read_text() == log and (tmp_path / "log.jsonl").read_text() != log


def test_an_output_whose_log_is_not_a_training_log_is_refused_and_the_log_kept(tiny_model, tmp_path):
    # it stopped the run with KeyError: 'step', after the model and rows were ready
    (tmp_path / "log.jsonl").write_text('{"note": "my experiment log"}\n')
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1, lr=1e-3)
    with pytest.raises(ValueError, match="holds records that are not a training log's"):
        train(tiny_model, INSTRUCT, config, tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == '{"note": "my experiment log"}\n'


@pytest.mark.parametrize("content,message", [
    (b"PK\x03\x04 cut short", "is damaged, or not a file of tensors that can be read safely"),
    (b"Repository not found\n", "is damaged, or not a file"),  # a bare IndexError: pop from empty list
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "is a Git LFS pointer"),
    (None, "is not a trainer state of this library: it lacks optimizer")])
def test_an_unreadable_trainer_state_is_named(tiny_model, tmp_path, content, message):
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1, lr=1e-3)
    train(tiny_model, INSTRUCT, config, tmp_path)
    state_path = tmp_path / "checkpoint" / "trainer_state.pt"
    if content is None:
        state = torch.load(state_path, weights_only=True)
        del state["optimizer"]
        torch.save(state, state_path)
    else:
        state_path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"trainer_state.pt {message}"):
        train(tiny_model, INSTRUCT, dataclasses.replace(config, steps=2), tmp_path)


@pytest.mark.parametrize("stage,row,message,settings", [
    ("instruct", {**INSTRUCT[1], "docs": CORPUS[0]}, "docs must be a non-empty list of document texts", {}),
    ("instruct", {**INSTRUCT[1], "docs": CORPUS[:3]}, "3 documents, where the first row has 2", {"batch_size": 2}),
    ("instruct", {**SCP[2], "docs": CORPUS[:1]}, "1 documents, where the first row has 2", {"batch_size": 2}),
    ("instruct", SCP[2], "an SCP row .*, which only the scp stage and the instruct stage without restate_weight",
     {"restate_weight": 1.0}),
    ("instruct", {"docs": CORPUS[:2], "answer": "Paris"}, "question must be a non-empty string", {}),
    ("text", {"question": "Where?", "docs": CORPUS[:2]}, "it needs an answer", {}),
    ("e2e", {**E2E[1], "pos_index": [len(CORPUS)]}, "pos_index must list positions of its", {}),
    ("e2e", SCP[0], r"an SCP row \(data_type set\)", {}),
    ("scp", {**SCP[1], "data_type": "summary"}, "data_type must be one of", {}),
    ("scp", {**SCP[1], "docs": CORPUS[:2]}, "an SCP row compresses one document, and docs holds 2", {}),  # read 1
    ("instruct", {**SCP[2], "docs": CORPUS[:2]}, "an SCP row compresses one document", {}),  # failed mid-run
    ("scp", {**INSTRUCT[1], "answers": ["Paris"]}, "the scp stage reads one document a row, and docs holds 2",
     {}),  # read its first document alone
    ("instruct", {**INSTRUCT[1], "answer": ["Paris"], "answers": ["Paris"]}, "answer must be a string, got list",
     {}),  # failed at the first batch
    ("scp", {**SCP[0], "question": "What flows through Vienna?"}, "a qa row's question must be a list of strings", {}),
    # answers beside an answer went unread: the scores and the restatement margin read its letters
    ("instruct", {**INSTRUCT[1], "answer": "Paris", "answers": "Paris"}, "answers must be a non-empty list", {}),
    ("e2e", {**E2E[1], "pos_index": None}, "pos_index must list positions", {}),  # TypeError at step 1 with a corpus
    ("instruct", {**INSTRUCT[1], "docs": ["", CORPUS[1]]}, "docs must be a non-empty list of document texts, none "
     "blank", {}),  # refused mid-run, by its place in a batch
])
def test_rows_a_stage_cannot_read_are_named_before_the_first_step(tiny_model, tmp_path, stage, row, message, settings):
    first = {"instruct": INSTRUCT[0], "text": INSTRUCT[0], "e2e": E2E[0], "scp": SCP[2]}[stage]
    config = TrainConfig(stage=stage, steps=1, grad_accum=1, **settings)
    with pytest.raises(InvalidInputError, match=f"training row 1 \\({stage} stage\\): {message}"):
        train(tiny_model, [first, row], config, tmp_path)
    assert not (tmp_path / "log.jsonl").exists()


def test_probe_rows_a_probe_cannot_read_are_named_before_the_first_step(tiny_model, tmp_path):
    # a probe row without docs stopped the run at its first probe with a bare KeyError: 'docs'
    config = TrainConfig(stage="instruct", steps=1, grad_accum=1, probe_every=1)
    probe = [INSTRUCT[0], {"question": "Where?", "answer": "Paris"}]
    with pytest.raises(InvalidInputError, match="probe held_out, row 1: docs must be a non-empty list"):
        train(tiny_model, INSTRUCT, config, tmp_path, probes={"held_out": probe})
    assert not (tmp_path / "log.jsonl").exists()


def test_rows_of_other_widths_train_one_row_a_batch(tiny_model, tmp_path):
    rows = [INSTRUCT[0], {**INSTRUCT[1], "docs": CORPUS[:3]}, SCP[2]]
    train(tiny_model, rows, TrainConfig(stage="instruct", steps=3, batch_size=1, grad_accum=1), tmp_path)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_a_checkpoint_without_its_trainer_state_is_not_trained_over(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run" / "checkpoint")
    before = (tmp_path / "run" / "checkpoint" / "adapter_decoder_adapter.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds no trainer_state.pt, so the run that wrote it cannot resume"):
        train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint" / "adapter_decoder_adapter.safetensors").read_bytes() == before


def test_saving_a_trained_model_again_leaves_its_trainer_state_out(tiny_model, tmp_path):
    train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1, lr=0.0), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.pt").is_file()
    tiny_model.save_pretrained(tmp_path / "run" / "checkpoint", dtype=torch.float16)  # e.g. shipped in fp16
    assert not (tmp_path / "run" / "checkpoint" / "trainer_state.pt").exists()


def test_a_half_precision_model_is_refused_before_anything_is_written(tiny_config, tmp_path):
    model = ClaraModel(tiny_config, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="training needs a float32 model, got torch.bfloat16"):
        train(model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_non_finite_gradients_stop_the_run_and_keep_the_last_saved_step(tiny_model, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = training.instruct_loss

    def overflow_in_step_three(*args):
        calls["n"] += 1
        loss, metrics = real_loss(*args)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(training, "instruct_loss", overflow_in_step_three)
    config = TrainConfig(stage="instruct", steps=4, batch_size=1, grad_accum=1, lr=1e-3, save_every=2)
    with pytest.raises(FloatingPointError, match="step 3: the gradients are not finite"):
        train(tiny_model, INSTRUCT, config, tmp_path)
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    saved = ClaraModel.from_pretrained(tmp_path / "checkpoint", device="cpu")  # refuses non-finite weights
    assert all(torch.isfinite(p).all() for p in saved.lm.parameters())


def test_resuming_with_another_configuration_is_refused(tiny_model, tmp_path):
    assert tiny_model.config.retrieval_key == "mean"
    train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path)
    with pytest.raises(ValueError, match="another configuration: lr=1.0 \\(was 0.0001\\), steps=2 \\(was 1\\)"):
        train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=2, grad_accum=1, lr=1.0), tmp_path)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["probe_every"]  # a run saved before the knob existed, at its default
    # and with a setting its stage never read, which is refused since: it changed nothing trained
    state["config"]["margin"], state["config"]["temperature"] = 1.5, 0.1
    torch.save(state, state_file)
    with pytest.warns(UserWarning, match="holds a finished run of 1 steps: nothing to train"):
        train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path)
    # a finished run given other rows trained nothing and reported success
    with pytest.raises(ValueError, match="was trained on other rows than these"):
        train(tiny_model, INSTRUCT[::-1], TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path)
    tiny_model.config.retrieval_key = "flat"  # e.g. `clara train ... --retrieval-key flat` on resume
    with pytest.raises(ValueError, match="retrieval_key='flat' \\(was 'mean'\\)"):
        train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, grad_accum=1), tmp_path)


def test_corpus_mode_retrieves_candidates_and_refreshes(tiny_tokens_model, tmp_path):
    store = MemoryStore(tiny_tokens_model)
    store.upsert(CORPUS)
    config = TrainConfig(stage="e2e", steps=2, batch_size=1, grad_accum=1, lr=1e-3, top_k=2, candidates=4,
                         refresh_every=1)
    before = store.memories(store.all_ids()[:1])
    train(tiny_tokens_model, E2E, config, tmp_path, corpus=store)
    assert not torch.equal(before, store.memories(store.all_ids()[:1]))  # <MEM> rows moved, store re-encoded


def test_a_refresh_of_pooled_memories_is_refused_before_any_step(tiny_model, tmp_path):
    # pooled memories never read the <MEM> rows: each refresh compressed the whole corpus again for the same memories
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS)
    config = TrainConfig(stage="e2e", steps=2, batch_size=1, grad_accum=1, top_k=2, candidates=4, refresh_every=1)
    with pytest.raises(ValueError, match="pooled memories never read those rows"):
        train(tiny_model, E2E, config, tmp_path / "run", corpus=store)
    assert not (tmp_path / "run").exists()


def test_the_end_to_end_k_is_the_k_the_checkpoint_reads(tiny_config, tiny_model, tmp_path):
    config = TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=1, top_k=2, schedule="constant")
    checkpoint = train(tiny_model, E2E, config, tmp_path)
    assert ClaraModel.from_pretrained(checkpoint, device="cpu").config.generation_top_k == 2
    assert tiny_config.generation_top_k == 5  # the model edits its own copy of the config it was given


def test_resuming_with_another_corpus_or_none_is_refused(tiny_model, tmp_path):
    # the trainer state held nothing of the corpus: a resume without --corpus, or with another,
    # trained on other candidates without a word
    def store(texts):
        corpus = MemoryStore(tiny_model)
        corpus.upsert(texts)
        return corpus

    config = TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=1, top_k=2, candidates=4)
    train(tiny_model, E2E, config, tmp_path, corpus=store(CORPUS))
    with pytest.warns(UserWarning, match="finished run"):  # the same passages, repeated and in another order
        train(tiny_model, E2E, config, tmp_path, corpus=store(CORPUS[::-1] + CORPUS[:1]))
    with pytest.raises(ValueError, match="trained with another corpus: resume it with the same --corpus"):
        train(tiny_model, E2E, config, tmp_path, corpus=store(CORPUS[1:]))
    plain = TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=1, top_k=2)
    train(tiny_model, E2E, plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="trained without a corpus"):
        train(tiny_model, E2E, plain, tmp_path / "plain", corpus=store(CORPUS))


def test_a_resume_beside_a_foreign_old_copy_is_refused_before_its_steps(tiny_model, tmp_path, monkeypatch):
    # the first save's swap refused the .checkpoint.old, after the resumed run had trained up to it
    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1)
    train(tiny_model, INSTRUCT, config, tmp_path)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["step"] = 1  # as if killed after its first step
    torch.save(state, state_file)
    foreign = tmp_path / ".checkpoint.old"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    steps = []
    monkeypatch.setattr(training, "instruct_loss", lambda *a: steps.append(1))
    with pytest.raises(FileExistsError, match="holds no clara_config.json: it is not this library's copy"):
        train(tiny_model, INSTRUCT, config, tmp_path)
    assert not steps and (foreign / "notes.txt").read_text() == "mine"
    # a new run met it at its second save, the first having made the checkpoint
    (tmp_path / "new").mkdir()
    shutil.move(foreign, tmp_path / "new" / ".checkpoint.old")
    with pytest.raises(FileExistsError, match="holds no clara_config.json: it is not this library's copy"):
        train(tiny_model, INSTRUCT, config, tmp_path / "new")
    assert not steps


def test_epochs_of_neighbouring_seeds_are_shuffled_apart():
    # seed + epoch gave seed 1's first epoch the order of seed 0's second
    rows = [{"n": i} for i in range(64)]
    config = TrainConfig(stage="instruct", batch_size=64, grad_accum=1)
    first_of_seed_one = training._batches(rows, dataclasses.replace(config, seed=1), 0)
    assert first_of_seed_one != training._batches(rows, config, 1)
    assert training._batches(rows, config, 0) != first_of_seed_one
    for seed in (-1, 2**32):  # shuffled as seed 1, and as seed 0's second epoch
        with pytest.raises(ValueError, match=f"seed must be in 0..2\\*\\*32-1, got {seed}"):
            dataclasses.replace(config, seed=seed)


def test_the_warm_up_takes_its_whole_share_of_the_steps():
    # int(0.29 * 100) is 28: one warm-up step short, by float error
    factor = training._learning_rate(TrainConfig(stage="scp", steps=100, warmup_ratio=0.29))
    assert factor(0) == pytest.approx(1 / 29)
    assert training._learning_rate(TrainConfig(stage="scp", steps=60, warmup_ratio=0.03))(0) == 1.0  # 1.8: one step


def test_a_resumed_run_refuses_a_teacher_whose_files_changed(tiny_config, tiny_model, tmp_path, monkeypatch):
    # the teacher was recorded by its path alone: one trained again in its folder taught the rest unsaid
    ClaraModel(tiny_config, device="cpu").save_pretrained(tmp_path / "t")
    config = TrainConfig(stage="instruct", steps=2, batch_size=2, grad_accum=1, distill_weight=1.0, save_every=1,
                         teacher=str(tmp_path / "t"))
    real_loss, calls = training.instruct_loss, []

    def stopped_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "instruct_loss", stopped_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, INSTRUCT, config, tmp_path / "run")
    monkeypatch.setattr(training, "instruct_loss", real_loss)
    shutil.copytree(tmp_path / "t", tmp_path / "first")
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=5)
    other.save_pretrained(tmp_path / "t")
    with pytest.raises(CheckpointError, match="trained from other weights than its --teacher holds now"):
        train(tiny_model, INSTRUCT, config, tmp_path / "run")
    shutil.rmtree(tmp_path / "t")
    shutil.copytree(tmp_path / "first", tmp_path / "t")  # the teacher it began with: it resumes
    # named otherwise ("t/"), saving at other steps, its base model named: none changes what trains
    # (the first two were refused)
    train(tiny_model, INSTRUCT, dataclasses.replace(config, teacher=str(tmp_path / "t") + "/", save_every=5,
                                                    teacher_base_model=tiny_config.base_model), tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    # finished, it refuses another teacher's weights under another path (not loaded, it was not compared)
    other.save_pretrained(tmp_path / "t2")
    with pytest.raises(CheckpointError, match="trained from other weights than its --teacher holds now"):
        train(tiny_model, INSTRUCT, dataclasses.replace(config, teacher=str(tmp_path / "t2")), tmp_path / "run")


def test_a_finished_run_in_a_folder_nothing_can_be_written_to_returns_its_checkpoint(tiny_model, tmp_path,
                                                                                     monkeypatch):
    # a finished run writes nothing: on a read-only mount it was refused as unwritable
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1)
    checkpoint = train(tiny_model, INSTRUCT, config, tmp_path)

    def read_only(path, **_):
        raise PermissionError(f"{path} cannot be written: Read-only file system")

    monkeypatch.setattr(training, "check_writable", read_only)
    monkeypatch.setattr(atomic, "hold_lock", read_only)  # nor its lock beside it made
    with pytest.warns(UserWarning, match="holds a finished run"):
        assert train(tiny_model, INSTRUCT, config, tmp_path) == checkpoint
    state_file = checkpoint / "trainer_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "step": 0}, state_file)  # a step left to take
    with pytest.raises(PermissionError):
        train(tiny_model, INSTRUCT, config, tmp_path)


def test_the_log_counts_seconds_across_a_resume(tiny_model, tmp_path):
    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1)
    train(tiny_model, INSTRUCT, config, tmp_path)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["step"], state["seconds"] = 1, 1000.0  # as if killed after a first step that took that long
    torch.save(state, state_file)
    train(tiny_model, INSTRUCT, config, tmp_path)
    seconds = [json.loads(line)["seconds"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert seconds[0] < 1000 <= seconds[1]  # the log's step 2 counted from the resume: at a second or less


def test_a_top_k_nothing_reads_or_wider_than_the_pools_is_refused(tiny_model, tmp_path):
    # an instruct row reads all its documents: top_k changed nothing but the probes'
    with pytest.raises(ValueError, match=r"^top_k \(--top-k\): not read"):
        TrainConfig(stage="instruct", top_k=3)
    assert TrainConfig(stage="instruct", top_k=3, probe_every=1).top_k == 3
    # the generator trained on every candidate, and its checkpoint was set to read more than it has
    config = TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=1, top_k=len(E2E[0]["docs"]) + 1)
    with pytest.raises(ValueError, match=f"more than the {len(E2E[0]['docs'])} candidates of a row"):
        train(tiny_model, E2E, config, tmp_path)
    corpus = MemoryStore(tiny_model)  # fewer passages than the candidates asked for: as many as it holds
    corpus.upsert(CORPUS[:3])
    config = TrainConfig(stage="e2e", steps=1, batch_size=1, grad_accum=1, top_k=4, candidates=10)
    with pytest.raises(ValueError, match="more than the 3 candidates of a row"):
        train(tiny_model, E2E, config, tmp_path, corpus=corpus)


def test_refresh_every_and_warmup_are_refused_where_nothing_reads_them():
    with pytest.raises(ValueError, match=r"^refresh_every \(--refresh-every\): not read"):
        TrainConfig(stage="scp", refresh_every=10)
    # cached memories that nothing trained changes: re-encoding them would give them back as they are
    for cached in ({"stage": "instruct"}, {"stage": "instruct", "freeze_compressor": True}, {"stage": "retrieval"},
                   {"stage": "e2e", "freeze_generator": True}):
        with pytest.raises(ValueError, match=r"^refresh_every \(--refresh-every\): not read"):
            TrainConfig(**cached, refresh_every=10)
    assert TrainConfig(stage="e2e", refresh_every=10).refresh_every == 10
    with pytest.raises(ValueError, match=r"^warmup_ratio \(--warmup-ratio\): not read"):  # a constant schedule: no warm-up
        TrainConfig(stage="e2e", schedule="constant", warmup_ratio=0.2)


def test_a_blank_answer_is_refused(tiny_model, tmp_path):
    # it passed as an answer, and the generator was trained to answer with spaces
    with pytest.raises(InvalidInputError, match="answer must not be blank"):
        train(tiny_model, [{**INSTRUCT[0], "answer": "  ", "answers": ["Marie Curie"]}],
              TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1), tmp_path)
    from clara_plugins.rows import question_row_problem  # where no answer is read, a blank one is no problem

    assert question_row_problem({**E2E[0], "answer": " "}, needs_answer=False) is None


def test_the_text_stage_reads_long_documents_whole_and_does_not_warn(tiny_model, tmp_path):
    long = " ".join(CORPUS * 10)
    rows = [{"question": "Who won prizes?", "docs": [long], "answer": "Marie Curie"},
            {"question": "Which river?", "docs": [CORPUS[0]], "answer": "the Danube"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_model, rows, TrainConfig(stage="text", steps=1, batch_size=2, grad_accum=1), tmp_path)
    assert not [w for w in caught if "doc_max_length" in str(w.message)]


def test_documents_longer_than_the_compressor_reads_are_counted_in_a_warning(tiny_model, tmp_path):
    long = " ".join(CORPUS * 10)
    rows = [{"data_type": "reconstruct", "answers": [long], "docs": [long]},
            {"data_type": "reconstruct", "answers": [CORPUS[0]], "docs": [CORPUS[0]]}]
    config = TrainConfig(stage="scp", steps=1, batch_size=2, grad_accum=1, mse_weight=0.0)
    with pytest.warns(UserWarning, match="1 of the rows' 2 documents are longer than doc_max_length .*cannot "
                                         "hold$") as caught:  # no answer past the cut: a reconstruction's target is its document
        train(tiny_model, rows, config, tmp_path)
    # both at the caller's line (they named training.py, once train() held its output's lock around the run)
    assert [w.filename for w in caught if "doc_max_length" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="holds a finished run") as caught:
        train(tiny_model, rows, config, tmp_path)
    assert [w.filename for w in caught if "finished run" in str(w.message)] == [__file__]


@pytest.mark.parametrize("fast", [True, False])  # a slow tokenizer has no offsets: its tokens are decoded
def test_rows_whose_answer_is_past_the_compressors_cut_alone_are_counted(tiny_model, tmp_path, monkeypatch, fast):
    # a cloze blank late in a long passage, an Oracle answer past the first 256 tokens: trained
    # to say what the memories cannot hold, with the documents alone counted
    long = " ".join(CORPUS * 10) + " The answer is Zanzibar."
    rows = [{"question": "Where?", "docs": [long], "answer": "Zanzibar"},
            {"question": "Which capital?", "docs": [long], "answer": "Paris"},  # its first words: kept
            {"question": "Where else?", "docs": [CORPUS[0], long], "answer": "ZANZIBAR"}]
    monkeypatch.setattr(type(tiny_model.tokenizer), "is_fast", fast)
    with pytest.warns(UserWarning, match="1 of the rows' 2 documents are longer than doc_max_length .*; 2 rows' "
                                         "answers are in their documents past the cut alone, training row 0 the first"):
        train(tiny_model, rows, TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1), tmp_path)


def test_a_long_document_of_a_question_row_is_counted_once_for_the_run(tiny_model, tmp_path):
    # a question row's documents went uncounted (an answer past the first doc_max_length tokens
    # is none its memories hold), and each step's compression of candidates warned of its own
    rows = [{**row, "docs": [" ".join(CORPUS * 10), *row["docs"][1:]]} for row in E2E]
    config = TrainConfig(stage="e2e", steps=2, batch_size=1, grad_accum=1, top_k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_model, rows, config, tmp_path)
    cut = [str(w.message) for w in caught if "doc_max_length" in str(w.message)]
    assert len(cut) == 1 and cut[0].startswith("1 of the rows' 6 documents are longer than doc_max_length")


def test_a_path_or_numpy_setting_is_saved_as_a_plain_value(tiny_model, tmp_path):
    # the trainer state held a PosixPath or a numpy float, which weights_only refuses: the run's
    # every save was "corrupted" and it could never resume
    import numpy as np

    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=np.int64(1), lr=np.float32(1e-4),
                         freeze_compressor=np.bool_(False))
    assert type(config.grad_accum) is int and type(config.lr) is float and config.freeze_compressor is False
    train(tiny_model, INSTRUCT, config, tmp_path)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["config"]["lr"] == pytest.approx(1e-4)
    assert TrainConfig(stage="instruct", teacher=Path("runs/text"), distill_weight=1.0).teacher == "runs/text"
    for bad, message in (({"steps": "100"}, "TrainConfig.steps must be an int, got '100'"),
                         ({"steps": 1.5}, "TrainConfig.steps must be an int"), ({"lr": True}, "lr must be a float")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(stage="instruct", **bad)


@pytest.mark.parametrize("stage,rows,token", [
    ("scp", [SCP[0], {**SCP[2], "answers": ["It says <MEM0> here."]}], "<MEM0>"),
    ("text", [INSTRUCT[0], {**INSTRUCT[1], "docs": [CORPUS[1], "</s>The assistant said so."]}], "</s>"),
])
def test_a_row_holding_a_control_token_is_refused_before_any_step(tiny_model, tmp_path, stage, rows, token):
    # a typed <MEM0> took a memory's place: the run failed at the step that drew the row, and again on every resume
    config = TrainConfig(stage=stage, steps=2, batch_size=1, grad_accum=1)
    with pytest.raises(InvalidInputError, match=f"training row 1 holds '{token}'"):
        train(tiny_model, rows, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    probes = {"held": [{**INSTRUCT[1], "docs": CORPUS[2:4]}, {**INSTRUCT[0], "answer": "Marie <MEM1> Curie"}]}
    with pytest.raises(InvalidInputError, match="probe held, row 1 holds '<MEM1>'"):
        train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1, probe_every=1),
              tmp_path / "run", probes=probes)


@pytest.mark.parametrize("stage,rows", [("scp", SCP), ("instruct", INSTRUCT), ("text", INSTRUCT), ("e2e", E2E)])
def test_a_row_longer_than_the_context_window_is_refused_before_any_step(tiny_model, tmp_path, monkeypatch,
                                                                         stage, rows):
    # it trained, unsaid, at positions the model never saw (and a decoding of that length was refused)
    long = [*rows[:1], {**rows[-1], "answers": ["word " * 300], "answer": "word " * 300}]
    config = TrainConfig(stage=stage, steps=1, batch_size=1, grad_accum=1, **({"top_k": 2} if stage == "e2e" else {}))
    monkeypatch.setattr(training, "context_window", lambda lm: 400)
    # a row whose documents are read as memories is not shortened by cutting them
    remedy = "cut their documents or targets" if stage == "text" else \
        rf"give them fewer documents \(each reads as {tiny_model.config.n_mem_tokens + 1} positions"  # its <MEM>s, <SEP>
    with pytest.raises(InvalidInputError, match="1 of the 2 training rows are longer than the generator's context "
                                                rf"window of 400 positions, training row 1 the first \(\d+\): {remedy}"):
        train(tiny_model, long, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    train(tiny_model, rows[:1], config, tmp_path / "run")  # a row that fits trains


def test_rows_longer_than_the_teachers_context_window_are_refused(tiny_config, tiny_model, tmp_path, monkeypatch):
    # the teacher reads the documents whole, as text: far longer than the student's memories
    ClaraModel(tiny_config, device="cpu").save_pretrained(tmp_path / "t")
    config = TrainConfig(stage="instruct", steps=1, batch_size=2, grad_accum=1, distill_weight=1.0,
                         teacher=str(tmp_path / "t"))
    monkeypatch.setattr(training, "context_window", lambda lm: 8192 if lm is tiny_model.lm else 40)
    with pytest.raises(InvalidInputError, match="2 of the 2 training rows are longer than the teacher's context "
                                                "window of 40 positions"):
        train(tiny_model, INSTRUCT, config, tmp_path / "run")


@pytest.mark.parametrize("term", ["mass", "each"])
def test_a_gold_candidate_named_twice_counts_once(term):
    # two gold documents of one text are one candidate: counted twice, it weighed double (and
    # "mass" could go below zero)
    scores = torch.tensor([[0.9, 0.1, 0.2]])
    config = TrainConfig(stage="e2e", top_k=2, retrieval_weight=1.0, temperature=1.0, gold_term=term)
    assert torch.equal(training._gold_retrieval_loss(scores, [[0, 0, 2]], config),
                       training._gold_retrieval_loss(scores, [[0, 2]], config))


def test_cached_candidates_past_fp16s_range_are_refused_by_name(tiny_model, monkeypatch):
    # cast down unchecked, they became inf: NaN cosines, and a run stopped later on "gradients are not finite"
    real = tiny_model.compress

    def too_large(texts, **kwargs):
        compressed = real(texts, **kwargs)
        return dataclasses.replace(compressed, memories=compressed.memories * 0 + 1e5)

    monkeypatch.setattr(tiny_model, "compress", too_large)
    with pytest.raises(InvalidInputError, match="within fp16's range"):
        CandidateMemories(tiny_model).of_texts(CORPUS[:2])


def test_a_run_on_an_apple_gpu_saves_that_devices_random_state(monkeypatch):
    # re-seeded on resume, an MPS run replayed its first dropout masks
    from types import SimpleNamespace

    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    states = training._rng_states(SimpleNamespace(device=torch.device("mps")))
    assert torch.equal(states["mps_rng"], torch.tensor([7], dtype=torch.uint8)) and "rng" in states


def test_a_run_copied_with_links_resumes_without_writing_the_originals_log(tiny_model, tmp_path):
    # "cp -rs" copies a run's log as a link: the resume rewrote the original's log, then appended to it
    config = TrainConfig(stage="instruct", steps=2, batch_size=1, grad_accum=1)
    train(tiny_model, INSTRUCT, config, tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    (tmp_path / "copy" / "log.jsonl").unlink()
    (tmp_path / "copy" / "log.jsonl").symlink_to(tmp_path / "run" / "log.jsonl")
    original = (tmp_path / "run" / "log.jsonl").read_text()
    state_file = tmp_path / "copy" / "checkpoint" / "trainer_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "step": 1}, state_file)
    train(tiny_model, INSTRUCT, config, tmp_path / "copy")
    assert (tmp_path / "run" / "log.jsonl").read_text() == original
    assert [json.loads(line)["step"] for line in (tmp_path / "copy" / "log.jsonl").read_text().splitlines()] == [1, 2]
    # a read-only original: the copy's own log keeps its own mode, not the target's (it could not append)
    (tmp_path / "copy" / "log.jsonl").unlink()
    (tmp_path / "copy" / "log.jsonl").symlink_to(tmp_path / "run" / "log.jsonl")
    os.chmod(tmp_path / "run" / "log.jsonl", 0o444)
    torch.save({**torch.load(state_file, weights_only=True), "step": 1}, state_file)
    train(tiny_model, INSTRUCT, config, tmp_path / "copy")
    assert os.stat(tmp_path / "copy" / "log.jsonl").st_mode & stat.S_IWUSR
    # a link that names nothing (the original run restarted, its log put aside): none made there
    (tmp_path / "copy" / "log.jsonl").unlink()
    (tmp_path / "copy" / "log.jsonl").symlink_to(tmp_path / "run" / "gone.jsonl")
    torch.save({**torch.load(state_file, weights_only=True), "step": 1}, state_file)
    train(tiny_model, INSTRUCT, config, tmp_path / "copy")
    assert not (tmp_path / "run" / "gone.jsonl").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "copy" / "log.jsonl").read_text().splitlines()] == [2]


@pytest.mark.parametrize("target", ["empty", "missing"])
def test_a_new_run_whose_log_is_a_link_writes_its_own(tiny_model, tmp_path, target):
    # a copy of a run killed before its first save: its empty (or gone) log stayed a link, and the
    # new run appended its records to the other run's log, or made one there
    other = tmp_path / "other.jsonl"
    if target == "empty":
        other.write_text("")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").symlink_to(other)
    train(tiny_model, INSTRUCT, TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1), tmp_path / "run")
    assert (other.read_text() == "") if target == "empty" else not other.exists()
    assert not (tmp_path / "run" / "log.jsonl").is_symlink()


@pytest.mark.parametrize("stage", ["instruct", "text", "e2e"])
def test_a_run_stopped_at_its_first_step_gives_back_the_model_as_it_began(tiny_model, tmp_path, monkeypatch, stage):
    # the stage's start had reset the generator (instruct, text) or copied the compressor into the
    # query reasoner (e2e), and marked its settings: a notebook's Ctrl-C left the model so
    before = {name: parameter.clone() for name, parameter in tiny_model.lm.named_parameters()}
    settings = (tiny_model.config.decoder_reads_text, tiny_model.config.generation_top_k, tiny_model.trainable)
    grads = {name: parameter.requires_grad for name, parameter in tiny_model.lm.named_parameters()}
    tiny_model.eval()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, f"{stage}_loss", stopped)
    rows = E2E if stage == "e2e" else INSTRUCT
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, rows, TrainConfig(stage=stage, steps=2, batch_size=1, grad_accum=1,
                                            **({"top_k": 2} if stage == "e2e" else {})), tmp_path / "run")
    assert all(torch.equal(parameter, before[name]) for name, parameter in tiny_model.lm.named_parameters())
    assert (tiny_model.config.decoder_reads_text, tiny_model.config.generation_top_k, tiny_model.trainable) == settings
    assert {name: p.requires_grad for name, p in tiny_model.lm.named_parameters()} == grads
    assert not tiny_model.training


def test_a_run_stopped_in_its_first_save_puts_back_the_query_reasoner_it_mirrors(tiny_config, tmp_path, monkeypatch):
    # the save copies the trained compressor into a reasoner that is its copy: the compressor was
    # put back, the reasoner not, and the run given the model again no longer mirrored it
    from clara_plugins.model import ENCODER, QUERY_REASONER, copy_adapter

    torch.manual_seed(0)
    model = ClaraModel(tiny_config, device="cpu")
    copy_adapter(model, ENCODER, QUERY_REASONER)
    before = {name: parameter.clone() for name, parameter in model.lm.named_parameters()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(model, SCP, TrainConfig(stage="scp", steps=2, batch_size=1, grad_accum=1, lr=1e-2, save_every=2), tmp_path)
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.lm.named_parameters())


def test_a_run_stopped_before_its_first_save_starts_the_same_model_again_as_it_began(tiny_config, tmp_path,
                                                                                      monkeypatch):
    # its first steps had changed the model object in place, and the new run trained on from them
    def fresh() -> ClaraModel:
        torch.manual_seed(0)
        return ClaraModel(tiny_config, device="cpu")

    config = TrainConfig(stage="scp", steps=3, batch_size=1, grad_accum=1, lr=1e-2, save_every=3)
    whole = fresh()
    train(whole, SCP, config, tmp_path / "whole")
    real_loss, calls = training.scp_loss, {"n": 0}

    def crash_in_step_three(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    stopped = fresh()
    monkeypatch.setattr(training, "scp_loss", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, SCP, config, tmp_path / "stopped")
    assert all(torch.equal(a, b) for a, b in zip(fresh().lm.parameters(), stopped.lm.parameters()))
    monkeypatch.undo()
    train(stopped, SCP, config, tmp_path / "stopped")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole.lm.parameters(), stopped.lm.parameters()))
