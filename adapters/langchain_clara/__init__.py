"""LangChain components backed by CLaRa memory tokens: a vector store, a retriever, a chat model."""

from .chat_models import CLARA_PROMPT, ChatClara, format_documents
from .retrievers import ClaraRetriever
from .vectorstores import ClaraVectorStore, DenseEmbeddings, EmbeddingsKeys

__all__ = ["CLARA_PROMPT", "ChatClara", "ClaraRetriever", "ClaraVectorStore", "DenseEmbeddings", "EmbeddingsKeys", "format_documents"]
