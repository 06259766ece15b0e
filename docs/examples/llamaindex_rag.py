"""A LlamaIndex query engine, built twice over the same passages and the same backbone LM:

1. text RAG: VectorStoreIndex with a sentence-transformers embedding; the generator reads the
   retrieved nodes as text;
2. CLaRa: VectorStoreIndex on a ClaraVectorStore; the query reasoner retrieves and the
   ClaraSynthesizer hands the nodes' memory tokens to the generator.

    python docs/examples/llamaindex_rag.py --limit 100 --question "Who was Lothair II's queen?"

Runs offline; no default (OpenAI) model is ever resolved. Without --checkpoint it loads the
shipped CR16 checkpoint (docs/model-card.md).
"""

from __future__ import annotations

import argparse

from llama_index.core import Document, StorageContext, VectorStoreIndex

from clara_plugins.datasets import read_documents
from clara_plugins.pretrained import load_model
from llama_index_clara import ClaraLLM, ClaraSynthesizer, ClaraVectorStore, DenseEmbedding


def main() -> None:
    parser = argparse.ArgumentParser(description="LlamaIndex RAG: text chunks vs CLaRa memory tokens")
    parser.add_argument("--corpus", default="../shared/data/corpus/2wiki_6119.json")
    parser.add_argument("--limit", type=int, default=100, help="passages to index")
    parser.add_argument("--question", default="Who was Lothair II's queen?")
    parser.add_argument("--checkpoint", help="a CLaRa checkpoint folder (default: the shipped one)")
    args = parser.parse_args()

    documents = [Document(text=p) for p in read_documents([args.corpus])[: args.limit]]
    clara = load_model(args.checkpoint)

    text_index = VectorStoreIndex.from_documents(documents, embed_model=DenseEmbedding())
    text_llm = ClaraLLM(clara=clara, read_text=True)
    text_engine = text_index.as_query_engine(llm=text_llm, response_synthesizer=ClaraSynthesizer(text_llm),
                                             similarity_top_k=5)
    print("text RAG:", text_engine.query(args.question).response)

    store = ClaraVectorStore(clara)
    clara_index = VectorStoreIndex.from_documents(documents, embed_model=store.embed_model, show_progress=True,
                                                  storage_context=StorageContext.from_defaults(vector_store=store))
    clara_llm = ClaraLLM(clara=clara, store=store.client)
    clara_engine = clara_index.as_query_engine(llm=clara_llm, response_synthesizer=ClaraSynthesizer(clara_llm),
                                               similarity_top_k=5)
    print("CLaRa:   ", clara_engine.query(args.question).response)


if __name__ == "__main__":
    main()
