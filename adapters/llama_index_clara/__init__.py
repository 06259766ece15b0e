"""LlamaIndex components backed by CLaRa memory tokens: vector store, embedding, retriever, LLM, synthesizer."""

try:
    import llama_index.core  # noqa: F401
except ImportError as error:
    raise ImportError('llama_index_clara needs LlamaIndex: pip install "clara-plugins[llamaindex]"') from error

from .embedding import ClaraEmbedding
from .llm import CLARA_QA_PROMPT, ClaraLLM
from .retriever import ClaraRetriever
from .synthesizer import ClaraSynthesizer
from .vector_store import ClaraVectorStore, translate_filters

__all__ = ["CLARA_QA_PROMPT", "ClaraEmbedding", "ClaraLLM", "ClaraRetriever", "ClaraSynthesizer", "ClaraVectorStore",
           "translate_filters"]
