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


def test_read_documents_from_files_and_text(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text('{"id": "0", "contents": "DPR text"}\n')
    (tmp_path / "c.json").write_text('[{"title": "T", "text": "body"}]')
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.json"), "raw"])
    assert docs == ["First paragraph.", "Second paragraph.", "DPR text", "T\nbody", "raw"]


def test_ask_answers_from_a_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    docs = ["Paris is in France.", "Berlin is in Germany.", "Rome is in Italy."]
    main(["ask", "--docs", *docs, "--question", "Where is Rome?", "--checkpoint", str(tmp_path / "ckpt"),
          "--top-k", "2", "--device", "cpu", "--no-stream"])
    captured = capsys.readouterr()
    assert "retrieved documents" in captured.err
    expected, _ = tiny_model.generate_from_questions(["Where is Rome?"], [docs], k=2)
    assert captured.out.strip() == expected[0]


def test_ask_requires_a_question():
    with pytest.raises(SystemExit):
        main(["ask", "--docs", "text"])
