"""The ``clara`` console script."""

import subprocess
import sys

import pytest

from clara_plugins.cli import main
from clara_plugins.datasets import read_documents


def test_help_explains_every_ask_option():
    result = subprocess.run([sys.executable, "-m", "clara_plugins.cli", "ask", "--help"],
                            capture_output=True, text=True, check=True)
    for option in ("--docs", "--question", "--checkpoint", "--base-model", "--top-k", "--max-new-tokens"):
        assert option in result.stdout


def test_read_documents_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text('{"id": "0", "contents": "DPR text"}\n')
    (tmp_path / "c.json").write_text('[{"title": "T", "text": "body"}]')
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.json")])
    assert docs == ["First paragraph.", "Second paragraph.", "DPR text", "T\nbody"]


def test_ask_answers_from_a_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    docs = ["Paris is in France.", "Berlin is in Germany.", "Rome is in Italy."]
    main(["ask", "--text", *docs, "--question", "Where is Rome?", "--checkpoint", str(tmp_path / "ckpt"),
          "--top-k", "2", "--device", "cpu", "--no-stream"])
    captured = capsys.readouterr()
    assert "retrieved documents" in captured.err
    expected, _ = tiny_model.generate_from_questions(["Where is Rome?"], [docs], k=2)
    assert captured.out.strip() == expected[0]


def test_ask_requires_a_question():
    with pytest.raises(SystemExit):
        main(["ask", "--docs", "text"])


def run_clara(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clara_plugins.cli", *arguments], capture_output=True, text=True)


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
