"""SCP synthesis with scripted teachers: coverage rounds, drops, resume, framework teachers."""

import json
import os
import shutil

import pytest
import torch
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from llama_index.core.llms import MockLLM

from clara_plugins import InvalidInputError, synthesis
from clara_plugins.cli import main
from clara_plugins.corpora import document_id
from clara_plugins.synthesis import as_teacher, parse_pairs, synthesize, synthesize_document

DOC = "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903."


class ScriptedTeacher:
    """Answers each kind of prompt from a script; records how often coverage was asked."""

    def __init__(self, coverage_replies: list[str]) -> None:
        self.coverage_replies = list(coverage_replies)
        self.coverage_calls = self.missing_calls = 0

    def __call__(self, prompt: str) -> str:
        if prompt.startswith("Read the document and write") and "two or more" in prompt:
            return "Question: Where was the 1903 Physics laureate born?\nAnswer: Warsaw"
        if prompt.startswith("Read the document"):
            return ("Question: Where was Marie Curie born?\nAnswer: Warsaw\n"
                    "Question: Who is her husband?\nAnswer: Pierre Curie")  # not in the document: dropped
        if prompt.startswith("Document:"):
            self.coverage_calls += 1
            return self.coverage_replies.pop(0) if self.coverage_replies else "- the year of her birth"
        if prompt.startswith("Write one simple"):
            self.missing_calls += 1
            return "Question: When was Marie Curie born?\nAnswer: 1867"
        return "Born in Warsaw in 1867, Marie Curie received the 1903 Nobel Prize in Physics."


def test_parse_pairs():
    text = "Question: A?\nAnswer: one\nQuestion: B?\nAnswer: two\nextra line"
    assert parse_pairs(text) == [("A?", "one"), ("B?", "two")]
    # numbered pairs: the first answer used to run on to the end and hide the others
    numbered = "1. Question: A?\nAnswer: one\n2. Question: B\nthat wraps?\nAnswer: two\n3. Question: C?\nAnswer:"
    assert parse_pairs(numbered) == [("A?", "one"), ("B\nthat wraps?", "two")]
    # an answer on the line after "Answer:"; an empty one does not take the next question as its answer
    assert parse_pairs("Question: A?\nAnswer:\nWarsaw") == [("A?", "Warsaw")]
    assert parse_pairs("Question: A?\nAnswer:\n2. Question: B?\nAnswer: two") == [("B?", "two")]


@pytest.mark.parametrize("reply", [
    "Question 1: A?\nAnswer 1: one\nQuestion 2: B?\nAnswer 2: two",
    "**Question:** A?\n**Answer:** one\n\n**Question:** B?\n**Answer:** two",
    "**Question 1:** A?\n**Answer 1:** one\n**Question 2:** B?\n**Answer 2:** two",
    "Q: A?\nA: one\nQ: B?\nA: two",
    "- Q1: A?\n  A1: one\n- Q2: B?\n  A2: two",
    "Question: A? Answer: one\nQuestion: B? Answer: two",
    "**Question: A?**\n**Answer: one**\n• Question: B?\n> Answer: two",
])
def test_pairs_in_the_formats_chat_models_write_are_read(reply):
    # only "Question:" then "Answer:" at a line's start was read: whole documents lost their QA row
    assert parse_pairs(reply) == [("A?", "one"), ("B?", "two")]


def test_a_multiple_choice_option_stays_part_of_its_question():
    reply = "Question: Which city?\nA: Paris\nB: London\nAnswer: B"
    assert parse_pairs(reply) == [("Which city?\nA: Paris\nB: London", "B")]


@pytest.mark.parametrize("none", ["NONE", "NONE.", "None.",  # and with its reasons, which are no facts
                                  "NONE\nAll of the document's facts are covered by the questions above."])
def test_a_teacher_that_finds_every_fact_covered_keeps_its_qa(none):
    # "NONE." counted as a missing fact, so the rounds ran out and the QA row was dropped
    teacher = ScriptedTeacher([none])
    qa, _, _ = synthesize_document(DOC, teacher, max_rounds=1)
    assert qa is not None and teacher.coverage_calls == 1


def test_coverage_is_judged_on_the_pairs_the_row_keeps():
    # a pair whose answer the document lacks was shown to the coverage check, then dropped: the
    # row was written as covered without the fact its question asked for
    class Hallucinating(ScriptedTeacher):
        def __call__(self, prompt: str) -> str:
            if prompt.startswith("Document:"):
                self.coverage_calls += 1
                return "NONE" if "When was Marie Curie born?" in prompt else "- the year of her birth"
            if prompt.startswith("Read the document") and "two or more" not in prompt:
                return "Question: When was Marie Curie born?\nAnswer: 1950"  # the document says 1867
            return super().__call__(prompt)

    teacher = Hallucinating([])
    qa, _, counts = synthesize_document(DOC, teacher, max_rounds=3)
    assert teacher.missing_calls == 1 and ("When was Marie Curie born?", "1867") in zip(qa["question"], qa["answers"])
    assert counts["dropped_pairs"] == 1


def test_missing_facts_are_regenerated_then_coverage_passes():
    teacher = ScriptedTeacher(["- the year of her birth", "NONE"])
    qa, paraphrase, counts = synthesize_document(DOC, teacher, max_rounds=3)
    assert teacher.coverage_calls == 2
    assert qa["question"] == ["Where was Marie Curie born?", "Where was the 1903 Physics laureate born?",
                              "When was Marie Curie born?"]
    assert qa["answers"] == ["Warsaw", "Warsaw", "1867"] and counts["dropped_pairs"] == 1
    assert paraphrase["data_type"] == "paraphrase" and paraphrase["docs"] == [DOC]


def test_qa_still_uncovered_after_the_rounds_is_dropped():
    teacher = ScriptedTeacher([])  # always reports a missing fact
    qa, paraphrase, _ = synthesize_document(DOC, teacher, max_rounds=2)
    # a check, then two rounds of new pairs each checked again; no pairs asked for after the last check
    assert qa is None and teacher.coverage_calls == 3 and teacher.missing_calls == 2 and paraphrase is not None


def test_pairs_written_in_the_last_round_are_checked_and_kept():
    # the last round's pairs were never checked, so with one round regenerated pairs were never kept
    teacher = ScriptedTeacher(["- the year of her birth", "NONE"])
    qa, _, _ = synthesize_document(DOC, teacher, max_rounds=1)
    assert qa is not None and "When was Marie Curie born?" in qa["question"] and teacher.missing_calls == 1


def test_resume_loses_at_most_the_document_in_progress(tmp_path, monkeypatch):
    documents = [(f"d{i}", DOC) for i in range(4)]
    output = tmp_path / "scp.jsonl"
    real = synthesis.synthesize_document
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesis, "synthesize_document", dies_on_third)
    with pytest.raises(RuntimeError):
        synthesize(documents, ScriptedTeacher(["NONE"] * 10), output)
    monkeypatch.setattr(synthesis, "synthesize_document", real)
    report = synthesize(documents, ScriptedTeacher(["NONE"] * 10), output)
    assert report.skipped_done == 2 and report.documents == 2
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == ["d0", "d0", "d1", "d1", "d2", "d2", "d3", "d3"]


def test_clara_synth_resumes_by_text_over_a_corpus_grown_in_front(tmp_path, monkeypatch):
    monkeypatch.setattr(synthesis, "HuggingFaceTeacher", lambda name, **options: ScriptedTeacher(["NONE"] * 10))
    corpus, output = tmp_path / "corpus.txt", tmp_path / "scp.jsonl"
    corpus.write_text(DOC)
    main(["synth", str(corpus), str(output)])
    corpus.write_text(f"The Danube flows through Vienna and Budapest to the Black Sea.\n\n{DOC}")
    main(["synth", str(corpus), str(output)])  # the new first passage is synthesised, the old one skipped
    ids = [json.loads(line)["doc_id"] for line in output.read_text().splitlines()]
    assert ids[:2] == [document_id(DOC)] * 2 and set(ids[2:]) == {document_id(corpus.read_text().split("\n\n")[0])}


def test_clara_synth_refuses_to_resume_with_another_teacher_and_a_gz_output(tmp_path, monkeypatch):
    # another --teacher's rows were appended to the first one's, unsaid; a .gz output was written
    # plain, and its own resume then refused it as a broken gzip file
    def teacher(name, **options):
        scripted = ScriptedTeacher(["NONE"] * 10)
        scripted.name_or_path = name
        return scripted

    monkeypatch.setattr(synthesis, "HuggingFaceTeacher", teacher)
    corpus, output = tmp_path / "corpus.txt", tmp_path / "scp.jsonl"
    corpus.write_text(DOC)
    main(["synth", str(corpus), str(output), "--teacher", "teacher-a"])
    before = output.read_text()
    corpus.write_text(f"{DOC}\n\nThe Danube flows through Vienna and Budapest to the Black Sea.")
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(corpus), str(output), "--teacher", "teacher-b"])
    assert exit_info.value.code == 5 and output.read_text() == before
    main(["synth", str(corpus), str(output), "--teacher", "teacher-a"])  # the same teacher resumes
    assert len({json.loads(line)["doc_id"] for line in output.read_text().splitlines()}) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(corpus), str(tmp_path / "scp.jsonl.gz")])
    assert exit_info.value.code == 5 and not (tmp_path / "scp.jsonl.gz").exists()


def test_a_teacher_named_by_a_path_resumes_and_a_gz_output_is_refused(tmp_path):
    # the Path went into every ledger mark: each run failed on JSON after its first document
    teacher = ScriptedTeacher(["NONE"] * 10)
    teacher.name_or_path = tmp_path / "teacher"
    output = tmp_path / "scp.jsonl"
    synthesize([("a", DOC)], teacher, output)
    assert synthesize([("a", DOC), ("b", DOC + " Later.")], teacher, output).skipped_done == 1
    with pytest.raises(InvalidInputError, match="without .gz"):
        synthesize([("a", DOC)], teacher, tmp_path / "scp.jsonl.GZ")


def test_a_resume_with_other_settings_is_refused_and_a_ledger_without_them_resumes(tmp_path):
    # the first documents' rows were checked for three rounds, the rest for none, and read as one run's
    output = tmp_path / "scp.jsonl"
    synthesize([("a", DOC)], ScriptedTeacher(["NONE"] * 10), output, max_rounds=3)
    before = output.read_text(), (tmp_path / "scp.jsonl.done").read_text()
    for settings in ({"max_rounds": 0}, {"simple": 1}):
        with pytest.raises(InvalidInputError, match=r"with the settings \{'simple': 3, 'complex_': 2, 'max_rounds': 3\}"):
            synthesize([("a", DOC), ("b", DOC + " Later.")], ScriptedTeacher(["NONE"] * 10), output, **settings)
        assert (output.read_text(), (tmp_path / "scp.jsonl.done").read_text()) == before
    ledger = tmp_path / "scp.jsonl.done"  # written before marks held settings: resumed as it was
    ledger.write_text(json.dumps({k: v for k, v in json.loads(before[1]).items() if k != "settings"}) + "\n")
    report = synthesize([("a", DOC), ("b", DOC + " Later.")], ScriptedTeacher(["NONE"] * 10), output, max_rounds=0)
    assert (report.skipped_done, report.documents) == (1, 1)


def test_clara_synth_reads_a_repeated_passage_once(tmp_path, monkeypatch):
    monkeypatch.setattr(synthesis, "HuggingFaceTeacher", lambda name, **options: ScriptedTeacher(["NONE"] * 10))
    corpus, output = tmp_path / "corpus.txt", tmp_path / "scp.jsonl"
    corpus.write_text(f"{DOC}\n\n{DOC}")
    main(["synth", str(corpus), str(output)])
    assert [json.loads(line)["doc_id"] for line in output.read_text().splitlines()] == [document_id(DOC)] * 2


def test_resume_drops_a_row_cut_short_by_a_kill(tmp_path):
    documents = [(f"d{i}", DOC) for i in range(2)]
    output = tmp_path / "scp.jsonl"
    synthesize(documents[:1], ScriptedTeacher(["NONE"] * 10), output)
    with open(output, "a") as rows:
        rows.write('{"doc_id": "d1", "data_ty')  # the kill came mid-line, before d1's ledger mark
    with open(tmp_path / "scp.jsonl.done", "a") as marks:
        marks.write('{"doc_i')  # or while a mark was written
    report = synthesize(documents, ScriptedTeacher(["NONE"] * 10), output)
    assert report.skipped_done == 1 and report.documents == 1
    assert [json.loads(line)["doc_id"] for line in output.read_text().splitlines()] == ["d0", "d0", "d1", "d1"]
    ledger = (tmp_path / "scp.jsonl.done").read_text().splitlines()
    assert [json.loads(line)["doc_id"] for line in ledger] == ["d0", "d1"]


def test_a_resume_refuses_rows_no_run_left_instead_of_dropping_them(tmp_path):
    # every row of a document the ledger does not mark was dropped, wherever it stood (a row
    # without doc_id failed on a bare KeyError)
    output = tmp_path / "scp.jsonl"
    synthesize([("d0", DOC), ("d1", DOC)], ScriptedTeacher(["NONE"] * 10), output)
    rows = output.read_text().splitlines()
    for foreign in ('{"doc_id": "other", "answers": ["mine"]}', '{"answers": ["mine"]}'):
        output.write_text("\n".join([rows[0], foreign, *rows[1:]]) + "\n")
        before = output.read_text()
        with pytest.raises(InvalidInputError, match="row 2 (has no doc_id|is of a document its ledger does not mark)"):
            synthesize([("d0", DOC), ("d1", DOC), ("d2", DOC)], ScriptedTeacher(["NONE"] * 10), output)
        assert output.read_text() == before
    # after a power loss the last marks may be lost, not the rows fsynced before them: redone
    output.write_text("\n".join(rows) + "\n")
    ledger = tmp_path / "scp.jsonl.done"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")
    report = synthesize([("d0", DOC), ("d1", DOC), ("d2", DOC)], ScriptedTeacher(["NONE"] * 10), output)
    assert (report.skipped_done, report.documents) == (1, 2)
    assert [json.loads(line)["doc_id"] for line in output.read_text().splitlines()] == ["d0", "d0", "d1", "d1", "d2", "d2"]
    with pytest.raises(InvalidInputError, match="document ids must be strings, got int 0"):
        synthesize([(0, DOC)], ScriptedTeacher(["NONE"] * 10), tmp_path / "ints.jsonl")
    assert not (tmp_path / "ints.jsonl").exists()


def test_a_document_given_twice_is_asked_once(tmp_path):
    teacher = ScriptedTeacher(["NONE"] * 10)
    report = synthesize([("a", DOC), ("a", DOC)], teacher, tmp_path / "scp.jsonl")
    assert (report.documents, report.skipped_done, teacher.coverage_calls) == (1, 1, 1)
    assert len((tmp_path / "scp.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "scp.jsonl.done").read_text().splitlines()) == 1


def test_a_document_too_long_for_the_teacher_is_marked_and_the_rest_go_on(tmp_path):
    # every run, and every resume, stopped at it with "no room for a reply", naming no passage
    script = ScriptedTeacher(["NONE"] * 10)

    def teacher(prompt: str) -> str:
        if "too long" in prompt:
            raise synthesis.PromptTooLongError("the teacher's prompt takes all of its positions")
        return script(prompt)

    documents = [("d0", DOC), ("long", DOC + " It is too long."), ("d2", DOC)]
    with pytest.warns(UserWarning, match="1 documents are too long for the teacher .*: long"):
        report = synthesize(documents, teacher, tmp_path / "scp.jsonl")
    assert (report.documents, report.too_long, report.dropped_documents_qa, report.dropped_paraphrases) == (3, 1, 0, 0)
    assert [json.loads(line)["doc_id"] for line in (tmp_path / "scp.jsonl").read_text().splitlines()] == [
        "d0", "d0", "d2", "d2"]
    assert synthesize(documents, teacher, tmp_path / "scp.jsonl").skipped_done == 3


def test_a_second_synthesis_run_on_one_output_is_refused(tmp_path):
    # it rewrote the files the first went on appending to, and the first's rows were lost
    from clara_plugins.atomic import hold_lock

    with hold_lock(tmp_path / ".scp.jsonl.lock"):
        with pytest.raises(InvalidInputError, match="another synthesis run is writing"):
            synthesize([("d0", DOC)], ScriptedTeacher(["NONE"] * 10), tmp_path / "scp.jsonl")

    def blocked(prompt: str) -> str:  # a teacher's own error is its own, not a second run
        raise BlockingIOError(11, "a non-blocking pipe")

    with pytest.raises(BlockingIOError, match="a non-blocking pipe"):
        synthesize([("d0", DOC)], blocked, tmp_path / "scp.jsonl")
    assert synthesize([("d0", DOC)], ScriptedTeacher(["NONE"] * 10), tmp_path / "new" / "scp.jsonl").documents == 1


def test_a_second_synthesis_run_on_one_output_from_another_thread_is_refused(tmp_path):
    # the lock was kept for the whole process: a run started in a second thread while the first
    # asked its teacher rewrote the output, and the first's rows were lost, unsaid
    import threading

    asking, answer = threading.Event(), threading.Event()

    def slow_teacher(prompt: str) -> str:
        asking.set()
        answer.wait(30)
        return "NONE"

    first = threading.Thread(target=synthesize, args=([("d0", DOC)], slow_teacher, tmp_path / "scp.jsonl"))
    first.start()
    try:
        assert asking.wait(30)
        with pytest.raises(InvalidInputError, match="another synthesis run is writing"):
            synthesize([("d1", DOC)], ScriptedTeacher(["NONE"] * 10), tmp_path / "scp.jsonl")
    finally:
        answer.set()
        first.join(30)
    assert synthesize([("d0", DOC)], ScriptedTeacher([]), tmp_path / "scp.jsonl").skipped_done == 1


def test_a_ledger_that_marks_none_of_the_documents_is_refused(tmp_path):
    output = tmp_path / "scp.jsonl"
    synthesize([("0", DOC)], ScriptedTeacher(["NONE"] * 10), output)  # ids by position, as clara synth gave them
    before = output.read_text()
    with pytest.raises(InvalidInputError, match="scp.jsonl.done marks none of these documents done"):
        synthesize([(document_id(DOC), DOC)], ScriptedTeacher(["NONE"] * 10), output)
    assert output.read_text() == before


def test_no_coverage_rounds_is_refused_before_any_document_is_marked_done(tmp_path):
    output = tmp_path / "scp.jsonl"
    with pytest.raises(InvalidInputError, match="max_rounds must be at least 0, got -1"):
        synthesize([(document_id(DOC), DOC)], ScriptedTeacher(["NONE"] * 10), output, max_rounds=-1)
    assert not output.exists() and not output.with_name("scp.jsonl.done").exists()


def test_an_output_without_its_ledger_is_left_alone(tmp_path):
    output = tmp_path / "scp.jsonl"
    output.write_text('{"doc_id": "mine", "answers": ["kept"]}\n')
    with pytest.raises(InvalidInputError, match="scp.jsonl exists without scp.jsonl.done"):
        synthesize([("d0", DOC)], ScriptedTeacher(["NONE"] * 10), output)
    assert output.read_text() == '{"doc_id": "mine", "answers": ["kept"]}\n'
    output.unlink()  # a user starting over, the ledger left behind: every document would be skipped
    (tmp_path / "scp.jsonl.done").write_text('{"doc_id": "d0"}\n')
    with pytest.raises(InvalidInputError, match="scp.jsonl.done exists without scp.jsonl"):
        synthesize([("d0", DOC)], ScriptedTeacher(["NONE"] * 10), output)


def test_clara_synth_refuses_a_bad_output_before_it_loads_the_teacher(tmp_path, monkeypatch, capsys):
    # the teacher model loaded first: minutes for a large one, before an error that needs none
    from clara_plugins import backbone

    monkeypatch.setattr(backbone, "load_base_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    (tmp_path / "corpus.txt").write_text(DOC)
    (tmp_path / "scp.jsonl").write_text('{"doc_id": "mine"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "corpus.txt"), str(tmp_path / "scp.jsonl")])
    assert exit_.value.code == 5 and "exists without scp.jsonl.done" in capsys.readouterr().err


def test_clara_synth_refuses_a_teacher_that_names_no_model_before_it_writes(tiny_base, tmp_path, capsys):
    # the teacher loaded at its first prompt, after the output and its ledger were made
    (tmp_path / "corpus.txt").write_text(DOC)
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "corpus.txt"), str(tmp_path / "scp.jsonl"), "--teacher",
              str(tmp_path / "no-such-model")])
    assert exit_.value.code == 3 and "could not load base model" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.txt"]
    (tmp_path / "config-alone").mkdir()  # a config without a tokenizer: refused at the first prompt, after
    shutil.copy(tiny_base / "config.json", tmp_path / "config-alone")
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "corpus.txt"), str(tmp_path / "scp.jsonl"), "--teacher",
              str(tmp_path / "config-alone")])
    assert exit_.value.code == 5 and "Couldn't instantiate the backend tokenizer" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config-alone", "corpus.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_hugging_face_teacher_refuses_a_device_torch_does_not_see_before_it_writes(tiny_base, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(DOC)
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "corpus.txt"), str(tmp_path / "scp.jsonl"), "--teacher", str(tiny_base),
              "--device", "cuda"])
    assert exit_.value.code == 5 and "device 'cuda'" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.txt"]


def test_a_teacher_named_by_a_relative_path_is_kept_as_its_folder(tiny_base, tmp_path, monkeypatch):
    # "./model" resumed from another folder named another teacher, and its rows were mixed in
    monkeypatch.chdir(tiny_base.parent)
    teacher = synthesis.HuggingFaceTeacher(f"./{tiny_base.name}")
    assert teacher.name_or_path == str(tiny_base)
    monkeypatch.setenv("HOME", str(tiny_base.parent))  # "~/model" was checked as written: no folder to transformers
    assert synthesis.HuggingFaceTeacher(f"~/{tiny_base.name}").name_or_path == str(tiny_base)
    # a ledger that recorded it as typed resumes with it
    output = tmp_path / "scp.jsonl"
    output.write_text('{"doc_id": "d0"}\n')
    (tmp_path / "scp.jsonl.done").write_text(json.dumps({"doc_id": "d0", "teacher": f"./{tiny_base.name}"}) + "\n")
    assert synthesize([("d0", DOC)], teacher, output).skipped_done == 1


def test_a_hugging_face_teacher_stops_at_its_templates_turn_end(tiny_base, monkeypatch):
    # only the generation config's end of sequence stopped it (Llama 3's <|eot_id|> is not
    # one): replies ran on into made-up turns up to the limit
    from clara_plugins import prompts

    teacher = synthesis.HuggingFaceTeacher(str(tiny_base), max_new_tokens=2, device="cpu")
    teacher("Hi")  # the weights load at the first prompt
    turn_end = teacher.tokenizer.convert_tokens_to_ids("<unk>")
    monkeypatch.setattr(prompts, "turn_end_token", lambda tokenizer, end=None: turn_end)
    asked, generate = [], teacher.model.generate
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: asked.append(settings["eos_token_id"])
                        or generate(ids, **settings))
    teacher("Hi")
    assert turn_end in asked[0] and teacher.tokenizer.eos_token_id in asked[0]


def test_clara_synth_refuses_a_corpus_without_passages(tmp_path, capsys):
    # it wrote an empty output and ledger and exited 0
    (tmp_path / "corpus.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_:
        main(["synth", str(tmp_path / "corpus.json"), str(tmp_path / "scp.jsonl")])
    assert exit_.value.code == 5 and "holds no passages" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.json"]


def test_langchain_and_llama_index_models_are_teachers():
    chat = FakeListChatModel(responses=["Question: Where?\nAnswer: Warsaw"])
    assert parse_pairs(as_teacher(chat)("any prompt")) == [("Where?", "Warsaw")]
    llm = MockLLM(max_tokens=3)
    assert isinstance(as_teacher(llm)("hello there"), str)
    # a reply of content blocks was read as its Python repr; a chain that returns a string failed
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.output_parsers import StrOutputParser

    blocks = GenericFakeChatModel(messages=iter([AIMessage(content=[
        {"type": "text", "text": "Question: Where?\nAnswer: Warsaw"}])]))
    assert parse_pairs(as_teacher(blocks)("any prompt")) == [("Where?", "Warsaw")]

    chain = FakeListChatModel(responses=["Question: Who?\nAnswer: Curie"]) | StrOutputParser()
    assert parse_pairs(as_teacher(chain)("any prompt")) == [("Who?", "Curie")]


def test_a_framework_teachers_reply_cut_at_its_token_limit_keeps_no_cut_answer_or_paraphrase():
    # a LangChain or LlamaIndex teacher with max_tokens: "Marie" of "Marie Curie" was kept as
    # supported (a prefix of the document's words), and a paraphrase cut mid-sentence was written
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from llama_index.core.base.llms.types import CompletionResponse

    def cut(text):
        return AIMessage(content=text, response_metadata={"finish_reason": "length"})

    replies = [cut("Question: Where was she born?\nAnswer: Warsaw\nQuestion: Who won?\nAnswer: Marie"),
               cut("Question: When?\nAnswer: 18"), AIMessage(content="NONE"),
               cut("Marie Curie, born in Warsaw in 1867, won the Nobel Prize in Physics in")]
    qa, paraphrase, _ = synthesize_document(DOC, as_teacher(GenericFakeChatModel(messages=iter(replies))))
    assert qa["question"] == ["Where was she born?"] and qa["answers"] == ["Warsaw"] and paraphrase is None

    class Completions:  # a LlamaIndex LLM whose reply carries OpenAI's finish reason in its raw response
        def complete(self, prompt):
            return CompletionResponse(text="Question: Who?\nAnswer: Mar", raw={"choices": [{"finish_reason": "length"}]})

    reply = as_teacher(Completions())("Ask.")
    assert reply == "Question: Who?" and isinstance(reply, synthesis.CutReply)
    # Bedrock's stopReason and OpenAI's Responses API (incomplete_details) say it in their own words
    for metadata in ({"stopReason": "max_tokens"}, {"status": "incomplete",
                                                    "incomplete_details": {"reason": "max_output_tokens"}}):
        said = GenericFakeChatModel(messages=iter([AIMessage(content="Question: Who?\nAnswer: Mar",
                                                             response_metadata=metadata)]))
        assert isinstance(as_teacher(said)("Ask."), synthesis.CutReply)
    whole = GenericFakeChatModel(messages=iter([AIMessage(content="Question: Who?\nAnswer: Marie Curie\n",
                                                          response_metadata={"finish_reason": "stop"})]))
    assert not isinstance(as_teacher(whole)("Ask."), synthesis.CutReply)


def test_a_coverage_prompt_too_long_for_the_teacher_keeps_the_paraphrase():
    # the document fit, then the coverage prompt (the document and every question) did not: the
    # document lost its paraphrase too, and was reported as too long for the teacher
    script = ScriptedTeacher([])

    def teacher(prompt: str) -> str:
        if prompt.startswith("Document:"):
            raise synthesis.PromptTooLongError("the teacher's prompt takes all of its positions")
        return script(prompt)

    qa, paraphrase, _ = synthesize_document(DOC, teacher)
    assert qa is None and paraphrase is not None


def test_a_paraphrase_loses_the_line_a_chat_model_opens_it_with():
    def teacher(prompt: str) -> str:
        if prompt.startswith("Rewrite"):
            return "Here is the rewritten document:\n\nBorn in Warsaw in 1867, Marie Curie won the 1903 Physics prize."
        return ScriptedTeacher(["NONE"])(prompt)

    _, paraphrase, _ = synthesize_document(DOC, teacher)
    assert paraphrase["answers"] == ["Born in Warsaw in 1867, Marie Curie won the 1903 Physics prize."]
    assert synthesis._without_preamble("Her prizes were:\nPhysics, 1903.", DOC) == "Her prizes were:\nPhysics, 1903."
    assert synthesis._without_preamble("**Sure! Here's a paraphrase:**\nShe won.", DOC) == "She won."
    # a document's own first words are no preamble, however they begin (they lost the row its subject)
    for own in ("OK Computer track listing:\n1. Airbag", "Below Zero cast:\nJane Doe as Ann"):
        assert synthesis._without_preamble(own, own.replace("\n", " and ")) == own


def test_a_ledger_line_or_a_text_no_run_wrote_is_refused_by_name(tmp_path):
    # a KeyError 'doc_id' (or an AttributeError) once the ledger was rewritten; a None text failed
    # in the answer check once the output and its ledger were made
    with pytest.raises(InvalidInputError, match=r"documents\[0\] is a NoneType, not a string"):
        synthesize([("a", None)], ScriptedTeacher(["NONE"]), tmp_path / "none.jsonl")
    assert list(tmp_path.iterdir()) == []
    for mark in ('{"id": "a"}', '["a"]'):
        (tmp_path / "scp.jsonl").write_text("")
        (tmp_path / "scp.jsonl.done").write_text(mark + "\n")
        with pytest.raises(InvalidInputError, match="scp.jsonl.done line 1 has no doc_id"):
            synthesize([("a", DOC)], ScriptedTeacher(["NONE"]), tmp_path / "scp.jsonl")
        assert (tmp_path / "scp.jsonl.done").read_text() == mark + "\n"


def test_a_hugging_face_teacher_runs_on_the_device_it_is_given(tiny_base, monkeypatch):
    # it always loaded in float32 on the CPU, a GPU beside it or not
    from clara_plugins import backbone

    asked = []
    resolve = backbone.resolve_device
    monkeypatch.setattr(backbone, "resolve_device", lambda device: asked.append(device) or resolve(device))
    teacher = synthesis.HuggingFaceTeacher(str(tiny_base), max_new_tokens=2, device="cpu", dtype="bfloat16")
    assert isinstance(teacher("Write one question."), str)
    assert asked == ["cpu"]  # "auto" would pick a GPU where there is one
    assert teacher.model.device.type == "cpu" and teacher.model.dtype == backbone.torch.bfloat16


def test_a_hugging_face_teachers_reply_may_be_twice_as_long_as_its_prompt(tiny_base, monkeypatch):
    # a fixed 256 new tokens cut the paraphrase of a long passage mid-sentence, and the cut one was kept
    teacher = synthesis.HuggingFaceTeacher(str(tiny_base), max_new_tokens=1, device="cpu")
    teacher("Write one question.")  # the weights load at the first prompt
    teacher.max_new_tokens = None  # the default
    asked, generate = [], teacher.model.generate
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: asked.append(
        (ids.size(1), settings["max_new_tokens"])) or generate(ids, **{**settings, "max_new_tokens": 1}))
    teacher("Paraphrase: " + "word " * 400)
    teacher("Hi")
    (long_prompt, long_reply), (short_prompt, short_reply) = asked
    assert long_reply == 2 * long_prompt > 256 and short_reply == 256 > 2 * short_prompt


def test_an_answer_written_with_a_possessive_or_a_hyphen_is_in_its_document():
    # "Poland" was not found in "Poland's", nor "lay-abbot" in "lay- abbot": good pairs were dropped
    assert synthesis._supported("Poland", "Warsaw is Poland's capital.")
    assert synthesis._supported("lay-abbot", "He was lay- abbot of St. Maurice's Abbey.")
    assert synthesis._supported("St. Maurice", "He was lay- abbot of St. Maurice's Abbey.")
    assert not synthesis._supported("Krakow", "Warsaw is Poland's capital.")



def test_a_hugging_face_teacher_without_a_chat_template_reads_the_plain_layout_within_its_positions(tiny_base,
                                                                                                    monkeypatch):
    # apply_chat_template failed on a model without one, and a reply could run past its positions
    teacher = synthesis.HuggingFaceTeacher(str(tiny_base), max_new_tokens=1, device="cpu")
    teacher("Write one question.")  # the weights load at the first prompt
    teacher.tokenizer.chat_template = None
    teacher.max_new_tokens = None
    teacher.model.config.max_position_embeddings = 300
    asked, generate = [], teacher.model.generate
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: asked.append(
        (ids.size(1), settings["max_new_tokens"])) or generate(ids, **{**settings, "max_new_tokens": 1}))
    assert isinstance(teacher("Paraphrase: " + "word " * 40), str)
    (prompt, limit), = asked
    assert prompt + limit == 300
    with pytest.raises(InvalidInputError, match="all of its 300 positions: no room for a reply"):
        teacher("Paraphrase: " + "word " * 400)


def test_a_none_line_among_missing_facts_is_no_fact():
    # "NONE!" after a fact was asked about as a fact of its own
    asked = []

    class Recording(ScriptedTeacher):
        def __call__(self, prompt):
            if prompt.startswith("Write one simple"):
                asked.append(prompt.split("Facts:\n")[1].split("\n\nDocument:")[0])
            return super().__call__(prompt)

    synthesize_document(DOC, Recording(["- the year of her birth\nNONE!", "NONE"]), max_rounds=1)
    assert asked == ["the year of her birth"]


def test_an_empty_coverage_reply_covers_nothing_and_a_question_writing_its_answer_is_dropped():
    # "" found no missing fact, so the row was kept unchecked; a pair whose question wrote its
    # answer ("Is Warsaw ...?" "Warsaw") trained the restating a weak reader falls into
    assert synthesize_document(DOC, ScriptedTeacher([""] * 5), max_rounds=2)[0] is None

    class Restating(ScriptedTeacher):
        def __call__(self, prompt: str) -> str:
            if prompt.startswith("Read the document") and "two or more" not in prompt:
                return "Question: Was Marie Curie born in Warsaw?\nAnswer: Warsaw"
            return super().__call__(prompt)

    qa, _, counts = synthesize_document(DOC, Restating(["NONE"]), max_rounds=1)
    assert qa["question"] == ["Where was the 1903 Physics laureate born?"] and counts["dropped_pairs"] == 1
    assert not synthesis._restates("Was she born in Warsaw or Paris?", "Warsaw")  # a choice offered
    assert not synthesis._restates("Who was born first, Marie Curie or Pierre Curie?", "Pierre Curie")
    assert synthesis._restates("Did Marie Curie win the Nobel Prize in Physics or Chemistry?", "Marie Curie")


def test_a_resume_says_how_many_passages_the_corpus_no_longer_has(tmp_path):
    output = tmp_path / "scp.jsonl"
    synthesize([("a", DOC), ("b", DOC + " Edited later.")], ScriptedTeacher(["NONE"] * 10), output)
    with pytest.warns(UserWarning, match="holds the rows of 1 passages not among these"):
        synthesize([("a", DOC), ("b2", DOC + " Edited.")], ScriptedTeacher(["NONE"] * 10), output)
    assert {json.loads(line)["doc_id"] for line in output.read_text().splitlines()} == {"a", "b", "b2"}  # kept


def test_a_hugging_face_teachers_reply_cut_at_its_limit_loses_its_unfinished_line(tiny_base, monkeypatch):
    # "Answer: January 26" of "January 26, 1977" was kept: a prefix of the document's answer is in it
    teacher = synthesis.HuggingFaceTeacher(str(tiny_base), max_new_tokens=1, device="cpu")
    teacher("Write one question.")  # the weights load at the first prompt
    reply = teacher.tokenizer("Question: Who?\nAnswer: Jan", add_special_tokens=False, return_tensors="pt").input_ids
    teacher.max_new_tokens = reply.size(1)
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: torch.cat([ids, reply], 1))
    assert teacher("Ask.") == "Question: Who?"
    teacher.max_new_tokens = reply.size(1) + 1  # it stopped before the limit: finished
    assert teacher("Ask.") == "Question: Who?\nAnswer: Jan"
    whole = teacher.tokenizer("Question: Who?\nAnswer: Jan\n", add_special_tokens=False, return_tensors="pt").input_ids
    teacher.max_new_tokens = whole.size(1)  # at the limit, its last line finished
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: torch.cat([ids, whole], 1))
    assert teacher("Ask.") == "Question: Who?\nAnswer: Jan"
    ended = torch.cat([reply, torch.tensor([[teacher.tokenizer.eos_token_id]])], 1)
    teacher.max_new_tokens = ended.size(1)  # or at it, with its end of sequence
    monkeypatch.setattr(teacher.model, "generate", lambda ids, **settings: torch.cat([ids, ended], 1))
    assert teacher("Ask.") == "Question: Who?\nAnswer: Jan"


def test_a_question_asked_again_keeps_its_first_answer():
    # both pairs were kept, and the generator was taught two answers to one question
    class Repeating(ScriptedTeacher):
        def __call__(self, prompt: str) -> str:
            if prompt.startswith("Read the document") and "two or more" not in prompt:
                return ("Question: When was Marie Curie born?\nAnswer: 1867\n"
                        "Question: When was Marie Curie born?\nAnswer: Warsaw")  # both in the document
            return super().__call__(prompt)

    qa, _, counts = synthesize_document(DOC, Repeating(["NONE"]), max_rounds=1)
    assert [a for q, a in zip(qa["question"], qa["answers"]) if q == "When was Marie Curie born?"] == ["1867"]
    assert counts["dropped_pairs"] == 1


def test_a_documents_rows_reach_the_disk_before_its_mark(tmp_path, monkeypatch):
    # flushed alone, after a power loss the ledger's line could survive its rows: skipped for good
    output = tmp_path / "scp.jsonl"
    ledger = output.with_name(output.name + ".done")
    synced, fsync = [], synthesis.os.fsync  # each file synced, and the marks the ledger held by then
    monkeypatch.setattr(synthesis.os, "fsync", lambda fd: synced.append(
        (os.readlink(f"/proc/self/fd/{fd}"), ledger.read_text().count("\n"))) or fsync(fd))
    synthesize([("d0", DOC)], ScriptedTeacher(["NONE"] * 10), output)
    assert (str(output), 0) in synced and ledger.read_text().count("\n") == 1
