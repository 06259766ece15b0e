"""The benchmarked systems, each built as the LangChain or LlamaIndex pipeline a user would write.

A pipeline answers one question over that question's own candidate pool in three stages,
timed separately by the runner:

- ``index``: the pool enters the retriever (CLaRa compresses it into memory tokens, dense
  retrieval embeds it, BM25 builds its term index): offline work in a real deployment;
- ``retrieve``: the top-k passages come back, as positions in the pool, best first;
- ``generate``: the backbone streams its answer from them; the pipeline reports the answer,
  the input positions the generator read and the seconds to the first piece of text.

Every generator of a run is the same backbone (SmolLM2, or the checkpoints'): the plain model or
a fine-tuned decoder adapter reading text, or CLaRa's decoder reading memory tokens.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import StorageContext, VectorStoreIndex, get_response_synthesizer
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import QueryBundle, TextNode
from llama_index.retrievers.bm25 import BM25Retriever

from clara_plugins import ClaraModel
from clara_plugins.passes import text_weights
from clara_plugins.prompts import prompt_positions, question_prompt
from langchain_clara import CLARA_PROMPT, ChatClara, format_documents
from llama_index_clara import CLARA_QA_PROMPT, ClaraLLM, ClaraSynthesizer, ClaraVectorStore

from .measure import folder_bytes
from .text_reader import text_prompt


def timed_pieces(start: Callable[[], Iterable[str]]) -> tuple[str, float]:
    """The streamed text, and the seconds from the call that ``start`` makes to the first
    non-empty piece (prefill + 1 token). The clock starts before the call: a synthesizer does
    its work (reading the context, ranking memories) when called, before its first piece."""
    began, first, text = time.perf_counter(), None, ""
    for piece in start():
        if first is None and piece:
            first = time.perf_counter() - began
        text += piece
    return text, first if first is not None else time.perf_counter() - began


@contextlib.contextmanager
def reading_text(reader: ClaraModel) -> Iterator[None]:
    """The text-reading weights, without the adapters' warning that no memory tokens were read:
    the text systems read none by design."""
    with text_weights(reader), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* read no memory tokens", category=UserWarning)
        yield


class LangChainTextRAG:
    """``InMemoryVectorStore`` over sentence-transformers embeddings, then the LCEL chain
    ``CLARA_PROMPT | ChatClara`` without a CLaRa store, so the passages are read as text (by
    the text-reading weights). Without embeddings: no retrieval at all."""

    framework = "langchain"

    def __init__(self, reader: ClaraModel, embeddings: Embeddings | None, k: int, max_new_tokens: int) -> None:
        self.reader, self.embeddings, self.k = reader, embeddings, k
        self.chain = CLARA_PROMPT | ChatClara(clara=reader, k=k, max_tokens=max_new_tokens)
        self.store: InMemoryVectorStore | None = None
        self.hits: list = []

    def index(self, passages: list[str]) -> None:
        if self.embeddings is not None:
            self.store = InMemoryVectorStore(self.embeddings)
            self.store.add_texts(passages, ids=[str(i) for i in range(len(passages))])

    def retrieve(self, question: str) -> list[int]:
        if self.store is None:
            return []
        self.hits = self.store.as_retriever(search_kwargs={"k": self.k}).invoke(question)
        return [int(document.id) for document in self.hits]

    def generate(self, question: str) -> tuple[str, int, float]:
        with reading_text(self.reader):
            inputs = {"context": format_documents(self.hits), "question": question}
            answer, first = timed_pieces(lambda: (chunk.text for chunk in self.chain.stream(inputs)))
        texts = [document.page_content for document in self.hits]
        return answer, prompt_positions(self.reader.tokenizer, text_prompt(self.reader, question, texts)), first

    def index_bytes(self, folder: Path) -> int | None:
        """The vectors as float32 and the texts as compact JSON, as a binary vector store keeps
        them: LangChain's ``dump`` writes each float as indented decimal text, which took about
        5 x the bytes and made CLaRa's store look 1.7 x the dense one's."""
        if self.store is None:
            return None
        stored = list(self.store.store.values())
        np.save(folder / "vectors.npy", np.asarray([entry["vector"] for entry in stored], dtype=np.float32))
        records = [{"id": entry["id"], "text": entry["text"], "metadata": entry["metadata"]} for entry in stored]
        (folder / "records.json").write_text(json.dumps(records, ensure_ascii=False, separators=(",", ":")))
        return folder_bytes(folder)


class _LlamaIndexRAG:
    """A ``RetrieverQueryEngine``-style engine whose retrieve and synthesize steps are timed apart."""

    framework = "llamaindex"
    engine: RetrieverQueryEngine

    def __init__(self, k: int) -> None:
        self.k = k
        self.hits: list = []

    @staticmethod
    def nodes(passages: list[str]) -> list[TextNode]:
        return [TextNode(text=passage, id_=str(i)) for i, passage in enumerate(passages)]

    def retrieve(self, question: str) -> list[int]:
        self.hits = self.engine.retrieve(QueryBundle(question))
        return [int(hit.node.node_id) for hit in self.hits]

    def answer(self, question: str) -> tuple[str, float]:
        """The streamed answer of the engine's synthesizer, and its first-piece latency."""
        return timed_pieces(lambda: self.engine.synthesize(QueryBundle(question), self.hits).response_gen)


class LlamaIndexBM25RAG(_LlamaIndexRAG):
    """LlamaIndex's ``BM25Retriever`` (bm25s) and the backbone reading the nodes as text: a
    ``ClaraLLM`` without a store behind LlamaIndex's own synthesizer, in CLaRa's layout."""

    def __init__(self, reader: ClaraModel, k: int, max_new_tokens: int) -> None:
        super().__init__(k)
        self.reader = reader
        self.synthesizer = get_response_synthesizer(llm=ClaraLLM(clara=reader, k=k, max_new_tokens=max_new_tokens),
                                                    text_qa_template=CLARA_QA_PROMPT, streaming=True)

    def index(self, passages: list[str]) -> None:
        self.retriever = BM25Retriever.from_defaults(nodes=self.nodes(passages), similarity_top_k=self.k)
        self.engine = RetrieverQueryEngine(self.retriever, response_synthesizer=self.synthesizer)

    def generate(self, question: str) -> tuple[str, int, float]:
        texts = [hit.node.get_content() for hit in self.hits]
        with reading_text(self.reader):
            answer, first = self.answer(question)
        return answer, prompt_positions(self.reader.tokenizer, text_prompt(self.reader, question, texts)), first

    def index_bytes(self, folder: Path) -> int:
        self.retriever.persist(str(folder / "bm25"))
        return folder_bytes(folder)


class LlamaIndexClaraRAG(_LlamaIndexRAG):
    """``VectorStoreIndex`` on a ``ClaraVectorStore`` (documents become memory tokens, the
    query reasoner retrieves) and a query engine whose ``ClaraSynthesizer`` hands the stored
    memory tokens of the retrieved nodes to the generator."""

    def __init__(self, model: ClaraModel, k: int, max_new_tokens: int) -> None:
        super().__init__(k)
        self.model, self.max_new_tokens = model, max_new_tokens

    def index(self, passages: list[str]) -> None:
        self.store = ClaraVectorStore(self.model)
        index = VectorStoreIndex(self.nodes(passages), embed_model=self.store.embed_model,
                                 storage_context=StorageContext.from_defaults(vector_store=self.store))
        llm = ClaraLLM(clara=self.model, store=self.store.client, k=self.k, max_new_tokens=self.max_new_tokens)
        self.engine = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm, streaming=True),
                                            similarity_top_k=self.k)

    def generate(self, question: str) -> tuple[str, int, float]:
        answer, first = self.answer(question)
        prompt = question_prompt(self.model.tokenizer, question, len(self.hits), self.model.document_placeholder)
        return answer, prompt_positions(self.model.tokenizer, prompt), first

    def index_bytes(self, folder: Path) -> int:
        self.store.persist(str(folder / "store"))
        return folder_bytes(folder)
