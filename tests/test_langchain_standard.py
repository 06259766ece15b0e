"""LangChain's official standard suites (langchain-tests, pinned in pyproject) on our classes."""

from __future__ import annotations

import functools

import pytest
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import (
    ChatModelIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests

from clara_plugins import ClaraModel, MemoryStore
from clara_plugins.pretrained import load_model
from conftest import CORPUS, shared_untrained_tiny_model
from langchain_clara import ChatClara, ClaraRetriever, ClaraVectorStore


class TestVectorStoreWithEmbeddingKeys(VectorStoreIntegrationTests):
    """Keys from the suite's deterministic fake embedding; memory tokens still stored."""

    @pytest.fixture
    def vectorstore(self) -> VectorStore:
        return ClaraVectorStore(shared_untrained_tiny_model(), embedding=self.get_embeddings())


class TestVectorStoreWithClaraKeys(VectorStoreIntegrationTests):
    """CLaRa's own retrieval: query reasoner against memory tokens."""

    @pytest.fixture
    def vectorstore(self) -> VectorStore:
        return ClaraVectorStore(shared_untrained_tiny_model())


@functools.cache
def _corpus_store() -> MemoryStore:
    store = MemoryStore(shared_untrained_tiny_model())
    store.upsert(CORPUS)
    return store


class TestClaraRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[ClaraRetriever]:
        return ClaraRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": _corpus_store(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "Which city is the capital of France?"


class TestChatClaraUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatClara]:
        return ChatClara

    @property
    def chat_model_params(self) -> dict:
        return {"clara": shared_untrained_tiny_model()}

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatClara wraps one loaded ClaraModel

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools is overridden only to refuse with a reason

    @property
    def has_structured_output(self) -> bool:
        return False


@functools.cache
def _default_clara() -> ClaraModel:
    """What a user gets: the shipped checkpoint on the default backbone (an untrained model
    given one-word system messages as documents may answer nothing at all)."""
    model = load_model(device="cpu")
    model.config.max_new_tokens = 24
    return model


@pytest.mark.slow
class TestChatClaraIntegration(ChatModelIntegrationTests):
    """On the real default model: answers must be real text, not empty."""

    @property
    def chat_model_class(self) -> type[ChatClara]:
        return ChatClara

    @property
    def chat_model_params(self) -> dict:
        return {"clara": _default_clara()}

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatClara wraps one loaded ClaraModel

    @property
    def has_tool_calling(self) -> bool:
        return False  # CLaRa's generator answers from memory tokens; it has no tool protocol

    @property
    def has_structured_output(self) -> bool:
        return False
