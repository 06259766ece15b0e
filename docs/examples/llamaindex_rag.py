"""A LlamaIndex query engine, built twice over the same passages and the same backbone LM:

1. text RAG: VectorStoreIndex with a sentence-transformers embedding; the plain backbone reads
   the retrieved nodes as text;
2. CLaRa: VectorStoreIndex on a ClaraVectorStore; the query reasoner retrieves and ClaraLLM,
   behind LlamaIndex's own synthesizer, reads the nodes from their stored memory tokens.

    python docs/examples/llamaindex_rag.py --limit 100 --question "Who was Lothair II's queen?"

Runs offline; no default (OpenAI) model is ever resolved. Without --checkpoint it loads the
shipped CR16 checkpoint (docs/model-card.md).
"""

from __future__ import annotations

import argparse

from llama_index.core import Document, StorageContext, VectorStoreIndex

from clara_benchmarks.dense import DenseEmbedding  # the sentence-transformers baseline
from clara_benchmarks.pipelines import reading_text
from clara_plugins.checks import positive_int, text_argument
from clara_plugins.corpora import read_documents
from clara_plugins.pretrained import load_model
from llama_index_clara import CLARA_QA_PROMPT, ClaraLLM, ClaraVectorStore


def main() -> None:
    parser = argparse.ArgumentParser(description="LlamaIndex RAG: text chunks vs CLaRa memory tokens")
    parser.add_argument("--corpus", default="../shared/data/corpus/2wiki_6119.json")
    parser.add_argument("--limit", type=positive_int, default=100, help="passages to index")
    parser.add_argument("--question", type=text_argument, default="Who was Lothair II's queen?")
    parser.add_argument("--checkpoint", help="a CLaRa checkpoint folder (default: the shipped one)")
    args = parser.parse_args()

    documents = [Document(text=p) for p in read_documents([args.corpus])[: args.limit]]
    if not documents:  # answered from an empty index
        parser.error(f"--corpus {args.corpus} holds no passages")
    clara = load_model(args.checkpoint)
    # made first, the store sets LlamaIndex's default chunks to ones its compressor reads whole
    # (256 tokens): both indexes hold the same chunks (an index built before makes LlamaIndex's
    # own 1,024-token default, which the store then leaves as the user's choice)
    store = ClaraVectorStore(clara)
    k = clara.config.generation_top_k  # what ClaraLLM reads at most: both engines read as many

    text_index = VectorStoreIndex.from_documents(documents, embed_model=DenseEmbedding())
    text_engine = text_index.as_query_engine(llm=ClaraLLM(clara=clara), text_qa_template=CLARA_QA_PROMPT,
                                             similarity_top_k=k)
    with reading_text(clara):  # the plain backbone reads text (no memory tokens, and no warning of it)
        print("text RAG:", text_engine.query(args.question).response)

    clara_index = VectorStoreIndex.from_documents(documents, embed_model=store.embed_model, show_progress=True,
                                                  storage_context=StorageContext.from_defaults(vector_store=store))
    clara_llm = ClaraLLM(store=store)
    clara_engine = clara_index.as_query_engine(llm=clara_llm, text_qa_template=CLARA_QA_PROMPT, similarity_top_k=k)
    print("CLaRa:   ", clara_engine.query(args.question).response)
    print("read as memory tokens:", clara_llm.stats.stored_documents, "stored documents")


if __name__ == "__main__":
    main()
