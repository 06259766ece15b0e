"""Retrieval through the LangChain and LlamaIndex adapters as a drop-in: framework stores accepted
where users pass them, no core object needed, no OpenAI fallback, MMR, range filters, CLaRa keys
in other stores, LlamaIndex persistence, calibrated relevance, the dense baseline, install hints."""

import subprocess
import sys

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import Document as LlamaDocument
from llama_index.core import Settings, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

import langchain_clara
import llama_index_clara
from clara_plugins import ClaraModel, InvalidInputError, MemoryStore
from clara_plugins.keys import ClaraKeys, maximal_marginal_relevance, normalize_rows
from clara_plugins.pretrained import default_checkpoint
from conftest import CORPUS
from langchain_clara import ClaraEmbeddings, ClaraRetriever, ClaraVectorStore
from llama_index_clara import ClaraEmbedding
from llama_index_clara import ClaraRetriever as LlamaClaraRetriever
from llama_index_clara import ClaraVectorStore as LlamaClaraVectorStore

QUESTION = "Who won Nobel prizes?"
IDS = [f"d{i}" for i in range(len(CORPUS))]
TOPICS = ["city", "tower", "city", "river", "science", "novel"]


@pytest.fixture
def vectorstore(tiny_model) -> ClaraVectorStore:
    store = ClaraVectorStore(tiny_model)
    store.add_texts(CORPUS, [{"n": i, "topic": t} for i, t in enumerate(TOPICS)], ids=IDS)
    return store


@pytest.fixture
def llama_store(tiny_model) -> LlamaClaraVectorStore:
    store = LlamaClaraVectorStore(tiny_model)
    store.add([TextNode(text=text, id_=f"n{i}", metadata={"n": i}) for i, text in enumerate(CORPUS)])
    return store


@pytest.fixture
def untrained_model(tiny_config) -> ClaraModel:
    """Fresh adapters are the identity: a document's own text is, as a query, its exact key."""
    return ClaraModel(tiny_config, device="cpu")


def ids(documents) -> list[str]:
    return [d.id for d in documents]


def llama_query(store, k: int = 6, **fields) -> list[str]:
    return store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=k, **fields)).ids


# 1. framework stores are accepted wherever users pass a store

def test_langchain_retriever_takes_the_vector_store_or_its_memory_store(vectorstore):
    from_framework = ClaraRetriever(store=vectorstore, k=2).invoke(QUESTION)
    assert ids(from_framework) == ids(ClaraRetriever(store=vectorstore.store, k=2).invoke(QUESTION))
    assert ids(from_framework) == [d.id for d, _ in vectorstore.store.search(QUESTION, 2)]
    with pytest.raises(TypeError, match="a MemoryStore or a CLaRa vector store"):
        ClaraRetriever(store="not a store")


def test_llama_index_retriever_takes_the_vector_store_or_its_client(llama_store):
    by_client = LlamaClaraRetriever(llama_store.client, similarity_top_k=2).retrieve(QUESTION)
    by_store = LlamaClaraRetriever(llama_store, similarity_top_k=2).retrieve(QUESTION)
    assert [n.node.node_id for n in by_client] == [n.node.node_id for n in by_store] == llama_query(llama_store, 2)
    with pytest.raises(TypeError, match="a MemoryStore or a CLaRa vector store"):
        LlamaClaraRetriever("not a store")


# 2. no core object needed

def test_langchain_store_from_documents_loads_the_default_model(tiny_model, monkeypatch):
    loads = []
    monkeypatch.setattr("langchain_clara.vectorstores.load_model", lambda: loads.append(1) or tiny_model)
    documents = [Document(page_content=text, metadata={"n": i}, id=f"d{i}") for i, text in enumerate(CORPUS)]
    store = ClaraVectorStore.from_documents(documents)
    assert loads == [1] and store.store.model is tiny_model and sorted(store.store.all_ids()) == sorted(IDS)
    retrieved = store.as_retriever(search_kwargs={"k": 2}).invoke(QUESTION)
    assert ids(retrieved) == [d.id for d, _ in store.store.search(QUESTION, 2)]
    ClaraVectorStore.from_texts(CORPUS[:2])
    ClaraVectorStore.from_texts(CORPUS[:2], model=tiny_model)
    ClaraVectorStore.from_texts(CORPUS[:2], ClaraEmbeddings(tiny_model))
    assert loads == [1, 1]


def test_llama_index_store_loads_the_default_model(tiny_model, monkeypatch):
    monkeypatch.setattr("llama_index_clara.vector_store.load_model", lambda: tiny_model)
    assert LlamaClaraVectorStore().client.model is tiny_model


@pytest.mark.slow
def test_langchain_store_from_texts_on_the_shipped_model():
    store = ClaraVectorStore.from_texts(["The Danube rises in the Black Forest.", "Berlin is the capital of Germany."])
    assert store.store.model.name_or_path == str(default_checkpoint())
    found = store.as_retriever(search_kwargs={"k": 1}).invoke("Where does the Danube rise?")
    assert [document.page_content[:10] for document in found] == ["The Danube"]


# 3. VectorStoreIndex without embed_model: the store's own CLaRa embedding, never OpenAI

def test_vector_store_index_without_embed_model_uses_the_stores_embedding(tiny_model, monkeypatch):
    monkeypatch.setattr(Settings, "_embed_model", None)  # nothing chosen yet: LlamaIndex would pick OpenAI
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    store = LlamaClaraVectorStore(tiny_model)
    calls = []
    real = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress", lambda docs, *a, **k: calls.append(len(docs)) or real(docs, *a, **k))
    index = VectorStoreIndex.from_documents([LlamaDocument(text=t) for t in CORPUS[:3]],
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    assert Settings._embed_model is store.embed_model
    assert sum(calls) == 3 and len(store.client) == 3  # each text compressed once, memories handed over
    assert len(index.as_retriever(similarity_top_k=2).retrieve(QUESTION)) == 2


def test_a_users_own_default_embedding_is_kept(tiny_model, monkeypatch):
    own = MockEmbedding(embed_dim=4)
    monkeypatch.setattr(Settings, "_embed_model", own)
    store = LlamaClaraVectorStore(tiny_model)
    VectorStoreIndex.from_documents([LlamaDocument(text=t) for t in CORPUS[:2]],
                                    storage_context=StorageContext.from_defaults(vector_store=store))
    assert Settings._embed_model is own and len(store.client) == 2  # the store compressed the texts itself


# 4. maximal marginal relevance

def test_mmr_core_trades_similarity_for_diversity():
    keys = normalize_rows(np.array([[1.0, 0, 0], [0.95, 0.31, 0], [0.6, 0, 0.8]]))
    query = normalize_rows(np.array([[1.0, 0.3, 0.2]]))[0]
    assert maximal_marginal_relevance(query, keys, 2, 1.0) == [1, 0]  # similarity alone
    assert maximal_marginal_relevance(query, keys, 2, 0.5) == [1, 2]  # row 0 nearly repeats row 1
    # copies of one key come first-stored first, as a plain search ranks them (a matrix product
    # rounded the last copy above the others)
    rng = np.random.default_rng(2)
    copy = normalize_rows(rng.normal(size=(1, 576)))[0]
    near = normalize_rows((copy + 0.03 * rng.normal(size=576))[None])[0]
    assert maximal_marginal_relevance(near, np.stack([copy] * 6), 1, 0.5) == [0]


def test_keys_of_any_finite_length_become_unit_rows():
    # float32 norms overflowed past 1e19 (the row became zero) and underflowed below 1e-19
    rows = normalize_rows(np.array([[3e20, 4e20], [3e-25, 4e-25], [0.0, 0.0]], dtype=np.float32))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_langchain_mmr_skips_copies_of_the_best_document(vectorstore):
    best = vectorstore.similarity_search(QUESTION, k=1)[0]
    vectorstore.add_texts([best.page_content] * 2, ids=["copy1", "copy2"])
    assert {d.page_content for d in vectorstore.similarity_search(QUESTION, k=3)} == {best.page_content}
    diverse = vectorstore.max_marginal_relevance_search(QUESTION, k=3, fetch_k=8, lambda_mult=0.25)
    assert diverse[0].page_content == best.page_content and len({d.page_content for d in diverse}) == 3
    key = vectorstore.embeddings.embed_query(QUESTION)
    by_vector = vectorstore.max_marginal_relevance_search_by_vector(key, k=3, fetch_k=8, lambda_mult=0.25)
    retriever = vectorstore.as_retriever(search_type="mmr", search_kwargs={"k": 3, "fetch_k": 8, "lambda_mult": 0.25})
    assert ids(by_vector) == ids(retriever.invoke(QUESTION)) == ids(diverse)
    filtered = vectorstore.max_marginal_relevance_search(QUESTION, k=3, lambda_mult=0.25, filter={"topic": "city"})
    assert sorted(ids(filtered)) == ["d0", "d2"]


def test_llama_index_mmr_mode(llama_store):
    best = llama_store.get_nodes([llama_query(llama_store, 1)[0]])[0]
    llama_store.add([TextNode(text=best.get_content(), id_=f"copy{i}") for i in range(2)])
    texts = {n.node_id: n.get_content() for n in llama_store.get_nodes()}
    assert len({texts[i] for i in llama_query(llama_store, 3)}) == 1
    diverse = llama_query(llama_store, 3, mode=VectorStoreQueryMode.MMR, mmr_threshold=0.25)
    assert len({texts[i] for i in diverse}) == 3
    through_kwargs = llama_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=3,
                                                        mode=VectorStoreQueryMode.MMR), mmr_threshold=0.25)
    assert through_kwargs.ids == diverse
    for prefetch in ({"mmr_prefetch_k": 3}, {"mmr_prefetch_factor": 1.0}):  # only the 3 nearest: the copies
        near = llama_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=3, mode=VectorStoreQueryMode.MMR,
                                                  mmr_threshold=0.25), **prefetch)
        assert len({texts[i] for i in near.ids}) == 1
    with pytest.raises(ValueError, match="not both"):
        llama_store.query(VectorStoreQuery(query_str=QUESTION, mode=VectorStoreQueryMode.MMR), mmr_prefetch_k=3,
                          mmr_prefetch_factor=2)
    with pytest.raises(NotImplementedError, match="query mode 'hybrid'"):
        llama_query(llama_store, 3, mode=VectorStoreQueryMode.HYBRID)
    with pytest.raises(NotImplementedError, match="query mode 'hybrid'"):  # a bare AttributeError on str.value
        llama_query(llama_store, 3, mode="hybrid")
    assert llama_query(llama_store, 3, mode="mmr", mmr_threshold=0.25) == diverse
    for bad in (-3, 0, True, 2.9, "x"):  # -3, 0 and True fell back to top_k, 2.9 was read as 2
        with pytest.raises(InvalidInputError, match="mmr_prefetch_k must be a positive integer"):
            llama_store.query(VectorStoreQuery(query_str=QUESTION, mode=VectorStoreQueryMode.MMR), mmr_prefetch_k=bad)
    # MMR's options outside MMR mode were ignored, unsaid: a forgotten vector_store_query_mode="mmr"
    with pytest.raises(ValueError, match="mmr_threshold weigh MMR re-ranking: ask for it with "
                                         "vector_store_query_mode='mmr'"):
        llama_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=3), mmr_threshold=0.3)
    with pytest.raises(ValueError, match="mmr_threshold weigh MMR"):
        llama_query(llama_store, 3, mmr_threshold=0.3)
    # errors name LlamaIndex's settings, not the core store's k and lambda_mult
    with pytest.raises(InvalidInputError, match="similarity_top_k must be a positive integer, got 0"):
        llama_query(llama_store, 0)
    with pytest.raises(InvalidInputError, match="mmr_threshold must be a number from 0 to 1, got 1.5"):
        llama_query(llama_store, 3, mode="mmr", mmr_threshold=1.5)
    import numpy as np  # a numpy factor is a number, as a numpy prefetch count is a count

    assert llama_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=3, mode="mmr", mmr_threshold=0.25),
                             mmr_prefetch_factor=np.float32(1.0)).ids == near.ids


# 5. range filters

def test_range_filters_compare_numbers_with_numbers_and_strings_with_strings(tiny_model):
    store = MemoryStore(tiny_model)
    metadatas = [{"n": 0}, {"n": 1.5}, {"n": 2}, {"n": "3"}, {"n": True}, {"date": "2024-05-01"}]
    store.upsert(CORPUS, ids=IDS, metadatas=metadatas)
    assert store.ids_where({"n": {"$gte": 1, "$lt": 3}}) == ["d1", "d2"]
    assert store.ids_where({"n": {"$gt": 0}}) == ["d1", "d2"]  # not the string "3", not True
    assert store.ids_where({"n": {"$lte": "3"}}) == ["d3"]
    assert store.ids_where({"$or": [{"n": {"$lte": 0}}, {"date": {"$gt": "2024-01-31"}}]}) == ["d0", "d5"]
    assert [d.id for d, _ in store.search(QUESTION, 6, {"n": {"$gt": 1}})] in (["d1", "d2"], ["d2", "d1"])
    for bad in ([1], True, None, float("nan")):
        with pytest.raises(ValueError, match="takes a number or a string"):
            store.ids_where({"n": {"$gt": bad}})


def test_langchain_and_llama_index_range_filters(vectorstore, llama_store):
    assert sorted(ids(vectorstore.similarity_search(QUESTION, k=6, filter={"n": {"$gt": 3}}))) == ["d4", "d5"]
    for operator, expected in [(FilterOperator.GT, {"n4", "n5"}), (FilterOperator.GTE, {"n3", "n4", "n5"}),
                               (FilterOperator.LT, {"n0"}), (FilterOperator.LTE, {"n0", "n1"})]:
        bound = 3 if operator in (FilterOperator.GT, FilterOperator.GTE) else 1
        filters = MetadataFilters(filters=[MetadataFilter(key="n", value=bound, operator=operator)])
        assert set(llama_query(llama_store, filters=filters)) == expected


# 6. CLaRa keys in other stores

def test_clara_embeddings_let_another_langchain_store_rank_like_clara(vectorstore):
    embeddings = vectorstore.embeddings
    assert isinstance(embeddings, ClaraEmbeddings)
    other = InMemoryVectorStore(embeddings)
    other.add_texts(CORPUS, ids=IDS)
    expected = vectorstore.similarity_search_with_score(QUESTION, k=6)
    found = other.similarity_search_with_score(QUESTION, k=6)
    assert ids(d for d, _ in found) == ids(d for d, _ in expected)
    assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=1e-4)
    native = ClaraVectorStore(embedding=embeddings)  # CLaRa's own keys, not a second encoder
    assert isinstance(native.store.keys, ClaraKeys) and native.store.model is embeddings.model


def test_clara_embedding_lets_simple_vector_store_rank_like_clara(llama_store, tiny_model):
    nodes = [TextNode(text=text, id_=f"n{i}", metadata={"n": i}) for i, text in enumerate(CORPUS)]
    index = VectorStoreIndex(nodes, embed_model=ClaraEmbedding(clara=tiny_model))  # a SimpleVectorStore
    found = index.as_retriever(similarity_top_k=6).retrieve(QUESTION)
    expected = llama_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=6))
    assert [n.node.node_id for n in found] == expected.ids
    assert [n.score for n in found] == pytest.approx(expected.similarities, abs=1e-4)


def test_clara_embedding_keeps_no_memories_that_no_clara_store_takes(tiny_model):
    from llama_index_clara import embedding as embedding_module

    ClaraEmbedding(clara=tiny_model).get_text_embedding_batch(CORPUS[:3])  # beside another store
    assert not embedding_module._untaken.get(tiny_model)
    LlamaClaraVectorStore(tiny_model)
    ClaraEmbedding(clara=tiny_model).get_text_embedding_batch(CORPUS[:3])  # for a ClaraVectorStore to take
    assert list(embedding_module._untaken[tiny_model]) == CORPUS[:3]


def test_clara_embedding_keeps_memories_by_bytes_each_its_own_and_says_what_it_forgot(tiny_model, monkeypatch):
    # an IngestionPipeline embeds every node before its store takes any: past 4,096 texts the
    # rest were compressed a second time unsaid; and each kept row held its whole batch
    from llama_index_clara import embedding as embedding_module

    LlamaClaraVectorStore(tiny_model)
    one = tiny_model.config.n_mem_tokens * tiny_model.hidden_size * 2  # fp16 bytes of a text's memories
    monkeypatch.setattr(embedding_module, "_KEEP_BYTES", 4 * one)
    with pytest.warns(UserWarning, match="2 texts' memory tokens were forgotten before a ClaraVectorStore took them"):
        ClaraEmbedding(clara=tiny_model, embed_batch_size=8).get_text_embedding_batch(CORPUS[:6])
    kept = embedding_module._untaken[tiny_model]
    assert list(kept) == CORPUS[2:6] and all(m.untyped_storage().nbytes() == one for m in kept.values())


# 7. LlamaIndex persistence through StorageContext

def test_storage_context_persist_and_reload(tiny_model, tmp_path):
    store = LlamaClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents([LlamaDocument(text=t, id_=f"doc{i}") for i, t in enumerate(CORPUS)],
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    index.storage_context.persist(persist_dir=str(tmp_path))
    assert (tmp_path / "default__vector_store.clara" / "CURRENT").is_file()  # the store, beside the JSON stores
    assert not (tmp_path / "default__vector_store.json").exists()
    reloaded_store = LlamaClaraVectorStore.from_persist_dir(tmp_path, tiny_model)
    reloaded = load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path),
                                                                    vector_store=reloaded_store))
    assert sorted(n.node_id for n in reloaded_store.get_nodes()) == sorted(n.node_id for n in store.get_nodes())

    def top(some_index):
        return [(n.node.node_id, n.score) for n in some_index.as_retriever(similarity_top_k=3).retrieve(QUESTION)]

    assert top(reloaded) == top(index)


# 8. calibrated relevance

def test_a_clara_embedding_without_a_model_loads_the_shipped_one(tiny_model, monkeypatch):
    # as ClaraVectorStore(), ClaraLLM() and LangChain's ClaraEmbeddings() do: a bare "clara Field required"
    monkeypatch.setattr("llama_index_clara.embedding.load_model", lambda *args, **kwargs: tiny_model)
    assert ClaraEmbedding().clara is tiny_model and ClaraEmbedding(clara=tiny_model).clara is tiny_model


def test_relevance_ranks_a_cosine_among_the_stores_document_pairs(untrained_model):
    store = ClaraVectorStore(untrained_model)
    store.add_texts(CORPUS, ids=IDS)
    keys = np.asarray(store.embeddings.embed_documents(CORPUS))
    pairs = np.sort((keys @ keys.T)[np.triu_indices(len(CORPUS), 1)])
    relevance = store.store.relevance
    assert relevance(pairs[0] - 1e-4) == 0.0 and relevance(pairs[-1] + 1e-4) == 1.0 and relevance(1.0) == 1.0
    assert relevance(float(np.median(pairs))) == pytest.approx(0.5, abs=0.05)
    grid = np.linspace(-1, 1, 41)
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(map(relevance, grid), map(relevance, grid[1:])))


def test_a_relevance_threshold_separates_the_relevant_document(untrained_model):
    store = ClaraVectorStore(untrained_model)
    store.add_texts(CORPUS, ids=IDS)
    scored = store.similarity_search_with_relevance_scores(CORPUS[4], k=6)  # the text of d4 as the question
    assert scored[0][0].id == "d4" and scored[0][1] == 1.0
    assert scored[-1][1] < 0.5  # (1 + cosine) / 2 would give any positive cosine more than 0.5
    kept = store.as_retriever(search_type="similarity_score_threshold",
                              search_kwargs={"k": 6, "score_threshold": 0.5}).invoke(CORPUS[4])
    assert "d4" in ids(kept) and scored[-1][0].id not in ids(kept)


def test_a_store_of_one_document_falls_back_to_the_plain_map(tiny_model):
    store = MemoryStore(tiny_model)
    assert store.relevance(0.2) == pytest.approx(0.6)  # an empty store too: an IndexError before
    store.upsert(CORPUS[:1])
    assert store.relevance(0.2) == pytest.approx(0.6)


def test_a_search_key_that_is_not_finite_is_refused(tiny_model):
    # a filtered search returned the first documents, scored NaN, at relevance 1.0
    import numpy as np

    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:3], metadatas=[{"n": i} for i in range(3)])
    key = np.full(store.keys.dimensions, np.nan, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="the search key holds NaN or infinite values"):
        store.search_by_key(key, k=2, where={"n": {"$gte": 0}})


# 9. the dense baseline is a benchmark

def test_dense_baseline_lives_in_benchmarks():
    code = ("import sys, clara_benchmarks.dense as dense\n"
            "assert dense.DEFAULT_DENSE_MODEL and dense.DenseRetriever\n"
            "assert 'langchain_core' not in sys.modules and 'llama_index.core' not in sys.modules\n"
            "from clara_benchmarks.dense import DenseEmbedding, DenseEmbeddings\n"
            "from langchain_core.embeddings import Embeddings\n"
            "from llama_index.core.base.embeddings.base import BaseEmbedding\n"
            "assert issubclass(DenseEmbeddings, Embeddings) and issubclass(DenseEmbedding, BaseEmbedding)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not hasattr(langchain_clara, "DenseEmbeddings") and not hasattr(llama_index_clara, "DenseEmbedding")


def test_dense_wrappers_embed_with_their_retriever():
    from clara_benchmarks.dense import DenseEmbedding, DenseEmbeddings, DenseRetriever

    class Unit(DenseRetriever):  # no sentence-transformers model behind it
        def __init__(self) -> None:
            pass

        def embed_documents(self, texts):
            return np.ones((len(texts), 2)) / np.sqrt(2)

        def embed_queries(self, queries):
            return np.array([[1.0, 0.0]] * len(queries))

    assert DenseEmbeddings(Unit()).embed_query("q") == [1.0, 0.0]
    embedding = DenseEmbedding(retriever=Unit())  # passages with the passage encoder, queries with the query one
    assert embedding.get_text_embedding_batch(["a", "b"]) == Unit().embed_documents(["a", "b"]).tolist()
    assert embedding.get_query_embedding("q") == [1.0, 0.0]


def test_dense_retrieval_uses_the_models_own_query_and_passage_prompts():
    # passages were embedded without E5's "passage: " prompt, weakening the text baseline
    from clara_benchmarks.dense import DenseRetriever

    asked = []

    class Encoder:
        prompts = {"query": "query: ", "passage": "passage: "}

        def encode(self, texts, prompt_name=None, **settings):
            asked.append(prompt_name)
            return np.ones((len(texts), 2)) / np.sqrt(2)

    retriever = object.__new__(DenseRetriever)  # its encoder stands in for a sentence-transformers model
    retriever.encoder, retriever.query_instruction, retriever.passage_instruction = Encoder(), "", ""
    retriever.rank("q", ["a", "b"])
    assert asked == ["passage", "query"]
    Encoder.prompts, retriever.query_instruction = {}, "Represent this sentence: "  # BGE's way
    retriever.rank("q", ["a"])
    assert asked[2:] == [None, None]
    # E5 v2's configuration holds no prompts: its card's prefixes are given, the passages' too
    # (nothing could add "passage: ", and the dense baseline was weakened)
    seen = []
    Encoder.encode = lambda self, texts, prompt_name=None, **settings: seen.extend(texts) or np.ones((len(texts), 2))
    retriever.query_instruction, retriever.passage_instruction = "query: ", "passage: "
    retriever.rank("Who?", ["Curie won."])
    assert seen == ["passage: Curie won.", "query: Who?"]


# 10. install hints

@pytest.mark.parametrize("package, missing, extra", [
    ("langchain_clara", ["langchain_core"], "langchain"),
    ("llama_index_clara", ["llama_index", "llama_index.core"], "llamaindex"),
])
def test_a_missing_framework_names_the_extra_to_install(package, missing, extra):
    code = f"import sys\nfor name in {missing!r}:\n    sys.modules[name] = None\nimport {package}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f'pip install "clara-plugins[{extra}]"' in result.stderr


def test_a_k_below_one_is_refused_not_read_as_the_default(tiny_model):
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:3])
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        ClaraRetriever(store=store, k=0)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        ClaraRetriever(store=store).invoke("Who won prizes?", k=0)
    with pytest.raises(ValueError, match="similarity_top_k must be a positive integer, got 0"):
        llama_index_clara.ClaraRetriever(store, similarity_top_k=0)
    for reader in (langchain_clara.ChatClara, llama_index_clara.ClaraLLM):
        with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
            reader(store=store, k=0)
    chat = langchain_clara.ChatClara(store=store, max_tokens=2)
    chat.k = 0  # set after construction, which no validator sees
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        chat.invoke("Who won prizes?")


def test_llama_index_doc_ids_given_as_one_string_are_refused(llama_store):
    # "doc0" became {"$in": ["d", "o", "c", "0"]}: the query found nothing, unsaid
    with pytest.raises(InvalidInputError, match="doc_ids must be a collection of ids, got str 'doc0'"):
        llama_query(llama_store, 3, doc_ids="doc0")
