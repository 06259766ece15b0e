"""ClaraEmbedding: CLaRa's compressor seen as a LlamaIndex embedding model."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import ConfigDict, Field, PrivateAttr

from clara_plugins import ClaraModel
from clara_plugins.dense import DenseRetriever

_KEEP = 8192  # compressed texts remembered until a store takes them


class ClaraEmbedding(BaseEmbedding):
    """Texts -> the mean of their memory tokens (encoder), queries -> of the query reasoner's.

    LlamaIndex's ``VectorStoreIndex`` embeds every node before handing it to a vector store.
    CLaRa's store retrieves with the full memory tokens, so this model remembers the memory
    tokens it computed and ``ClaraVectorStore.add`` takes them instead of compressing twice.
    The pooled vector is a usable embedding for any other LlamaIndex vector store.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    clara: ClaraModel
    model_name: str = "clara-memory-tokens"
    _recent: OrderedDict = PrivateAttr(default_factory=OrderedDict)

    @classmethod
    def class_name(cls) -> str:
        return "ClaraEmbedding"

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        memories = self.clara.compress_documents(texts)
        for text, memory in zip(texts, memories):
            self._recent[text] = memory
            self._recent.move_to_end(text)
        while len(self._recent) > _KEEP:
            self._recent.popitem(last=False)
        return F.normalize(memories.mean(dim=1), dim=-1).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return F.normalize(self.clara.encode_queries([query]).mean(dim=1), dim=-1)[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def take_memories(self, texts: list[str]) -> torch.Tensor:
        """Memory tokens of the texts: remembered ones are handed over, the rest compressed."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._recent))
        fresh = dict(zip(missing, self.clara.compress_documents(missing))) if missing else {}
        memories = torch.stack([self._recent[t] if t in self._recent else fresh[t] for t in texts])
        for text in texts:
            self._recent.pop(text, None)
        return memories


class DenseEmbedding(BaseEmbedding):
    """A sentence-transformers model as a LlamaIndex embedding (the text-RAG baseline's)."""

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
