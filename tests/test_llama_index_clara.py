"""Conformance of the LlamaIndex layer: add, query, delete, filters, persist, async, query engine.

LlamaIndex ships no standard suite; these tests follow its vector-store protocol.
"""

import dataclasses
import threading
import warnings

import pytest
from fsspec.implementations.local import LocalFileSystem
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from clara_plugins import ClaraModel, InvalidInputError, StoreError
from conftest import CORPUS, randomize_adapters
from llama_index_clara import CLARA_QA_PROMPT, ClaraLLM, ClaraRetriever, ClaraSynthesizer, ClaraVectorStore
from llama_index_clara.embedding import _untaken

QUESTION = "Who won Nobel prizes?"
TOPICS = ["city", "tower", "city", "river", "science", "novel"]


def make_nodes() -> list[TextNode]:
    return [TextNode(text=text, id_=f"n{i}", metadata={"topic": topic, "n": i})
            for i, (text, topic) in enumerate(zip(CORPUS, TOPICS))]


@pytest.fixture
def vector_store(tiny_model) -> ClaraVectorStore:
    store = ClaraVectorStore(tiny_model)
    store.add(make_nodes())
    return store


def query(store: ClaraVectorStore, k: int = 3, filters=None, node_ids=None):
    return store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=k, filters=filters,
                                        node_ids=node_ids))


def test_protocol_flags():
    assert ClaraVectorStore.model_fields["stores_text"].default is True
    assert ClaraVectorStore.model_fields["is_embedding_query"].default is False


def test_add_and_query_return_whole_nodes_ranked_by_the_query_reasoner(vector_store, tiny_model):
    result = query(vector_store)
    expected = [d.id for d, _ in vector_store.client.search(QUESTION, k=3)]
    assert result.ids == expected and len(result.similarities) == 3
    node = result.nodes[0]
    original = {n.node_id: n for n in make_nodes()}[node.node_id]
    assert node.get_content() == original.get_content() and node.metadata == original.metadata
    assert result.similarities == sorted(result.similarities, reverse=True)


def test_filters(vector_store):
    city = MetadataFilters(filters=[MetadataFilter(key="topic", value="city")])
    assert set(query(vector_store, 6, city).ids) == {"n0", "n2"}
    either = MetadataFilters(filters=[MetadataFilter(key="topic", value="river"),
                                      MetadataFilter(key="n", value=[4, 5], operator=FilterOperator.IN)],
                             condition=FilterCondition.OR)
    assert set(query(vector_store, 6, either).ids) == {"n3", "n4", "n5"}
    nested = MetadataFilters(filters=[city, MetadataFilter(key="n", value=0, operator=FilterOperator.NE)])
    assert query(vector_store, 6, nested).ids == ["n2"]
    outside = MetadataFilters(filters=[MetadataFilter(key="n", value=[0, 1, 2, 3], operator=FilterOperator.NIN)])
    assert set(query(vector_store, 6, outside).ids) == {"n4", "n5"}
    for operator, value in ((FilterOperator.NE, 1), (FilterOperator.NIN, [1])):  # LlamaIndex's own store differs:
        absent = MetadataFilters(filters=[MetadataFilter(key="absent", value=value, operator=operator)])
        assert query(vector_store, 6, absent).ids == []  # a node without the field matches no operator
    with_an_empty_group = MetadataFilters(filters=[city, MetadataFilters(filters=[])])
    assert set(query(vector_store, 6, with_an_empty_group).ids) == {"n0", "n2"}
    for empty in (MetadataFilters(filters=[]), MetadataFilters(filters=[MetadataFilters(filters=[])])):
        with pytest.raises(InvalidInputError, match="under an or holds no filter"):  # it matched every node
            query(vector_store, 6, MetadataFilters(filters=[city, empty], condition=FilterCondition.OR))
    with pytest.raises(NotImplementedError, match="not supported"):
        query(vector_store, 2, MetadataFilters(filters=[MetadataFilter(key="topic", value="cit",
                                                                       operator=FilterOperator.TEXT_MATCH)]))


def test_query_restricted_to_node_ids(vector_store):
    assert set(query(vector_store, 5, node_ids=["n1", "n3"]).ids) == {"n1", "n3"}


def test_a_query_restricted_to_every_stored_node_searches_the_stores_index(vector_store, monkeypatch):
    # an index built with store_nodes_override=True names every node it holds in each query: the
    # store scored every document exactly, read from its memories, whatever index it was built with
    searched = []
    real = vector_store._store.search
    monkeypatch.setattr(vector_store._store, "search", lambda *args, ids=None, **kwargs: searched.append(ids)
                        or real(*args, ids=ids, **kwargs))
    every = vector_store._store.all_ids()
    assert query(vector_store, 2, node_ids=[*every, "not stored"]).ids == query(vector_store, 2).ids
    assert set(query(vector_store, 5, node_ids=every[:2]).ids) == set(every[:2])
    assert searched == [None, None, every[:2]]
    # MMR's pool of candidates is not returned, so a node written meanwhile could sit in it unseen: restricted as asked
    vector_store.query(VectorStoreQuery(query_str=QUESTION, similarity_top_k=2, node_ids=every, mode="mmr"))
    assert searched[-1] == every


def test_a_node_written_between_the_check_and_the_search_stays_out_of_a_restricted_query(vector_store, monkeypatch):
    # the restriction was dropped for naming every stored node, and another index sharing the store wrote one since
    every = vector_store._store.all_ids()
    real = vector_store._store.search

    def written_meanwhile(*args, ids=None, **kwargs):
        if "late" not in vector_store._store.all_ids():
            vector_store._store.upsert([QUESTION], ids=["late"])
        return real(*args, ids=ids, **kwargs)

    monkeypatch.setattr(vector_store._store, "search", written_meanwhile)
    found = query(vector_store, len(every) + 1, node_ids=every).ids
    assert sorted(found) == sorted(every)


def test_a_query_restricted_to_node_ids_none_of_which_is_stored_warns(tiny_model):
    # LlamaIndex restricts an index's queries to its IndexNode and ImageNode ids: an image node
    # without text (its metadata its only content), left out of the store, made every query find
    # nothing, unsaid
    from llama_index.core.schema import ImageNode

    store = ClaraVectorStore(tiny_model)
    figure = ImageNode(text="", id_="figure", metadata={"file_path": "figure-1.png"})
    with pytest.warns(UserWarning, match="1 of 3 nodes have no text"):
        index = VectorStoreIndex([figure, *make_nodes()[:2]],
                                 storage_context=StorageContext.from_defaults(vector_store=store),
                                 embed_model=store.embed_model)
    with pytest.warns(UserWarning, match="none of the 1 node_ids .* store_nodes_override=True"):
        assert index.as_retriever(similarity_top_k=2).retrieve(QUESTION) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(query(store, 5, node_ids=["n1", "figure"]).ids) == {"n1"}


def test_query_restricted_to_source_documents(tiny_model):
    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents(
        [Document(text=CORPUS[0], id_="docA"), Document(text=CORPUS[1], id_="docB"), Document(text=CORPUS[4])],
        storage_context=StorageContext.from_defaults(vector_store=store), embed_model=store.embed_model)
    nodes = index.as_retriever(similarity_top_k=3, doc_ids=["docA", "docB"]).retrieve(QUESTION)
    assert {n.node.ref_doc_id for n in nodes} == {"docA", "docB"}


def test_documents_another_writer_stored_come_back_as_text_nodes(tiny_model):
    from langchain_clara import ClaraVectorStore as LangChainStore

    shared = LangChainStore.from_texts(CORPUS[:3], model=tiny_model, metadatas=[{"i": i} for i in range(3)])
    nodes = ClaraRetriever(shared, similarity_top_k=2).retrieve(QUESTION)
    stored = {d.id: d for d in shared.store.get(shared.store.all_ids())}
    assert len(nodes) == 2
    for node in nodes:
        assert node.node.get_content() == stored[node.node.node_id].text
        assert node.node.metadata == stored[node.node.node_id].metadata
    for bad in (2.5, True, 0):  # 2.5 and True were taken, and failed at the first query
        with pytest.raises(InvalidInputError, match="similarity_top_k must be a positive integer"):
            ClaraRetriever(shared, similarity_top_k=bad)
    # the default is the model's k at each query, as ClaraLLM reads it (it was fixed at construction)
    retriever = ClaraRetriever(shared)
    tiny_model.config.generation_top_k = 1
    assert len(retriever.retrieve(QUESTION)) == 1 and retriever.similarity_top_k == 1


def test_a_field_named_as_a_nodes_json_that_holds_none_comes_back_as_a_text_node(tiny_model):
    # another writer's "_node_content" (not JSON, nested past Python's reach) failed every query that found it
    from langchain_clara import ClaraVectorStore as LangChainStore

    odd = [{"_node_content": "x"}, {"_node_content": "[" * 100_000 + "]" * 100_000}, {"_node_content": 5}]
    shared = LangChainStore.from_texts(CORPUS[:3], model=tiny_model, metadatas=odd, ids=["a", "b", "c"])
    nodes = ClaraRetriever(shared, similarity_top_k=3).retrieve(QUESTION)
    assert sorted((n.node.node_id, n.node.get_content()) for n in nodes) == list(zip(["a", "b", "c"], CORPUS[:3]))
    assert {n.node.node_id: n.node.metadata for n in nodes} == dict(zip(["a", "b", "c"], odd))


def test_nodes_this_store_wrote_come_back_to_langchain_with_their_own_metadata(tiny_model):
    # LangChain's retriever handed on the node's JSON, node type and three copies of its document id
    from langchain_clara import ClaraRetriever as LangChainRetriever

    store = ClaraVectorStore(tiny_model)
    store.add([TextNode(text=CORPUS[i], id_=f"n{i}", metadata={"i": i}) for i in range(3)])
    documents = LangChainRetriever(store=store, k=3).invoke(QUESTION)
    assert sorted(d.metadata["i"] for d in documents) == [0, 1, 2]
    assert all(set(d.metadata) == {"i", "score"} for d in documents)  # the score: the retriever's


def test_a_store_searched_by_a_langchain_embedding_persists_and_reopens_with_it(tiny_model, tmp_path):
    # the keys of a LangChain store's embedding could not be given back: the reopened store was refused
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from langchain_clara import ClaraVectorStore as LangChainStore
    from langchain_clara.embeddings import EmbeddingsKeys

    embedding = DeterministicFakeEmbedding(size=16)
    store = ClaraVectorStore(store=LangChainStore(tiny_model, embedding))
    store.add(make_nodes())
    store.persist(str(tmp_path / "d" / "default__vector_store.json"))
    with pytest.raises(StoreError, match="was indexed with keys"):
        ClaraVectorStore.from_persist_dir(tmp_path / "d", tiny_model)
    loaded = ClaraVectorStore.from_persist_dir(tmp_path / "d", tiny_model, keys=EmbeddingsKeys(embedding))
    assert query(loaded).ids == query(store).ids


def test_delete_by_ref_doc_and_by_node(tiny_model):
    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents(
        [Document(text=CORPUS[0], id_="docA"), Document(text=CORPUS[1], id_="docB")],
        storage_context=StorageContext.from_defaults(vector_store=store), embed_model=store.embed_model)
    assert len(store.client) == 2
    index.delete_ref_doc("docA")
    assert [n.ref_doc_id for n in store.get_nodes()] == ["docB"]
    store.delete_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="ref_doc_id", value="docB")]))
    assert store.get_nodes() == []


def test_the_llm_and_the_embedding_serialise_their_settings(tiny_model, vector_store, tmp_path):
    # to_json raised TypeError: the CLaRa model and the store were dumped as settings
    import json

    from llama_index_clara import ClaraEmbedding

    assert json.loads(ClaraLLM(clara=tiny_model, store=vector_store, k=2).to_json())["k"] == 2
    # read back with the store passed again; alone, the shipped checkpoint answered unsaid
    text = ClaraLLM(clara=tiny_model, store=vector_store, k=2, max_new_tokens=3).to_json()
    again = ClaraLLM.from_json(text, store=vector_store)
    assert (again.clara, again.k, again.max_new_tokens) == (tiny_model, 2, 3)
    assert ClaraLLM.from_dict({**json.loads(text), "clara": tiny_model}).clara is tiny_model  # in the data too
    with pytest.raises(InvalidInputError, match="settings hold no CLaRa model or store: pass them again"):
        ClaraLLM.from_json(text)
    assert json.loads(ClaraEmbedding(clara=tiny_model).to_json())["class_name"] == "ClaraEmbedding"
    # read back with its model passed again, and that model alone: the shipped checkpoint embedded unsaid
    text = ClaraEmbedding(clara=tiny_model, embed_batch_size=3).to_json()
    assert ClaraEmbedding.from_json(text, clara=tiny_model).embed_batch_size == 3
    assert ClaraEmbedding.from_dict(ClaraEmbedding(clara=tiny_model).to_dict(), clara=tiny_model).clara is tiny_model
    with pytest.raises(InvalidInputError, match="settings hold no CLaRa model: pass it again"):
        ClaraEmbedding.from_json(text)
    # and the settings tell models apart: an ingestion cache keys on them
    other = ClaraModel(dataclasses.replace(tiny_model.config, compression_rate=8), device="cpu")
    assert ClaraEmbedding(clara=tiny_model).to_dict() != ClaraEmbedding(clara=other).to_dict()
    retrained = ClaraModel(tiny_model.config, device="cpu")  # the same settings, other weights
    randomize_adapters(retrained, seed=7)
    assert ClaraEmbedding(clara=tiny_model).to_dict() != ClaraEmbedding(clara=retrained).to_dict()
    with pytest.raises(InvalidInputError, match="a store of these settings was written by another compressor"):
        ClaraEmbedding.from_json(text, clara=retrained)
    # the same checkpoint in another dtype is that model (its fingerprint's norms differ in their last digits)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    half = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype="bfloat16")
    assert ClaraEmbedding.from_json(text, clara=half).clara is half


def test_a_blank_document_is_left_out_and_the_index_builds(tiny_model):
    # a blank page a reader made a node of refused the whole batch, with or without metadata
    store = ClaraVectorStore(tiny_model)
    documents = [Document(text="", metadata={"page_label": "2"}), Document(text=""), Document(text=CORPUS[0])]
    with pytest.warns(UserWarning, match="1 of 2 nodes have no text and are not stored"):  # the splitter drops one
        index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(
            vector_store=store), embed_model=store.embed_model)
    assert [d.text for d in store.client.get(store.client.all_ids())] == [CORPUS[0]]
    # the embedding compressed the node with metadata; its memories, no store's to take, are not kept
    assert not _untaken.get(tiny_model)
    assert len(index.as_retriever(similarity_top_k=3).retrieve(QUESTION)) == 1
    blank, filled = store.embed_model.get_text_embedding_batch(["", CORPUS[1]])  # compressing "" was refused
    assert blank == [1.0] + [0.0] * (len(filled) - 1)  # a unit vector: cosine stores divide by its norm


def test_a_document_whose_metadata_is_no_valid_unicode_is_refused_by_name(tiny_model):
    # a reader's file_path of a name not in UTF-8 (a zip made on Windows) failed in the tokenizer,
    # on a TypeError naming neither document nor field
    store = ClaraVectorStore(tiny_model)
    document = Document(text=CORPUS[0], metadata={"file_path": "/data/Pr\udce4sentation.txt"})
    with pytest.raises(ValueError, match=r"a document's metadata are not valid Unicode text .*Pr\\udce4sentation"):
        VectorStoreIndex.from_documents([document], storage_context=StorageContext.from_defaults(vector_store=store),
                                        embed_model=store.embed_model)
    assert len(store.client) == 0


def test_get_nodes_and_clear(vector_store):
    assert [n.node_id for n in vector_store.get_nodes(["n4", "missing", "n1"])] == ["n4", "n1"]
    for call in (vector_store.get_nodes, vector_store.delete_nodes):  # the id's letters were looked up
        with pytest.raises(InvalidInputError, match="node_ids must be a collection of ids, got str"):
            call("n1")
    assert len(vector_store.get_nodes()) == len(CORPUS)
    # ignored, LangChain's filter= and an empty selection deleted every node
    city = MetadataFilters(filters=[MetadataFilter(key="topic", value="city")])
    for call in (lambda: vector_store.delete_nodes(filter=city), lambda: vector_store.delete_nodes(node_id=["n1"])):
        with pytest.raises(TypeError, match="delete_nodes takes no"):
            call()
    for call in (lambda: vector_store.delete("n1", delete_from_docstroe=True),
                 lambda: vector_store.add([TextNode(text="x", id_="x")], bogus=1)):
        with pytest.raises(TypeError, match="takes no"):
            call()
    for empty in (MetadataFilters(filters=[]), MetadataFilters(filters=[MetadataFilters(filters=[])])):
        with pytest.raises(InvalidInputError, match="select every node: call clear"):
            vector_store.delete_nodes(filters=empty)
    assert len(vector_store.get_nodes()) == len(CORPUS)
    vector_store.clear()
    assert vector_store.get_nodes() == [] and query(vector_store).ids == []


def test_filtered_nodes_are_chosen_and_read_in_one_hold_of_the_store(vector_store, monkeypatch):
    # chosen, then read: a node another thread replaced between the two came back though the
    # filters no longer selected it
    import threading

    store, chosen = vector_store.client, vector_store.client.ids_where
    writers = []

    def replaced_once_chosen(where, among=None):
        ids = chosen(where, among)
        writers.append(threading.Thread(target=store.upsert, args=(["Replaced."], ["n0"], [{"topic": "gone"}])))
        writers[-1].start()
        writers[-1].join(1.0)  # it waits for the store's lock while the reader holds it
        return ids

    monkeypatch.setattr(store, "ids_where", replaced_once_chosen)
    city = MetadataFilters(filters=[MetadataFilter(key="topic", value="city")])
    nodes = vector_store.get_nodes(filters=city)
    writers[0].join(30)
    assert [(n.node_id, n.metadata["topic"]) for n in nodes] == [("n0", "city"), ("n2", "city")]
    assert store.get(["n0"])[0].metadata == {"topic": "gone"}


def test_persist_and_reload(vector_store, tiny_model, tmp_path, monkeypatch):
    vector_store.persist(str(tmp_path / "store"))
    loaded = ClaraVectorStore.from_persist_path(tmp_path / "store", tiny_model)
    assert query(loaded).ids == query(vector_store).ids
    # a file:// path, as LlamaIndex's JSON stores take it, was a folder named "file:" in the working directory
    monkeypatch.chdir(tmp_path)
    vector_store.persist(f"file://{tmp_path}/uri/default__vector_store.json", fs=LocalFileSystem())
    assert (tmp_path / "uri" / "default__vector_store.clara" / "CURRENT").is_file() and not (tmp_path / "file:").exists()
    assert query(ClaraVectorStore.from_persist_dir(f"file://{tmp_path}/uri", tiny_model)).ids == query(vector_store).ids
    vector_store.persist(f"file:{tmp_path}/uri2/default__vector_store.json")  # as StorageContext.persist passes it
    assert (tmp_path / "uri2" / "default__vector_store.clara" / "CURRENT").is_file() and not (tmp_path / "file:").exists()
    with pytest.raises(NotImplementedError, match="local file system only"):
        vector_store.persist("s3://bucket/store.json")
    # a store folder named as itself (clara index --store, LangChain's save_local) was looked for as store.clara
    vector_store.persist(str(tmp_path / "folder.json"))
    (tmp_path / "folder.clara").rename(tmp_path / "folder")
    reopened = ClaraVectorStore.from_persist_path(tmp_path / "folder", tiny_model)
    assert query(reopened).ids == query(vector_store).ids
    reopened.delete_nodes(["n0"])  # and persisted there again, not into a folder.clara beside it
    reopened.persist(str(tmp_path / "folder"))
    assert not (tmp_path / "folder.clara").exists()
    assert len(ClaraVectorStore.from_persist_path(tmp_path / "folder", tiny_model).get_nodes()) == 5
    # and where there is no store, it is refused before the shipped model loads (seconds to a minute)
    monkeypatch.setattr("llama_index_clara.vector_store.load_model", lambda: pytest.fail("the shipped model loaded"))
    with pytest.raises(StoreError, match="is not a CLaRa memory store"):
        ClaraVectorStore.from_persist_path(tmp_path / "nothing")


def test_persist_paths_that_differ_after_a_dot_are_two_stores(vector_store, tiny_model, tmp_path):
    vector_store.persist(str(tmp_path / "run.v1"))
    vector_store.delete_nodes(["n0"])
    vector_store.persist(str(tmp_path / "run.v2"))
    loaded = [ClaraVectorStore.from_persist_path(tmp_path / name, tiny_model) for name in ("run.v1", "run.v2")]
    assert [len(store.get_nodes()) for store in loaded] == [6, 5]
    (tmp_path / "run.v2.clara").rename(tmp_path / "run.clara")  # where an earlier version saved it, and run.v1
    with pytest.raises(StoreError, match=r"no store at .*run.v2.clara; earlier versions may have saved .*run.v2 to .*run.clara"):
        ClaraVectorStore.from_persist_path(tmp_path / "run.v2", tiny_model)


async def test_async_methods(tiny_model):
    store = ClaraVectorStore(tiny_model)
    assert await store.async_add(make_nodes()) == [f"n{i}" for i in range(6)]
    result = await store.aquery(VectorStoreQuery(query_str=QUESTION, similarity_top_k=2))
    assert len(result.ids) == 2
    await store.adelete_nodes(["n0"])
    assert "n0" not in [n.node_id for n in await store.aget_nodes()]


async def test_async_methods_compress_search_and_generate_off_the_event_loop(tiny_model, monkeypatch):
    threads = []
    for name in ("compress", "encode_queries", "stream"):
        real = getattr(tiny_model, name)
        monkeypatch.setattr(tiny_model, name, lambda *a, _real=real, **k: threads.append(threading.current_thread())
                            or _real(*a, **k))
    store = ClaraVectorStore(tiny_model)
    await store.async_add(make_nodes())
    await store.aquery(VectorStoreQuery(query_str=QUESTION, similarity_top_k=2))
    llm, ask = ClaraLLM(clara=tiny_model, store=store, max_new_tokens=2), [ChatMessage(role="user", content="Who?")]
    completed = (await llm.acomplete("Who won?")).text
    streamed = "".join([r.delta async for r in await llm.astream_chat(ask)])
    await store.embed_model.aget_text_embedding_batch(["A text to embed."])
    await store.embed_model.aget_text_embedding("Another text to embed.")
    await store.embed_model.aget_query_embedding(QUESTION)
    await ClaraRetriever(store).aretrieve(QUESTION)
    assert len(threads) >= 8 and threading.current_thread() not in threads
    monkeypatch.undo()
    assert (completed, streamed) == (llm.complete("Who won?").text, llm.chat(ask).message.content)


def test_token_counting_counts_the_positions_the_generator_read(tiny_model):
    # LlamaIndex's counter found no usage and counted the prompt's text, documents read as memory
    # tokens included
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    counter = TokenCountingHandler(tokenizer=lambda text: tiny_model.tokenizer(text)["input_ids"])
    store = ClaraVectorStore(tiny_model)
    store.add(make_nodes())
    llm = ClaraLLM(clara=tiny_model, store=store, max_new_tokens=3, callback_manager=CallbackManager([counter]))
    prompt = CLARA_QA_PROMPT.format(context_str="\n\n".join(CORPUS[:3]), query_str=QUESTION)
    whole = llm.complete(prompt)
    streamed = list(llm.stream_chat([ChatMessage(role="user", content=prompt)]))[-1]
    read = [response.additional_kwargs["clara"]["input_positions"] for response in (whole, streamed)]
    assert [event.prompt_token_count for event in counter.llm_token_counts] == read
    assert [event.completion_token_count for event in counter.llm_token_counts] == [
        len(tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in (whole.text, streamed.message.content)]


async def test_each_async_call_fires_its_llm_callbacks_once(tiny_model):
    # the async methods ran the decorated sync ones on a worker thread: every start and end event
    # fired twice, and a token counter counted each call's tokens twice
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

    handler = LlamaDebugHandler()
    llm = ClaraLLM(clara=tiny_model, max_new_tokens=2, callback_manager=CallbackManager([handler]))
    ask = [ChatMessage(role="user", content="Who?")]
    await llm.acomplete("Who won?")
    await llm.achat(ask)
    [r async for r in await llm.astream_complete("Who won?")]
    [r async for r in await llm.astream_chat(ask)]
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 4
    llm.complete("Who won?")
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 5


def test_embed_model_hands_memories_over_instead_of_compressing_twice(tiny_model, monkeypatch):
    store = ClaraVectorStore(tiny_model)
    calls = []
    real = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress", lambda docs, *a, **k: calls.append(len(docs)) or real(docs, *a, **k))
    VectorStoreIndex.from_documents([Document(text=t) for t in CORPUS[:3]],
                                    storage_context=StorageContext.from_defaults(vector_store=store),
                                    embed_model=store.embed_model)
    assert sum(calls) == 3 and len(store.client) == 3


def test_query_engine_answers_from_memory_tokens_without_openai(tiny_model):
    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents(
        [Document(text=t, metadata={"i": i}) for i, t in enumerate(CORPUS)],
        storage_context=StorageContext.from_defaults(vector_store=store), embed_model=store.embed_model)
    llm = ClaraLLM(clara=tiny_model, store=store.client)
    engine = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm), similarity_top_k=2)
    response = engine.query(QUESTION)
    ids = [n.node.node_id for n in response.source_nodes]
    assert ids == [d.id for d, _ in store.client.search(QUESTION, k=2)]
    expected = tiny_model.generate_from_compressed_documents_and_questions(
        [QUESTION], store.client.memories(ids).unsqueeze(0))[0]
    assert response.response.strip() == expected
    streaming = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm, streaming=True),
                                      similarity_top_k=2)
    assert "".join(streaming.query(QUESTION).response_gen).strip() == expected
    assert Settings._llm is None and Settings._embed_model is store.embed_model  # no default (OpenAI) was resolved


async def test_async_query_engine(tiny_model):
    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in CORPUS],
                                            storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=store.embed_model)
    llm = ClaraLLM(clara=tiny_model, store=store.client)
    engine = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm), similarity_top_k=2)
    assert (await engine.aquery(QUESTION)).response == engine.query(QUESTION).response
    streaming = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm, streaming=True),
                                      similarity_top_k=2)
    tokens = [token async for token in (await streaming.aquery(QUESTION)).async_response_gen()]
    assert "".join(tokens) == engine.query(QUESTION).response


def test_a_node_a_postprocessor_rewrote_is_read_as_it_is_now(tiny_model):
    from llama_index.core.postprocessor.types import BaseNodePostprocessor

    class Rewrite(BaseNodePostprocessor):
        def _postprocess_nodes(self, nodes, query_bundle=None):
            for n in nodes:
                n.node.set_content(CORPUS[5])  # e.g. a sentence window in place of its sentence
            return nodes

    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in CORPUS[:3]],
                                            storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=store.embed_model)
    llm = ClaraLLM(clara=tiny_model, store=store.client)
    engine = index.as_query_engine(llm=llm, response_synthesizer=ClaraSynthesizer(llm), similarity_top_k=1,
                                   node_postprocessors=[Rewrite()])
    assert engine.query(QUESTION).response == llm.complete(QUESTION, documents=[CORPUS[5]]).text


def test_the_synthesizer_reads_the_llms_system_prompt_and_the_calls_options(tiny_model, monkeypatch):
    # LlamaIndex's synthesizers put the LLM's system prompt in the prompt: this one dropped it, and
    # every option of the call (max_tokens, document_ids, a mistyped one) went unread
    from llama_index.core.schema import NodeWithScore, TextNode

    nodes = [NodeWithScore(node=TextNode(text=t)) for t in CORPUS[:2]]
    llm = ClaraLLM(clara=tiny_model, system_prompt="Answer in one word.")
    read = []
    real = tiny_model.stream

    def stream(prompt, memories, limit):
        read.append((prompt, limit))
        return real(prompt, memories, limit)

    monkeypatch.setattr(tiny_model, "stream", stream)
    ClaraSynthesizer(llm).synthesize(QUESTION, nodes, max_tokens=1)
    assert "Answer in one word." in read[-1][0] and read[-1][1] == 1
    for option, message in [({"max_tokenz": 1}, "max_tokenz"), ({"documents": [CORPUS[3]]}, "document_ids")]:
        with pytest.raises(TypeError, match=message):  # documents: Python's "multiple values" error
            ClaraSynthesizer(llm).synthesize(QUESTION, nodes, **option)


def test_stored_nodes_are_read_from_memories_beside_a_node_from_elsewhere(tiny_model):
    # one node outside the store had every node compressed again, with LlamaIndex's metadata in its text
    from llama_index.core.schema import NodeWithScore, TextNode

    store = ClaraVectorStore(tiny_model)
    index = VectorStoreIndex.from_documents([Document(text=t, metadata={"source": "a.txt"}) for t in CORPUS[:3]],
                                            storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=store.embed_model)
    nodes = index.as_retriever(similarity_top_k=2).retrieve(QUESTION) + [NodeWithScore(node=TextNode(text=CORPUS[5]))]
    llm = ClaraLLM(clara=tiny_model, store=store.client)
    ClaraSynthesizer(llm).synthesize(QUESTION, nodes)
    assert (llm.stats.stored_documents, llm.stats.compressed_documents) == (2, 1)


def test_retriever_and_llm_on_their_own(vector_store, tiny_model):
    nodes = ClaraRetriever(vector_store, similarity_top_k=2).retrieve(QUESTION)
    assert [n.node.node_id for n in nodes] == query(vector_store, 2).ids
    llm = ClaraLLM(clara=tiny_model, store=vector_store.client)
    by_ids = llm.complete(QUESTION, document_ids=["n1", "n2"]).text
    by_text = llm.complete(QUESTION, documents=[CORPUS[1], CORPUS[2]]).text
    assert by_ids == by_text
    # retrieved nodes are read by their content (an AttributeError without a store, unhashable with one)
    assert llm.complete(QUESTION, documents=nodes).text == \
        llm.complete(QUESTION, document_ids=[n.node.node_id for n in nodes]).text
    assert ClaraLLM(clara=tiny_model).complete(QUESTION, documents=[n.node for n in nodes]).text == \
        ClaraLLM(clara=tiny_model).complete(QUESTION, documents=[n.node.get_content() for n in nodes]).text
    assert "".join(r.delta for r in llm.stream_complete(QUESTION, document_ids=["n1", "n2"])) == by_ids
    # as ChatClara reads them (both were dropped): a message's document ids, the call's max_tokens
    asked = ChatMessage(role="user", content=QUESTION, additional_kwargs={"document_ids": ["n1", "n2"]})
    assert llm.chat([asked]).message.content == by_ids
    short = llm.complete(QUESTION, document_ids=["n1", "n2"], max_tokens=1).text
    assert len(tiny_model.tokenizer.encode(short, add_special_tokens=False)) <= 1 and by_ids.startswith(short)


def test_an_ingestion_pipeline_ending_with_the_stores_embedding_stores_its_nodes(tiny_model):
    # the docstring's advice: the pipeline hands the store only the nodes that carry an embedding
    from llama_index.core.ingestion import IngestionPipeline

    documents = [Document(text=t) for t in CORPUS[:3]]
    bare = ClaraVectorStore(tiny_model)
    IngestionPipeline(transformations=[], vector_store=bare).run(documents=documents)
    assert len(bare.client) == 0  # why the advice is given
    store = ClaraVectorStore(tiny_model)
    IngestionPipeline(transformations=[store.embed_model], vector_store=store).run(documents=documents)
    assert sorted(d.text for d in store.client.get(store.client.all_ids())) == sorted(CORPUS[:3])


def test_an_ingestion_pipeline_given_the_stores_transformations_stores_chunks_read_whole(tiny_model):
    # a pipeline's own splitter makes 1,024-token chunks, compressed from their first 256 tokens
    from llama_index.core.ingestion import IngestionPipeline

    store = ClaraVectorStore(tiny_model)
    IngestionPipeline(transformations=store.transformations, vector_store=store).run(
        documents=[Document(text=" ".join(CORPUS * 3))])
    chunks = [d.text for d in store.client.get(store.client.all_ids())]
    limit = tiny_model.config.doc_max_length
    assert len(chunks) > 1 and all(len(tiny_model.tokenizer.encode(c, add_special_tokens=False)) <= limit
                                   for c in chunks)


def test_the_store_compresses_in_its_batch_size_and_refuses_what_it_would_not_read(tiny_model, monkeypatch):
    # batch_size and misspelt arguments were swallowed: every compression ran in batches of 8
    from clara_plugins import MemoryStore

    batches = []
    compress = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress",
                        lambda docs, batch_size=8, *a, **kw: batches.append(batch_size) or compress(docs, batch_size, *a, **kw))
    store = ClaraVectorStore(tiny_model, batch_size=2)
    assert store.memory_store.batch_size == 2 and store.embed_model.embed_batch_size == 2
    VectorStoreIndex.from_documents([Document(text=t) for t in CORPUS[:3]],
                                    storage_context=StorageContext.from_defaults(vector_store=store))
    store.add([TextNode(text=CORPUS[4])])  # compressed by the store itself
    assert batches and set(batches) == {2}
    with pytest.raises(InvalidInputError, match="batch_size would go unused beside store="):
        ClaraVectorStore(store=MemoryStore(tiny_model), batch_size=2)
    assert ClaraVectorStore(tiny_model, memory_dtype="int8").memory_store.memory_dtype == "int8"  # a TypeError
    with pytest.raises(TypeError, match="indx"):
        ClaraVectorStore(tiny_model, indx="hnsw")
    retriever = VectorStoreIndex.from_vector_store(store).as_retriever(
        vector_store_query_mode="mmr", vector_store_kwargs={"mmr_treshold": 0.2})
    with pytest.raises(ValueError, match="reads no query option 'mmr_treshold'"):
        retriever.retrieve(QUESTION)


def test_a_model_beside_a_store_must_be_the_stores_own(tiny_model, tiny_config):
    from clara_plugins import ClaraModel, InvalidInputError, MemoryStore

    with pytest.raises(InvalidInputError, match="model is not the model of store"):
        ClaraVectorStore(ClaraModel(tiny_config, device="cpu"), store=MemoryStore(tiny_model))
    ClaraVectorStore(tiny_model, store=MemoryStore(tiny_model))  # its own: accepted
    with pytest.raises(InvalidInputError, match="index would go unused beside store="):  # it kept the store's flat
        ClaraVectorStore(store=MemoryStore(tiny_model), index="hnsw")


def test_documents_are_split_into_chunks_the_compressor_reads_whole(tiny_model, tiny_config, monkeypatch):
    import dataclasses

    from llama_index.core.node_parser import SentenceSplitter

    monkeypatch.setattr(Settings, "_node_parser", None)  # LlamaIndex's default: 1,024-token chunks
    monkeypatch.setattr(Settings, "_transformations", None)
    store = ClaraVectorStore(tiny_model)
    # a reader's metadata is compressed beside each chunk's text: its template's separator too
    page = {"file_path": "/data/reports/2024/annual_report.pdf", "page_label": "12"}
    VectorStoreIndex.from_documents([Document(text=" ".join(CORPUS)), Document(text=" ".join(CORPUS), metadata=page)],
                                    storage_context=StorageContext.from_defaults(vector_store=store))
    chunks = [node.get_content(metadata_mode=MetadataMode.EMBED) for node in store.get_nodes()]
    limit = tiny_model.config.doc_max_length  # longer ones were compressed from their first tokens alone
    assert len(chunks) > 2 and all(len(tiny_model.tokenizer.encode(c, add_special_tokens=False)) <= limit
                                   for c in chunks)
    Settings.transformations  # an index asked LlamaIndex for them: [the parser]
    ClaraVectorStore(ClaraModel(dataclasses.replace(tiny_config, doc_max_length=32), device="cpu"))
    assert Settings._node_parser.chunk_size == 30  # an earlier store's chunks fit another model (2 tokens spare)
    assert Settings.transformations == [Settings._node_parser]
    own = SentenceSplitter(chunk_size=1024)
    monkeypatch.setattr(Settings, "_node_parser", own)
    ClaraVectorStore(tiny_model)
    assert Settings._node_parser is own  # a parser the user chose is kept
    # metadata filling a whole chunk: LlamaIndex advised a larger chunk size, which the compressor cuts
    monkeypatch.setattr(Settings, "_node_parser", None)
    store = ClaraVectorStore(tiny_model)
    abstract = {"abstract": " ".join(CORPUS * 6)}
    with pytest.raises(ValueError, match="metadata take .* excluded_embed_metadata_keys"):
        VectorStoreIndex.from_documents([Document(text=CORPUS[0], metadata=abstract)],
                                        storage_context=StorageContext.from_defaults(vector_store=store))
    left_out = Document(text=CORPUS[0], metadata=abstract, excluded_embed_metadata_keys=["abstract"])
    VectorStoreIndex.from_documents([left_out], storage_context=StorageContext.from_defaults(vector_store=store))


def test_an_empty_answer_streams_one_empty_response(tiny_model, monkeypatch):
    # no response at all failed LlamaIndex's callback ("Input should be ... CompletionResponse")
    llm = ClaraLLM(clara=tiny_model, max_new_tokens=1)
    monkeypatch.setattr(tiny_model, "stream", lambda *args, **kwargs: iter(()))
    assert [r.text for r in llm.stream_complete(QUESTION)] == [""]
    assert [r.message.content for r in llm.stream_chat([ChatMessage(role="user", content=QUESTION)])] == [""]


def test_clara_llm_refuses_a_misspelt_setting(tiny_model):
    # ClaraLLM(model=m) answered from the shipped checkpoint
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="model\n  Extra inputs are not permitted"):
        ClaraLLM(model=tiny_model)


def test_every_llama_index_role_is_read_as_its_kind():
    from llama_index_clara.llm import _as_pairs

    messages = [ChatMessage(role=role, content=role) for role in ("developer", "model", "chatbot", "tool")]
    assert [role for role, _ in _as_pairs(messages)] == ["system", "assistant", "assistant", "user"]


def test_a_message_the_generator_cannot_read_is_refused_before_any_work(tiny_model, monkeypatch):
    # an image block was dropped (the answer as if none was sent); a typed control token ended a
    # turn or took a memory's place; a blank last message with two documents named an internal argument
    from llama_index.core.base.llms.types import ImageBlock, TextBlock

    from clara_plugins import MemoryStore
    from clara_plugins.context import read_messages

    monkeypatch.setattr(tiny_model, "compress_documents", lambda *a, **k: pytest.fail("a document was compressed"))
    llm = ClaraLLM(clara=tiny_model)
    picture = ChatMessage(role="user", blocks=[TextBlock(text="What is in this picture?"),
                                               ImageBlock(url="https://example.com/a.png")])
    with pytest.raises(InvalidInputError, match="ClaraLLM reads text only: message 0 holds ImageBlock"):
        llm.chat([picture])
    for typed in ("<MEM0>", "<SEP>", tiny_model.tokenizer.eos_token):
        with pytest.raises(InvalidInputError, match=f"message 0 holds '{typed}', one of the tokenizer's control"):
            llm.complete(f"{CORPUS[0]} What does {typed} mean?", documents=[CORPUS[1]])
    monkeypatch.undo()
    # an added token with no control role (SmolLM2's <filename>) is a word of the text
    tiny_model.tokenizer.add_tokens(["<filename>"], special_tokens=True)
    assert "<filename>" in read_messages(tiny_model, [("user", "What does <filename> mean?")]).prompt
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    with pytest.raises(InvalidInputError, match="the last user message holds no text to rank its 2 documents by"):
        read_messages(tiny_model, [("system", "Who won?"), ("user", " ")], store, ids=["a", "b"])
    # nor documents alone, which were ranked by their own text
    with pytest.raises(InvalidInputError, match="the last user message holds no text to rank its 2 documents by"):
        read_messages(tiny_model, [("system", "Who won?"), ("user", f"{CORPUS[0]}\n\n{CORPUS[1]}")], store, k=1)
    # a document left out by k joins the text around it: a control token made so is refused too
    spliced = "".join(f"</{text}s>\n" for text in CORPUS[:2]) + "Which city?"
    with pytest.raises(InvalidInputError, match="holds '</s>', one of the tokenizer's control tokens"):
        read_messages(tiny_model, [("user", spliced)], store, k=1)
    with pytest.raises(InvalidInputError, match="message 0 is not valid Unicode text: surrogates not allowed"):
        read_messages(tiny_model, [("user", "what is \ud800 here?")], store, ids=["a"])


def test_the_adapters_repr_names_no_torch_model(tiny_model, vector_store):
    # pydantic's repr printed the whole model, and LangChain hands every callback that repr
    from langchain_clara import ChatClara
    from llama_index_clara import ClaraEmbedding

    for adapter in (ChatClara(clara=tiny_model, store=vector_store.client), ClaraLLM(clara=tiny_model),
                    ClaraEmbedding(clara=tiny_model)):
        assert "LlamaDecoderLayer" not in repr(adapter)


def test_what_holds_a_model_and_a_store_is_refused_another_process_by_name(tiny_model):
    # an IngestionPipeline with num_workers pickled them without their model and store, taken out
    # of the very objects pickled: the embedding failed on a missing "clara", the LLM's copy read
    # nothing, and the original LLM failed on a missing "store"
    import pickle

    from llama_index_clara import ClaraEmbedding, ClaraLLM
    from llama_index_clara import ClaraVectorStore as LlamaStore

    store = LlamaStore(tiny_model)
    store.add([TextNode(text=CORPUS[0], id_="n0")])
    llm = ClaraLLM(store=store, max_new_tokens=2)
    for holder in (ClaraEmbedding(clara=tiny_model), store, llm):  # a stand-in elsewhere, which any use refuses
        with pytest.raises(TypeError, match=f"{type(holder).__name__} was unpickled without the CLaRa model it held"):
            pickle.loads(pickle.dumps(holder)).get_text_embedding("x")
    assert llm.store is not None and isinstance(llm.complete(CORPUS[0]).text, str)
    from llama_index.core.extractors import TitleExtractor

    extractor = TitleExtractor(llm=llm)  # held by a component: refused at pickling, it lost its llm
    copied = pickle.loads(pickle.dumps(extractor))
    assert extractor.llm is llm
    with pytest.raises(TypeError, match="ClaraLLM was unpickled without the CLaRa model it held"):
        copied.llm.complete("Where?")


def test_the_chunks_ingestion_cache_key_names_their_tokenizer(tiny_model):
    # keyed as a plain SentenceSplitter of the same sizes, whatever the tokenizer counting them:
    # a persisted cache served one backbone's chunks to another's
    from llama_index.core.ingestion.pipeline import get_transformation_hash
    from llama_index.core.node_parser import SentenceSplitter

    chunks = ClaraVectorStore(tiny_model).transformations[0]
    nodes = [TextNode(text=CORPUS[0])]
    assert chunks.to_dict()["tokenizer_name"] == tiny_model.tokenizer.name_or_path
    plain = SentenceSplitter(chunk_size=chunks.chunk_size, chunk_overlap=chunks.chunk_overlap)
    assert get_transformation_hash(nodes, chunks) != get_transformation_hash(nodes, plain)


def test_a_pipeline_with_workers_is_refused_in_the_caller(tiny_model):
    # refused where it was unpickled, the pool's worker died, and the pipeline waited for it forever
    import threading

    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline

    from llama_index_clara import ClaraEmbedding

    pipeline, outcome = IngestionPipeline(transformations=[ClaraEmbedding(clara=tiny_model)]), []

    def run() -> None:
        try:
            pipeline.run(documents=[Document(text=CORPUS[0]), Document(text=CORPUS[1])], num_workers=2)
        except Exception as error:  # the outcome checked below
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive(), "the pipeline hung"
    assert len(outcome) == 1 and "ClaraEmbedding was unpickled without the CLaRa model" in str(outcome[0])
