"""LlamaIndex components backed by CLaRa memory tokens: vector store, retriever, LLM, synthesizer."""

from .embedding import ClaraEmbedding, DenseEmbedding
from .llm import ClaraLLM
from .retriever import ClaraRetriever
from .synthesizer import ClaraSynthesizer
from .vector_store import ClaraVectorStore, translate_filters

__all__ = ["ClaraEmbedding", "DenseEmbedding", "ClaraLLM", "ClaraRetriever", "ClaraSynthesizer", "ClaraVectorStore",
           "translate_filters"]
