"""`clara eval`: answer metrics per system, retrieval metrics, and the reading check, on the tiny model."""

import json
import os

import pytest
import torch

from clara_benchmarks import evaluation
from clara_benchmarks.evaluation import (control_partners, evaluate_answers, evaluate_retrieval, f1_above_control,
                                         recall_above)
from clara_benchmarks.text_reader import read_text
from clara_plugins import reading
from clara_plugins.cli import main
from clara_plugins.errors import InvalidInputError
from clara_plugins.passes import completion_log_likelihood, completion_log_probs, token_log_likelihood
from clara_plugins.prompts import question_prompt, scp_prompt
from clara_plugins.retrieval import cosine_scores
from clara_plugins.reading import evaluate_reading, other_rows
from conftest import CORPUS

ROWS = [{"question": "Which river flows through Vienna?", "docs": [CORPUS[2], CORPUS[3], CORPUS[0]],
         "answer": "the Danube", "pos_index": [1]},
        {"question": "Who won Nobel Prizes in physics?", "docs": [CORPUS[5], CORPUS[4], CORPUS[0]],
         "answer": "Marie Curie", "pos_index": [1]},
        {"question": "When was the Eiffel Tower completed?", "docs": CORPUS[0:3], "answer": "1889",
         "pos_index": [1]}]


def test_an_evaluation_warns_once_of_the_documents_its_rows_cut(tiny_model):
    # a pool is compressed a row at a time, and each row with a long passage warned inside the bar
    import warnings

    long = " ".join(CORPUS * 3)
    rows = [{**row, "docs": [f"{long} {i}", *row["docs"][1:]]} for i, row in enumerate(ROWS)]
    for evaluate in (lambda: evaluate_answers(tiny_model, rows, "clara", k=2, max_new_tokens=1, batch_size=1),
                     lambda: evaluate_retrieval(rows, ["reasoner", "compressor"], tiny_model)):  # no question counted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate()
        cut = [str(w.message).split(";")[0] for w in caught if "doc_max_length" in str(w.message)]
        assert cut == ["3 of 9 documents exceed doc_max_length=64 tokens"]
    asked = [{**row, "question": " ".join(CORPUS * 3) + "?"} for row in ROWS[:1]]  # told as a question
    with pytest.warns(UserWarning, match="1 questions exceed doc_max_length=64 tokens: the compressor retriever read"):
        evaluate_retrieval(asked, ["compressor"], tiny_model)


@pytest.mark.parametrize("system", ["clara", "control", "text", "none"])
def test_every_system_is_scored_with_its_predictions(tiny_model, system):
    result = evaluate_answers(tiny_model, ROWS, system, k=2, max_new_tokens=3, batch_size=2)
    assert {"em", "f1", "cover_em", "context_positions"} <= result.keys()
    assert [p["question"] for p in result["predictions"]] == [r["question"] for r in ROWS]
    assert 0 <= result["f1_interval"][0] <= result["f1"] <= result["f1_interval"][1] <= 100


def test_clara_reads_a_rows_documents_best_first_whatever_their_order(tiny_model, monkeypatch):
    read = []
    monkeypatch.setattr(tiny_model, "generate", lambda prompts, groups, n: read.extend(groups) or [""] * len(prompts))
    row = ROWS[0]
    evaluate_answers(tiny_model, [row, {**row, "docs": row["docs"][::-1]}], "clara", k=5, max_new_tokens=1)
    memories = tiny_model.compress_documents(row["docs"])
    scores = cosine_scores(tiny_model.encode_queries([row["question"]]), memories, tiny_model.config.retrieval_key)
    best_first = scores[0].argsort(descending=True)
    assert best_first.tolist() != [0, 1, 2]  # the rows' order is not already the best-first one
    assert torch.allclose(read[0], memories[best_first], atol=1e-5) and torch.allclose(read[1], read[0], atol=1e-5)


def test_answers_retrieval_and_the_reading_gain_compress_each_pool_once(tiny_model, monkeypatch):
    # clara eval compressed the same pools again for its retrievers and again for --reading:
    # 4,000 passages twice on the 200 HotpotQA pools, about 20 minutes on 2 cores
    compressed = []
    compress = tiny_model.compress_documents
    monkeypatch.setattr(tiny_model, "compress_documents",
                        lambda docs, **kwargs: compressed.extend(docs) or compress(docs, **kwargs))
    memories = {}
    evaluate_answers(tiny_model, ROWS, "clara", k=3, max_new_tokens=1, memories=memories)
    compressed_once = list(compressed)
    ranked = evaluate_retrieval(ROWS, ["reasoner"], tiny_model, memories=memories)
    read = evaluate_reading(tiny_model, ROWS, k=3, batch_size=2, memories=memories)
    assert compressed == compressed_once == [d for row in ROWS for d in row["docs"]]
    assert ranked == evaluate_retrieval(ROWS, ["reasoner"], tiny_model)
    assert read["reading_gain"] == pytest.approx(evaluate_reading(tiny_model, ROWS, k=3, batch_size=2)["reading_gain"],
                                                 abs=1e-4)


def test_the_control_reads_the_documents_of_the_row_each_shift_after_it(tiny_model, monkeypatch):
    # Each row's documents compress to memories that hold the row's index.
    compressed, read = [], []
    def compress(docs, show_progress=False):
        compressed.append(docs)
        return torch.full((len(docs), 1, 1), float([row["docs"] for row in ROWS].index(docs)))
    monkeypatch.setattr(tiny_model, "compress_documents", compress)
    monkeypatch.setattr(evaluation, "top_k", lambda query, memories, k, key: ([memories], None))
    monkeypatch.setattr(tiny_model, "generate", lambda prompts, groups, n: read.extend(groups) or [""] * len(prompts))
    evaluate_answers(tiny_model, ROWS, "control", k=3, max_new_tokens=1, control_shifts=(1, 2))
    assert [int(group[0, 0, 0]) for group in read] == [1, 2, 0, 2, 0, 1]  # shift 1, then shift 2
    assert compressed == [ROWS[i]["docs"] for i in (1, 2, 0)]  # each row's documents compressed once


def test_clara_and_its_control_share_the_compressed_documents(tiny_model, monkeypatch):
    compressed = []
    compress = tiny_model.compress_documents
    monkeypatch.setattr(tiny_model, "compress_documents", lambda docs, **kwargs: compressed.append(docs) or compress(docs))
    memories = {}
    own = evaluate_answers(tiny_model, ROWS, "clara", k=3, max_new_tokens=2, memories=memories)
    evaluate_answers(tiny_model, ROWS, "control", k=3, max_new_tokens=2, control_shifts=(1, 2), memories=memories)
    alone = evaluate_answers(tiny_model, ROWS, "clara", k=3, max_new_tokens=2)
    assert compressed == [row["docs"] for row in ROWS] * 2  # once for both shared calls, once for the last
    assert [p["prediction"] for p in own["predictions"]] == [p["prediction"] for p in alone["predictions"]]


def test_seconds_per_question_leave_out_compression_whichever_pass_compressed(tiny_model, monkeypatch):
    # clara was charged every pool's compression and its control, reading the same pools, none
    clock = [0.0]
    compress = tiny_model.compress_documents

    def slow_compression(docs, show_progress=False):
        clock[0] += 100.0
        return compress(docs)

    monkeypatch.setattr(tiny_model, "compress_documents", slow_compression)
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    memories = {}
    own = evaluate_answers(tiny_model, ROWS, "clara", k=3, max_new_tokens=2, memories=memories)
    control = evaluate_answers(tiny_model, ROWS, "control", k=3, max_new_tokens=2, memories=memories)
    assert clock[0] == 100.0 * len(ROWS)
    assert own["seconds_per_question"] == control["seconds_per_question"] == 0.0


def test_seconds_per_question_weigh_every_question_alike(tiny_model, monkeypatch):
    # each batch's mean was averaged: a last batch of one question weighed as a whole batch
    clock = [0.0]
    answer = evaluation.read_text

    def one_second_a_batch(*args, **kwargs):
        clock[0] += 1.0
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluation, "read_text", one_second_a_batch)
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    result = evaluate_answers(tiny_model, ROWS, "text", k=3, max_new_tokens=2, batch_size=2)
    batches = -(-len(ROWS) // 2)
    assert result["seconds_per_question"] == round(batches / len(ROWS), 3)


def test_several_control_shifts_average_each_questions_scores(tiny_model, monkeypatch):
    # The stand-in generator answers with the first document it is given.
    monkeypatch.setattr(evaluation, "_clara_answers",
                        lambda model, batch, *_: ([row["docs"][0] for row in batch], [1] * len(batch)))
    rows = [{"question": f"q{i}", "docs": [doc], "answer": "x"} for i, doc in enumerate(["x", "y", "x."])]
    own = evaluate_answers(tiny_model, rows, "clara")
    control = evaluate_answers(tiny_model, rows, "control", control_shifts=(1, 2))
    assert own["question_f1"] == [100, 0, 100]
    assert control["question_f1"] == [50, 100, 50] and control["f1"] == pytest.approx(66.67)
    assert [p["documents_of"] for p in control["predictions"]] == [1, 2, 0, 2, 0, 1]
    above = f1_above_control(own, control)  # per question: +50, -100, +50
    assert above["f1"] == 0.0 and above["interval"][0] < 0 < above["interval"][1]


def test_a_control_that_cannot_give_each_row_other_documents_is_refused(tiny_model):
    with pytest.raises(ValueError, match="a control shift of 3 does not name another of the 3 rows"):
        evaluate_answers(tiny_model, ROWS, "control", control_shifts=(1, 3))
    with pytest.raises(ValueError, match="needs at least 2 rows, got 1"):
        evaluate_answers(tiny_model, ROWS[:1], "control")
    with pytest.raises(ValueError, match="row 0: fewer than 1 other rows hold none of its gold documents"):
        evaluate_answers(tiny_model, [ROWS[0], {**ROWS[0], "question": "again?"}], "control")


def test_the_control_passes_over_rows_that_hold_the_same_documents(tiny_model, monkeypatch):
    # a question and its paraphrase (the same documents, in another order) read each other's
    # documents as "another question's"
    monkeypatch.setattr(evaluation, "_clara_answers",
                        lambda model, batch, *_: ([" ".join(row["docs"]) for row in batch], [1] * len(batch)))
    rows = [{"question": "q0", "docs": ["a", "b"], "answer": "a b"},
            {"question": "q0, again", "docs": ["b", "a"], "answer": "a b"},
            {"question": "q1", "docs": ["c", "d"], "answer": "c d"}]
    control = evaluate_answers(tiny_model, rows, "control", control_shifts=(1,))
    assert [p["documents_of"] for p in control["predictions"]] == [2, 2, 0]
    assert control["f1"] == 0.0
    # a shift past a row's rows of other documents repeated one of its pairings
    with pytest.raises(ValueError, match="row 0: fewer than 2 other rows hold none of its gold"):
        evaluate_answers(tiny_model, rows, "control", control_shifts=(1, 2))


def test_the_token_kinds_of_a_vocabulary_are_found_once(tiny_model, monkeypatch):
    # every probe of a training run walked the whole vocabulary again
    walked = []
    convert = type(tiny_model.tokenizer).convert_ids_to_tokens
    monkeypatch.setattr(type(tiny_model.tokenizer), "convert_ids_to_tokens",
                        lambda self, ids, *a, **k: walked.append(1) or convert(self, ids, *a, **k))
    reading._token_kinds.cache_clear()
    for _ in range(2):
        evaluate_reading(tiny_model, ROWS, k=3)
    assert len(walked) == 1


def test_the_control_passes_over_rows_that_hold_its_gold_passage():
    # an NQ pool filled from other examples held row 192's gold passage: its control read the answer
    rows = [{"question": "q0", "docs": ["gold 0", "a"], "pos_index": [0], "answer": "x"},
            {"question": "q1", "docs": ["gold 1", "gold 0"], "pos_index": [0], "answer": "y"},
            {"question": "q2", "docs": ["gold 2", "b"], "pos_index": [0], "answer": "z"}]
    assert other_rows(rows, 2) == [2, 2, 0]
    assert other_rows(rows, 1) == [1, 2, 0]  # beyond the documents a row reads, it is no evidence
    # a Normal row whose top k missed its gold passage (NQ dev 568): the next row's pool held it,
    # word for word, and gave it back as "another question's documents"
    normal = [{"question": "q0", "docs": ["a", "b"], "pos_index": [], "gold_left_out": ["gold  0"], "answer": "x"},
              {"question": "q1", "docs": ["c", "gold 0"], "pos_index": [], "answer": "y"},  # spaced otherwise
              {"question": "q2", "docs": ["d", "e"], "pos_index": [], "answer": "z"}]
    assert other_rows(normal, 2) == [2, 2, 0]
    # a reconstruction row names no gold passage: another window of its article gave it its title
    windows = [{"data_type": "reconstruct", "docs": [f"{title}\nwindow {n}"], "answers": ["w"]}
               for n, title in enumerate(["Pavia Cathedral", "Pavia Cathedral", "Rome"])]
    assert other_rows(windows, 1) == [2, 2, 0]
    chunks = [{"data_type": "reconstruct", "docs": [f"Handbook\nsection {n}"], "answers": ["s"]} for n in range(3)]
    assert other_rows(chunks, 1) == [1, 2, 0]  # one document's chunks share its title: paired all the same
    with pytest.raises(InvalidInputError, match="control shifts are whole numbers of rows, at least one"):
        control_partners(rows, [])  # a StatisticsError once every pass had run; 1.5 failed in islice
    with pytest.raises(InvalidInputError, match="control shifts are whole numbers of rows"):
        control_partners(rows, [1.5])


def test_a_normal_row_keeps_the_gold_passages_its_top_k_missed():
    from clara_plugins.corpora import QAExample
    from clara_plugins.rows import instruct_rows

    passages = ["Danube\nThe Danube rises in the Black Forest.", *(f"River {i}\nA river flows here." for i in range(5))]
    example = QAExample("q", "which river flows here", ["Black Forest"], passages, [0])
    (row,) = instruct_rows([example], "normal", k=2)
    assert row["pos_index"] == [] and row["gold_missing"] == 1 and row["gold_left_out"] == [passages[0]]


def test_clara_eval_refuses_a_bad_control_or_out_before_it_loads_the_model(tmp_path, monkeypatch, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.setattr("clara_plugins.pretrained.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        main(["eval", str(data), "--systems", "clara", "control", "--control-shifts", "6"])
    assert "a control shift of 6 does not name another of the 3 rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a file in the way of an output: 3, as bench and train say
        main(["eval", str(data), "--out", str(tmp_path)])
    assert exit_.value.code == 3 and f"{tmp_path} is a folder: name the file to write" in \
        capsys.readouterr().err


def test_clara_eval_reads_a_checkpoint_whose_base_model_moved(tiny_model, tiny_base, tmp_path, capsys):
    # the checkpoint names its base model as it was given to train (a relative path): from
    # another folder, or on another machine, nothing could point eval at it
    tiny_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "clara_config.json").read_text())
    config["config"]["base_model"] = "models/moved-away"
    (tmp_path / "ckpt" / "clara_config.json").write_text(json.dumps(config))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    main(["eval", str(data), "--checkpoint", str(tmp_path / "ckpt"), "--base-model", str(tiny_base),
          "--max-new-tokens", "2", "--device", "cpu"])
    assert '"f1"' in capsys.readouterr().out


def test_clara_eval_refuses_rows_it_cannot_read_before_it_loads_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("clara_plugins.pretrained.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "rows.jsonl"
    passage = {"docs": ["Paris is the capital of France."], "answers": ["Paris is the capital of France."],
               "data_type": "paraphrase"}
    no_gold = [{k: v for k, v in row.items() if k != "pos_index"} for row in ROWS]
    for rows, argv, message in [
        ([], [], "there are no rows to evaluate"),
        (ROWS[:1] + [{**ROWS[1], "question": None}], [], "row 1: question must be a non-empty string"),
        (ROWS[:2] + [[ROWS[2]]], [], "row 2: a JSON list, not an object"),
        # an official file where rows go (HotpotQA's is one list on one line; NQ's rows hold ctxs)
        ([[{"_id": "a", "question": "Who?", "context": [["T", ["S."]]], "supporting_facts": [["T", 0]]}]], [],
         "row 0: a JSON list, not an object (a file of HotpotQA or 2WikiMultihopQA records: clara convert-data"),
        ([{"question": "Who?", "answers": ["me"], "ctxs": [{"title": "T", "text": "S."}]}], [],
         "row 0: docs must be a non-empty list of document texts, none blank (a record of NQ or DPR: clara"),
        # SQuAD's context alone is no format the converter reads: not named as one
        ([{"question": "Who?", "answers": ["me"], "context": "S."}], [], "none blank\n"),
        ([passage] * 2, [], "row 0: an SCP row (data_type set), not a question row"),  # answered by no system
        (no_gold, ["--retrievers", "bm25"], "none of these rows has any"),  # statistics' "mean requires ..."
        # a ZeroDivisionError and a recall of -100 % after ranking every pool
        (ROWS[:1] + [{**ROWS[1], "gold_missing": -1}], ["--retrievers", "bm25"], "row 1: gold_missing must count"),
        (ROWS[:1] + [{**ROWS[1], "gold_missing": "1"}], ["--retrievers", "bm25"], "row 1: gold_missing must count"),
        (ROWS[:1] + [{**ROWS[1], "gold_missing": 1, "gold_left_out": "a text"}], ["--systems", "control"],
         "row 1: gold_left_out must list the texts"),  # the control would compare its letters
        # text a UTF-16 tool cut mid-emoji: it failed at its row's batch, after the answers before it
        (ROWS[:1] + [{**ROWS[1], "docs": ["A tweet cut mid-emoji \ud83d", *ROWS[1]["docs"][1:]]}], [],
         "row 1: docs is not valid Unicode text (surrogates not allowed at character 22)"),
        ([passage, {**passage, "answers": ["Paris \udce4"]}], ["--systems", "--reading"],
         "row 1: answers is not valid Unicode text"),
        (ROWS[:1] + [{**ROWS[1], "docs": ROWS[1]["docs"][1:2], "pos_index": [0]}], ["-k", "3", "--reading"],
         "the same number"),
        # a pool longer than k: text read its first k candidates as they stand (a random order)
        (ROWS, ["-k", "2", "--systems", "clara", "text"], "row 0 has 3 documents, more than k=2: text would read"),
        (ROWS, ["-k", "2", "--reading"], "the reading gain would read its first 2"),
        # refused after the model loaded and compressed them
        ([passage, {**passage, "data_type": "reconstruct"}], ["--systems", "--reading"], "reads row 0's evidence"),
    ]:
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(data), *argv])
        assert exit_.value.code == 5 and message in capsys.readouterr().err
    other = {**passage, "docs": ["Rome is the capital of Italy."]}
    evaluation.check_evaluation_rows([passage, other], systems=[], reading_k=5)  # the reading gain alone reads them
    unanswered = [{k: v for k, v in row.items() if k != "answer"} for row in ROWS]
    for rows, message in [([{**passage, "answers": []}] * 2, "row 0: answers must be a non-empty list"),
                          (unanswered, "row 0: it needs an answer")]:  # the reading gain reads the answers
        with pytest.raises(InvalidInputError, match=message):
            evaluation.check_evaluation_rows(rows, systems=[], reading_k=5)


def test_clara_eval_refuses_rows_holding_control_tokens_before_answering(tiny_model, tmp_path, monkeypatch, capsys):
    # a typed "<MEM0>" failed the run at its batch, every answer before it lost; a typed
    # "<|im_end|>" (any of the tokenizer's) ended its prompt's turn and was scored
    tiny_model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(evaluation, "evaluate_answers", lambda *a, **k: pytest.fail("the rows were answered"))
    for typed in ("<MEM0>", tiny_model.tokenizer.eos_token):
        rows = [ROWS[0], {**ROWS[1], "question": f"What does {typed} stand for?"}]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(tmp_path / "rows.jsonl"), "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu",
                  "--systems", "text", "clara"])
        assert exit_.value.code == 5
        assert f"row 1 holds {typed!r}, one of the tokenizer's control tokens" in capsys.readouterr().err


def test_clara_eval_refuses_a_text_reader_for_memory_measures(tiny_model, tmp_path, monkeypatch, capsys):
    # a checkpoint of clara train --stage text was scored as CLaRa: its generator trained on text
    import dataclasses

    from clara_plugins import ClaraModel

    text = ClaraModel(dataclasses.replace(tiny_model.config, decoder_reads_text=True), device="cpu")
    text.save_pretrained(tmp_path / "text")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.setattr(evaluation, "evaluate_answers", lambda *a, **k: pytest.fail("the rows were answered"))
    for argv in (["--systems", "clara"], ["--systems", "--retrievers", "compressor"], ["--systems", "--reading"]):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(tmp_path / "rows.jsonl"), "--checkpoint", str(tmp_path / "text"), "--device", "cpu",
                  *argv])
        assert exit_.value.code == 5 and "is a text reader (clara train --stage text)" in capsys.readouterr().err


def test_clara_eval_and_convert_data_refuse_to_write_over_their_input(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    os.link(data, tmp_path / "alias.jsonl")  # the same file by another name (a bind mount, another case on macOS)
    for argv in (["eval", str(data), "--out", str(data)],
                 ["convert-data", str(data), str(tmp_path / "." / "rows.jsonl"), "--kind", "reconstruct"],
                 ["convert-data", str(data), str(tmp_path / "alias.jsonl"), "--kind", "reconstruct"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "is an input of this run too" in capsys.readouterr().err
        assert data.read_text().count("\n") == len(ROWS)


def test_text_reads_more_positions_than_memory_tokens(tiny_model):
    clara = evaluate_answers(tiny_model, ROWS, "clara", k=3, max_new_tokens=2)
    text = evaluate_answers(tiny_model, ROWS, "text", k=3, max_new_tokens=2)
    none = evaluate_answers(tiny_model, ROWS, "none", k=3, max_new_tokens=2)
    assert none["context_positions"] < clara["context_positions"] < text["context_positions"]


def test_bm25_finds_the_passage_that_shares_the_question_words():
    [result] = evaluate_retrieval(ROWS, ["bm25"], ks=(1,))
    assert result["recall@1"] == 100.0 and result["precision@1"] == 100.0
    with pytest.raises(ValueError, match="retriever must be one of .* got 'tf-idf'"):
        evaluate_retrieval(ROWS, ["bm25", "tf-idf"])


def test_the_compressor_ranks_a_candidate_identical_to_the_question_first(tiny_model):
    rows = [{**row, "docs": [*row["docs"][:2], row["question"]], "pos_index": [2]} for row in ROWS]
    compressor, reasoner = evaluate_retrieval(rows, ["compressor", "reasoner"], tiny_model, ks=(1,))
    assert compressor["retriever"] == "compressor" and compressor["recall@1"] == 100.0
    assert reasoner["retriever"] == "reasoner" and reasoner["examples"] == len(rows)


def test_recall_counts_a_supporting_passage_the_pool_lacks_as_not_found():
    # HotpotQA's dev sample lacks a supporting paragraph for 111 of its first 200 questions:
    # recall counted the present ones alone, and left out a question whose pool had none
    rows = [{**ROWS[0], "gold_missing": 1}, {**ROWS[1], "pos_index": [], "gold_missing": 2}, ROWS[2]]
    [result] = evaluate_retrieval(rows, ["bm25"], ks=(1,))
    assert result["examples"] == 3 and result["question_recall"] == {"1": [50.0, 0.0, 100.0]}


def test_recall_above_pairs_the_questions_of_two_retrievers():
    [bm25] = evaluate_retrieval(ROWS, ["bm25"], ks=(1, 3))  # the gold passage first for every row
    assert bm25["question_recall"] == {"1": [100.0] * 3, "3": [100.0] * 3}
    other = {"retriever": "other", "question_recall": {"1": [0.0, 100.0, 0.0], "3": [100.0] * 3}}
    at_1, at_3 = recall_above(bm25, other)  # per question at k=1: +100, 0, +100
    assert at_1["retriever"] == "bm25" and at_1["over"] == "other" and at_1["k"] == 1
    assert at_1["recall"] == pytest.approx(66.67) and at_1["interval"][0] < 66.67 < at_1["interval"][1]
    assert at_3 == {"retriever": "bm25", "over": "other", "k": 3, "recall": 0.0, "interval": [0.0, 0.0]}
    with pytest.raises(ValueError, match="must score the same questions: got 3 and 1"):  # other rows
        recall_above(bm25, {**other, "question_recall": {"1": [0.0], "3": [0.0]}})


def test_reading_is_refused_when_every_row_reads_the_same_documents(tiny_model):
    same = [{**row, "docs": CORPUS[:3]} for row in ROWS]
    with pytest.raises(ValueError, match="every other row reads row 0.s evidence"):
        evaluate_reading(tiny_model, same, k=3, batch_size=2)


def test_reading_compares_each_row_with_the_next_row_of_other_documents(tiny_model):
    # a synthesised QA row and its paraphrase row share their document: the QA row was "compared" with its own
    def rows_of(document: str, fact: str) -> list[dict]:
        return [{"data_type": "qa", "question": ["What is it?"], "answers": [fact], "docs": [document]},
                {"data_type": "paraphrase", "answers": [fact], "docs": [document]}]

    first, second = rows_of(CORPUS[0], "A tower."), rows_of(CORPUS[3], "A river.")
    as_synthesised = evaluate_reading(tiny_model, first + second, batch_size=4)
    interleaved = evaluate_reading(tiny_model, [first[0], second[0], first[1], second[1]], batch_size=4)
    assert as_synthesised["target_ce_other_documents"] == pytest.approx(interleaved["target_ce_other_documents"],
                                                                       abs=1e-4)


def test_reading_compares_own_and_other_documents(tiny_model):
    result = evaluate_reading(tiny_model, ROWS, k=3, batch_size=2)
    assert result["reading_gain"] != pytest.approx(0.0, abs=1e-4)  # these memories change the answer's CE
    tok, slot = tiny_model.tokenizer, tiny_model.document_placeholder
    with torch.no_grad():
        memories = torch.stack([tiny_model.compress_documents(r["docs"]) for r in ROWS])
        prompts = [question_prompt(tok, r["question"], 3, slot) for r in ROWS]
        log_probs, labels = completion_log_probs(tiny_model, prompts, [question_prompt(tok, r["question"], 3, slot,
                                                                                       r["answer"]) for r in ROWS],
                                                 memories)
        ll, valid = token_log_likelihood(log_probs, labels)
    # the answers' own tokens: the template's turn end ("</s>" here, "<|im_end|>\n" in SmolLM2's) was counted
    stop = tok.convert_tokens_to_ids("</s>")
    answer = valid & (labels != stop)
    assert int(valid.sum() - answer.sum()) == len(ROWS)
    assert result["target_ce_own_documents"] == pytest.approx(float(-(ll * answer).sum() / answer.sum()), abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        evaluate_reading(tiny_model, ROWS[:1], k=3)


def test_reading_splits_the_targets_into_digits_capitalised_tokens_and_the_rest(tiny_model):
    rows = [{"data_type": "reconstruct", "answers": [d], "docs": [d]} for d in CORPUS[:3]]
    result = evaluate_reading(tiny_model, rows)
    kinds = result["by_token_kind"]
    assert set(kinds) == {"digits", "capitalised", "rest"}  # CORPUS[1] has 1889
    tok, slot = tiny_model.tokenizer, tiny_model.document_placeholder
    with torch.no_grad():
        _, counts = completion_log_likelihood(tiny_model, [scp_prompt(tok, slot, "reconstruct")] * 3,
                                              [scp_prompt(tok, slot, "reconstruct", d) for d in CORPUS[:3]],
                                              tiny_model.compress_documents(CORPUS[:3]).unsqueeze(1))
    assert sum(kind["tokens"] for kind in kinds.values()) == int(counts.sum()) - 3  # no turn end ("</s>")
    digit_tokens = sum(any(c.isdigit() for c in tok.decode([i])) for i in tok(" ".join(CORPUS[:3]))["input_ids"])
    assert kinds["digits"]["tokens"] == digit_tokens > 0
    no_digits = [{"data_type": "reconstruct", "answers": [d], "docs": [d]} for d in CORPUS[2:5]]
    assert set(evaluate_reading(tiny_model, no_digits)["by_token_kind"]) == {"capitalised", "rest"}


def test_token_kinds_read_past_the_space_marker(tiny_model):
    tok = tiny_model.tokenizer
    kind_of = reading._token_kinds(tok)
    kind = {token: int(kind_of[tok.convert_tokens_to_ids(token)]) for token in ("ĠB", "P", "1", "Ġthe", "Ġ", ",")}
    assert kind == {"ĠB": 1, "P": 1, "1": 0, "Ġthe": 2, "Ġ": 2, ",": 2}  # 0 digits, 1 capitalised, 2 the rest


def test_reading_works_on_scp_rows_with_one_document_each(tiny_model):
    rows = [{"data_type": "reconstruct", "answers": [d], "docs": [d]} for d in CORPUS[:3]]
    result = evaluate_reading(tiny_model, rows)
    assert result["documents_per_row"] == 1 and result["reading_gain"] != pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="the same number of documents"):
        evaluate_reading(tiny_model, rows + ROWS, k=3)


@pytest.fixture
def saved(tiny_model, tmp_path):
    """The tiny model saved as a checkpoint and ROWS written as a rows file, for `clara eval`."""
    tiny_model.save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(tmp_path / "ckpt"), str(data)


def test_clara_eval_writes_every_measure(saved, tmp_path, capsys):
    checkpoint, data = saved
    main(["eval", data, "--checkpoint", checkpoint, "--systems", "clara", "control", "none",
          "--control-shifts", "1", "2",
          "--retrievers", "bm25", "compressor", "--reading", "-k", "3", "--max-new-tokens", "2", "--device", "cpu",
          "--out", str(tmp_path / "new" / "result.json")])  # its folder is made
    result = json.loads((tmp_path / "new" / "result.json").read_text())
    assert [a["system"] for a in result["answers"]] == ["clara", "control", "none"]
    assert (result["checkpoint"], result["k"], result["max_new_tokens"], result["limit"]) == (checkpoint, 3, 2, None)
    assert result["answers"][1]["shifts"] == [1, 2] and len(result["answers"][1]["predictions"]) == 6
    assert set(result["f1_above_control"]) == {"f1", "interval"}
    assert result["retrieval"][0]["recall@1"] == 100.0
    assert [(d["retriever"], d["over"], d["k"]) for d in result["recall_above"]] == [
        ("bm25", "compressor", 1), ("bm25", "compressor", 3), ("bm25", "compressor", 5)]
    assert result["reading"]["examples"] == 3
    printed = capsys.readouterr().out
    assert '"reading_gain"' in printed and '"f1_above_control"' in printed and '"recall_above"' in printed
    assert '"question_f1"' not in printed and '"question_recall"' not in printed


def test_clara_eval_k_is_a_retrieval_cut_off_and_batch_size_reaches_the_reading_gain(saved, tmp_path,
                                                                                     monkeypatch):
    # -k left retrieval at @1, @3 and @5, and --batch-size never reached --reading
    from clara_plugins import reading

    checkpoint, data = saved
    batch_sizes = []
    real = reading.evaluate_reading
    monkeypatch.setattr(reading, "evaluate_reading",
                        lambda model, rows, k, batch_size, memories: batch_sizes.append(batch_size)
                        or real(model, rows, k, batch_size, memories))
    with pytest.raises(SystemExit) as exit_:  # a checkpoint nothing reads, as any option nothing reads
        main(["eval", data, "--checkpoint", checkpoint, "--systems", "--retrievers", "bm25", "-k", "2"])
    assert exit_.value.code == 5
    main(["eval", data, "--systems", "--retrievers", "bm25", "-k", "2", "--device", "cpu",
          "--out", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"recall@1", "recall@2", "recall@3", "recall@5"} <= result["retrieval"][0].keys()
    # BM25 alone reads no model: none loaded or recorded as read, and the settings behind the numbers kept
    assert (result["checkpoint"], result["compression_rate"], result["k"], result["max_new_tokens"]) == (None, None, 2, None)
    main(["eval", data, "--checkpoint", checkpoint, "--systems", "--reading", "-k", "3", "--batch-size", "1",
          "--device", "cpu"])
    assert batch_sizes == [1]


def test_clara_eval_reads_at_the_asked_compression_rate_and_records_it(saved, tmp_path):
    checkpoint, data = saved
    positions = {}
    for rate in ([], ["--compression-rate", "8"]):
        main(["eval", data, "--checkpoint", checkpoint, *rate, "--systems", "clara", "-k", "3",
              "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "result.json")])
        result = json.loads((tmp_path / "result.json").read_text())
        positions[result["compression_rate"]] = result["answers"][0]["context_positions"]
    assert positions[8] == positions[16] + 3 * 4  # 3 documents of 8 memory tokens instead of 4


def test_clara_eval_answers_the_same_in_any_batch_size(saved, tmp_path):
    checkpoint, data = saved
    results = []
    for batch_size in ("1", "3"):
        main(["eval", data, "--checkpoint", checkpoint, "--systems", "clara", "text", "-k", "3",
              "--max-new-tokens", "4", "--batch-size", batch_size, "--device", "cpu",
              "--out", str(tmp_path / f"batch{batch_size}.json")])
        results.append(json.loads((tmp_path / f"batch{batch_size}.json").read_text()))
    single, batched = ([s["predictions"] for s in r["answers"]] for r in results)
    assert single == batched


def test_text_reading_baseline_uses_the_plain_backbone(tiny_model):
    from clara_plugins.prompts import text_context_prompt

    answers = read_text(tiny_model, ["Who?", "Where?"], [CORPUS[:2], []], max_new_tokens=5)
    prompt = text_context_prompt(tiny_model.tokenizer, "Who?", CORPUS[:2])
    assert CORPUS[0] in prompt and "<MEM0>" not in prompt
    ids = tiny_model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad(), tiny_model.lm.disable_adapter():
        expected = tiny_model.lm.generate(ids, max_new_tokens=5, do_sample=False,
                                          eos_token_id=sorted(tiny_model.stop_token_ids))[0, ids.size(1):]
    text = tiny_model.tokenizer.decode([t for t in expected.tolist() if t not in tiny_model.stop_token_ids],
                                       skip_special_tokens=True).strip()
    assert answers[0] == text.rstrip("\ufffd").rstrip()  # a character cut between its bytes is left out
    with pytest.raises(InvalidInputError, match="documents\\[0\\] must be a list of strings, got str"):
        read_text(tiny_model, ["Who?"], [CORPUS[0]])  # read one character per document before


def test_clara_eval_reads_in_float32_on_every_device_and_records_it(saved, tmp_path, monkeypatch):
    # "auto" is bfloat16 on CUDA: a GPU evaluation read a float32-trained checkpoint in bfloat16, unmarked
    from clara_plugins import ClaraModel

    checkpoint, data = saved
    asked = []
    real = ClaraModel.from_pretrained.__func__
    monkeypatch.setattr(ClaraModel, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: asked.append(kwargs.get("dtype")) or real(cls, *args, **kwargs)))
    main(["eval", data, "--checkpoint", checkpoint, "--systems", "none", "--max-new-tokens", "1", "--device", "cpu",
          "--out", str(tmp_path / "result.json")])
    assert asked == ["float32"] and json.loads((tmp_path / "result.json").read_text())["dtype"] == "float32"
