"""The public API's annotations, as a user's type checker reads them."""

import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clara_plugins", "langchain_clara", "llama_index_clara")

# calls the README and the docstrings show, each accepted when run: a type checker refused them
USER_SCRIPT = '''
from collections.abc import Sequence
from pathlib import Path

from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from llama_index.core.schema import TextNode

from clara_plugins import ClaraModel, MemoryStore, MilvusMemoryStore
from clara_plugins.corpora import read_documents
from clara_plugins.pretrained import load_model
from langchain_clara import ChatClara, ClaraRetriever, ClaraVectorStore
from llama_index_clara import ClaraLLM, ClaraVectorStore as LlamaIndexStore


def use(embedding: Embeddings, model: ClaraModel, ids: list[str], nodes: Sequence[TextNode],
        files: list[Path]) -> MilvusMemoryStore:
    read_documents(files)
    ClaraVectorStore(embedding)  # an embedding alone in the model's place, as LangChain's stores take it
    ClaraVectorStore.load_local("store", embedding)
    store = ClaraVectorStore.from_texts(["a"], model)
    store.add_texts(["a"], ids=ids)
    base: VectorStore = store
    base.add_texts(["a"], ids=ids)
    ClaraRetriever(store=store, k=5)
    ChatClara(store=store)
    ClaraLLM(store=store)
    LlamaIndexStore(store=store).add(nodes)
    MemoryStore(model).upsert(("a", "b"))
    load_model(base_model=Path("qwen"))
    ClaraModel.from_pretrained("checkpoint", base_model=Path("qwen"))
    return MilvusMemoryStore(model, "stores/clara.db")
'''


def test_each_package_marks_its_annotations_for_type_checkers():
    # without py.typed a type checker skips an installed package: every name the user took was Any
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in PACKAGES:
        assert resources.files(package).joinpath("py.typed").is_file(), package
        assert "py.typed" in package_data.get(package, []), package


@pytest.mark.slow
def test_a_users_script_type_checks_against_the_public_api(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(USER_SCRIPT)
    # the sources, as an installed wheel holds them; their own errors are not the user's (silent)
    environment = {**os.environ, "MYPYPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
    result = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-implicit-reexport",
                             "--cache-dir", str(tmp_path / "cache"), "--python-executable", sys.executable, str(script)],
                            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
