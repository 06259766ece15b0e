"""The runnable examples in docs/ run offline on the real default model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["langchain_rag.py", "llamaindex_rag.py"])
def test_example_answers_with_text_rag_and_with_clara(example):
    corpus = SHARED_DATA / "corpus" / "2wiki_6119.json"
    if not corpus.exists():
        pytest.skip(f"benchmark samples not found at {corpus}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / example), "--corpus", str(corpus), "--limit", "12"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},  # cache settings kept
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the fourth passage is 300 tokens long: both stores get chunks the compressor reads whole
    assert "exceed doc_max_length" not in result.stderr
    assert "read no memory tokens" not in result.stderr  # said of the text RAG half, which reads none by design
    lines = result.stdout.splitlines()
    assert any(line.startswith("text RAG:") for line in lines)
    assert any(line.startswith("CLaRa:") for line in lines)
    read = [line for line in lines if line.startswith("read as memory tokens:")]
    assert read and int(read[0].split()[4]) == 5  # the retrieved documents, from the store's memory tokens


@pytest.mark.parametrize("example", ["langchain_rag.py", "llamaindex_rag.py"])
def test_an_example_refuses_a_limit_of_nothing_before_it_loads_a_model(example, tmp_path):
    # --limit 0 indexed nothing and answered anyway; -5 left out the last 5 passages; a blank question was
    # answered by text RAG, then refused once every passage was compressed
    (tmp_path / "empty.json").write_text("[]")  # and an empty corpus answered from an empty index
    no_load = ("import runpy, sys; import clara_plugins.pretrained as pretrained; "
               "pretrained.load_model = lambda *a, **k: sys.exit('the model was loaded'); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    for argv, message in [(["--corpus", "x", "--limit", "0"], "must be a positive integer, got 0"),
                          (["--corpus", "x", "--question", " "], "must hold text, got ' '"),
                          (["--corpus", str(tmp_path / "empty.json")], "empty.json holds no passages")]:
        result = subprocess.run([sys.executable, "-c", no_load, str(ROOT / "docs" / "examples" / example), *argv],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_the_langchain_examples_chunks_fit_the_compressor():
    # chunks of 256 by the splitter's count tokenized to 257 and 258: cut by the compressor
    import importlib.util
    import types

    from transformers import AutoTokenizer

    from clara_plugins import ClaraConfig
    from clara_plugins.backbone import default_model_folder
    from clara_plugins.corpora import read_documents

    corpus = SHARED_DATA / "corpus" / "2wiki_6119.json"
    if not corpus.exists():
        pytest.skip(f"benchmark samples not found at {corpus}")
    spec = importlib.util.spec_from_file_location("langchain_rag", ROOT / "docs" / "examples" / "langchain_rag.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    clara = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(default_model_folder()), config=ClaraConfig())
    sizes = [len(clara.tokenizer(chunk, add_special_tokens=False)["input_ids"])
             for passage in read_documents([str(corpus)])[:500] for chunk in example.chunks(clara, passage)]
    assert max(sizes) <= clara.config.doc_max_length
