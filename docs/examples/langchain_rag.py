"""A LangChain RAG chain, built twice over the same passages and the same backbone LM:

1. text RAG: text chunks in an InMemoryVectorStore with a sentence-transformers retriever;
   ChatClara has no CLaRa store, so the plain backbone reads the retrieved passages as text;
2. CLaRa: the passages compressed into memory tokens in a ClaraVectorStore; the query
   reasoner retrieves and ChatClara reads the same prompt's passages from the stored memory
   tokens (its ``stats`` count them).

    python docs/examples/langchain_rag.py --limit 100 --question "Who was Lothair II's queen?"

Runs offline. Without --checkpoint it loads the shipped CR16 checkpoint (docs/model-card.md).
"""

from __future__ import annotations

import argparse

from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter

from clara_benchmarks.dense import DenseEmbeddings  # the sentence-transformers baseline
from clara_benchmarks.pipelines import reading_text
from clara_plugins.checks import positive_int, text_argument
from clara_plugins.corpora import read_documents
from clara_plugins.pretrained import load_model
from langchain_clara import CLARA_PROMPT, ChatClara, ClaraRetriever, ClaraVectorStore, format_documents


def rag_chain(retriever, chat):
    return {"context": retriever | format_documents, "question": RunnablePassthrough()} | CLARA_PROMPT | chat | StrOutputParser()


def chunks(clara, passage: str) -> list[str]:
    """The passage in chunks the compressor reads whole, in both stores, as the LlamaIndex store
    splits them (``ClaraConfig.chunk_tokens``)."""
    size = clara.config.chunk_tokens
    splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(clara.tokenizer, chunk_size=size,
                                                                         chunk_overlap=size // 8)
    return splitter.split_text(passage)


def main() -> None:
    parser = argparse.ArgumentParser(description="LangChain RAG: text chunks vs CLaRa memory tokens")
    parser.add_argument("--corpus", default="../shared/data/corpus/2wiki_6119.json")
    parser.add_argument("--limit", type=positive_int, default=100, help="passages to index")
    parser.add_argument("--question", type=text_argument, default="Who was Lothair II's queen?")
    parser.add_argument("--checkpoint", help="a CLaRa checkpoint folder (default: the shipped one)")
    args = parser.parse_args()

    corpus = read_documents([args.corpus])[: args.limit]  # a wrong file named before the model loads
    if not corpus:
        parser.error(f"--corpus {args.corpus} holds no passages")
    clara = load_model(args.checkpoint)
    passages = [chunk for passage in corpus for chunk in chunks(clara, passage)]
    k = clara.config.generation_top_k  # what ChatClara reads at most: both chains read as many

    text_store = InMemoryVectorStore(DenseEmbeddings())
    text_store.add_texts(passages)
    text_rag = rag_chain(text_store.as_retriever(search_kwargs={"k": k}), ChatClara(clara=clara))
    with reading_text(clara):  # the plain backbone reads text (no memory tokens, and no warning of it)
        print("text RAG:", text_rag.invoke(args.question))

    clara_store = ClaraVectorStore(clara)
    clara_store.add_texts(passages, show_progress=True)
    chat = ChatClara(store=clara_store)
    clara_rag = rag_chain(ClaraRetriever(store=clara_store, k=k), chat)
    print("CLaRa:   ", clara_rag.invoke(args.question))
    print("read as memory tokens:", chat.stats.stored_documents, "stored documents")


if __name__ == "__main__":
    main()
