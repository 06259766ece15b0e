"""LangChain components backed by CLaRa memory tokens: a vector store, embeddings, a retriever, a chat model."""

try:
    import langchain_core  # noqa: F401
except ImportError as error:
    raise ImportError('langchain_clara needs LangChain: pip install "clara-plugins[langchain]"') from error

from .chat_models import CLARA_PROMPT, ChatClara, format_documents
from .embeddings import ClaraEmbeddings
from .retrievers import ClaraRetriever
from .vectorstores import ClaraVectorStore

__all__ = ["CLARA_PROMPT", "ChatClara", "ClaraEmbeddings", "ClaraRetriever", "ClaraVectorStore", "format_documents"]
