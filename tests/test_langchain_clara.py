"""ChatClara's document routes, stop sequences, and an offline LCEL RAG chain."""

import gc
import importlib

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from pydantic import ValidationError

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoreError
from clara_plugins.keys import ClaraKeys
from clara_plugins.prompts import question_prompt
from conftest import CORPUS, randomize_adapters
from langchain_clara import (CLARA_PROMPT, ChatClara, ClaraEmbeddings, ClaraRetriever, ClaraVectorStore,
                             format_documents)
from langchain_clara.chat_models import _cut_at_stops

QUESTION = "Who won Nobel prizes?"


@pytest.fixture
def vectorstore(tiny_model) -> ClaraVectorStore:
    store = ClaraVectorStore(tiny_model)
    store.add_texts(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))])
    return store


def expected_answer(model, memories: torch.Tensor) -> str:
    return model.generate_from_compressed_documents_and_questions([QUESTION], memories.unsqueeze(0))[0]


def positions(model, n_documents: int) -> int:
    """Input positions of CLaRa's answering prompt over n documents."""
    prompt = question_prompt(model.tokenizer, QUESTION, n_documents, model.document_placeholder)
    return len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_a_gpu_chooses_among_stored_documents(tiny_config):
    # the store's memories are on the CPU, the query on the GPU: top-k failed on any two documents
    model = ClaraModel(tiny_config, device="cuda")
    store = ClaraVectorStore(model)
    store.add_texts(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))])
    reply = ChatClara(clara=model, store=store.store, k=1).invoke(QUESTION, document_ids=["d4", "d0"])
    assert reply.response_metadata["clara"]["memory_documents"] == 1


def test_answers_from_stored_memories_by_id(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    expected = expected_answer(tiny_model, vectorstore.store.memories(["d4", "d0"]))
    assert chat.invoke(QUESTION, document_ids=["d4", "d0"]).content == expected
    assert chat.bind(document_ids=["d4", "d0"]).invoke(QUESTION).content == expected
    message = HumanMessage(QUESTION, additional_kwargs={"document_ids": ["d4", "d0"]})
    assert chat.invoke([message]).content == expected
    # a document named twice (in two turns, by id and by text) took two of the k places
    again = HumanMessage(QUESTION, additional_kwargs={"document_ids": ["d0", "d0"]})
    reply = ChatClara(clara=tiny_model, store=vectorstore.store, k=5).invoke([message, again], documents=[CORPUS[4]])
    assert reply.response_metadata["clara"]["memory_documents"] == 2
    # the call's ids, an empty list too, stand in for the messages'
    assert chat.invoke([message], document_ids=[]).response_metadata["clara"]["memory_documents"] == 0


def test_clara_prompt_reads_stored_documents_in_the_trained_layout(tiny_model, vectorstore, monkeypatch):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    expected = expected_answer(tiny_model, vectorstore.store.memories(["d1", "d2"]))
    calls = []
    monkeypatch.setattr(tiny_model, "compress_documents", lambda docs, *a, **k: calls.append(docs))
    messages = CLARA_PROMPT.invoke({"context": f"{CORPUS[1]}\n\n{CORPUS[2]}", "question": QUESTION})
    result = chat.invoke(messages)
    assert result.content == expected
    assert calls == []  # both documents were found in the store: nothing was compressed again
    assert result.response_metadata["clara"]["stored_documents"] == 2


def test_unstored_texts_are_compressed(tiny_model):
    chat = ChatClara(clara=tiny_model)
    docs = [Document("A fresh text about rivers."), "Another fresh text."]
    expected = expected_answer(tiny_model, tiny_model.compress_documents([d.page_content if isinstance(d, Document)
                                                                         else d for d in docs]))
    assert chat.invoke(QUESTION, documents=docs).content == expected


def test_more_than_k_documents_keeps_the_reasoners_top_k(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store, k=2)
    result = chat.invoke(QUESTION, document_ids=[f"d{i}" for i in range(6)])
    top = [d.id for d, _ in vectorstore.store.search(QUESTION, k=2)]
    assert result.content == expected_answer(tiny_model, vectorstore.store.memories(top))
    assert result.usage_metadata["input_tokens"] == positions(tiny_model, 2)


def test_a_search_by_vector_takes_a_tensor_as_the_core_does(vectorstore):
    # numpy read the tensor first: one that carried gradients failed on numpy's own error
    key = torch.tensor(vectorstore.store._row_keys([2])[0], requires_grad=True)
    assert vectorstore.similarity_search_by_vector(key, k=1)[0].id == "d2"
    assert vectorstore.max_marginal_relevance_search_by_vector(key, k=1)[0].id == "d2"


def test_unsaved_models_of_other_settings_have_other_cache_keys(tiny_config):
    # fresh models sign alike whatever their random adapters, and the key named the base model
    # and rate alone: one model's cached answer was served for another's memories
    import dataclasses

    keys = {ChatClara(clara=ClaraModel(dataclasses.replace(tiny_config, **settings), device="cpu"))._get_llm_string()
            for settings in ({}, {"memory_layer": 1}, {"retrieval_key": "flat"})}
    assert len(keys) == 3


def test_streaming_matches_invoke_and_reports_usage(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    chunks = list(chat.stream(QUESTION, document_ids=["d3"]))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == chat.invoke(QUESTION, document_ids=["d3"]).content
    assert full.usage_metadata["input_tokens"] == positions(tiny_model, 1)


def test_errors_name_the_problem(tiny_model):
    with pytest.raises(ValueError, match="document_ids need a store"):
        ChatClara(clara=tiny_model).invoke(QUESTION, document_ids=["d1"])
    with pytest.raises(ValueError, match="need a user message"):
        ChatClara(clara=tiny_model).invoke([SystemMessage("only context")])


def test_stop_sequences_cut_the_stream():
    pieces = iter(["The ans", "wer is", " here. More", " text"])
    assert "".join(_cut_at_stops(pieces, ["is h", "zz"])) == "The answer "
    assert "".join(_cut_at_stops(iter(["abc"]), ["x"])) == "abc"
    assert "".join(_cut_at_stops(iter(["Paris\nUser: me"]), ["\nUser: "])) == "Paris"
    assert "".join(_cut_at_stops(iter(["It is in France", "."]), [". "])) == "It is in France."  # no stop


@pytest.mark.parametrize("text,stops,cut", [("Paris</answer> more", ["</answer>", "answer"], "Paris"),
                                            ("Paris.\nQuestion: next", ["\nQuestion:", "Question"], "Paris."),
                                            ("abcd", ["bcx", "cd"], "ab"), ("abc", ["abcd", "x"], "abc")])
def test_the_stream_is_cut_at_the_earliest_stop_however_it_comes_in_pieces(text, stops, cut):
    # a shorter stop finished inside a longer one that began earlier: one piece per character cut at "Paris</"
    assert "".join(_cut_at_stops(iter(list(text)), stops)) == cut
    assert "".join(_cut_at_stops(iter([text]), stops)) == cut


def test_lcel_rag_chain_runs_offline(tiny_model, vectorstore):
    retriever = ClaraRetriever(store=vectorstore.store, k=2)
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    chain = ({"context": retriever | format_documents, "question": RunnablePassthrough()}
             | CLARA_PROMPT | chat | StrOutputParser())
    answer = chain.invoke(QUESTION)
    top = [d.id for d in retriever.invoke(QUESTION)]
    assert answer == expected_answer(tiny_model, vectorstore.store.memories(top))


def test_vectorstore_persists_without_pickle(tiny_model, vectorstore, tmp_path, monkeypatch):
    vectorstore.save_local(tmp_path / "lc")
    loaded = ClaraVectorStore.load_local(tmp_path / "lc", tiny_model)
    assert loaded.similarity_search(QUESTION, k=3) == vectorstore.similarity_search(QUESTION, k=3)
    files = {p.suffix for p in (tmp_path / "lc").rglob("*") if p.is_file()}
    assert files <= {".json", ".npy", ""}  # CURRENT has no suffix; nothing is a pickle
    # FAISS's load_local line (allow_dangerous_deserialization=True) failed on a bare TypeError
    again = ClaraVectorStore.load_local(tmp_path / "lc", tiny_model, allow_dangerous_deserialization=True)
    assert again.similarity_search(QUESTION, k=3) == vectorstore.similarity_search(QUESTION, k=3)
    # no store there: refused before the shipped model loads (seconds to a minute)
    monkeypatch.setattr("langchain_clara.vectorstores.load_model", lambda: pytest.fail("the shipped model loaded"))
    with pytest.raises(StoreError, match="is not a CLaRa memory store"):
        ClaraVectorStore.load_local(tmp_path / "nothing")


def test_a_store_searched_by_an_embedding_reloads_with_it_and_only_with_it(tiny_model, tmp_path):
    embedding = DeterministicFakeEmbedding(size=16)
    store = ClaraVectorStore(tiny_model, embedding)
    store.add_texts(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))])
    store.save_local(tmp_path / "lc")
    loaded = ClaraVectorStore.load_local(tmp_path / "lc", tiny_model, embedding)
    assert loaded.similarity_search(QUESTION, k=3) == store.similarity_search(QUESTION, k=3)
    with pytest.raises(StoreError, match="was indexed with keys"):  # its keys are the embedding's, not CLaRa's
        ClaraVectorStore.load_local(tmp_path / "lc", tiny_model)


def test_wrong_arguments_in_the_models_place_are_refused_or_read_as_langchain_does(tiny_model, tmp_path):
    # each failed later on a bare AttributeError ('ClaraEmbeddings' object has no attribute 'config')
    store = ClaraVectorStore(ClaraEmbeddings(tiny_model))  # InMemoryVectorStore(embedding)'s convention
    store.add_texts(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))])
    store.save_local(tmp_path / "lc")
    loaded = ClaraVectorStore.load_local(tmp_path / "lc", ClaraEmbeddings(tiny_model))  # FAISS.load_local's
    assert loaded.similarity_search(QUESTION, k=3) == store.similarity_search(QUESTION, k=3)
    with pytest.raises(InvalidInputError, match="model must be a ClaraModel, got a str: load a checkpoint") as refused:
        ClaraEmbeddings("path/to/checkpoint")
    module, _, name = str(refused.value).rpartition(" ")[2].rpartition(".")  # the loader named is one to import
    assert callable(getattr(importlib.import_module(module), name))
    with pytest.raises(InvalidInputError, match="model must be a ClaraModel, got a str"):
        MemoryStore.load(tmp_path / "lc", "path/to/checkpoint")
    with pytest.raises(InvalidInputError, match="keys must be a KeyEncoder .*got a str: the index kind is index="):
        MemoryStore(tiny_model, "hnsw")
    with pytest.raises(InvalidInputError, match="texts must be a list of strings, got str"):  # it embedded letters
        ClaraEmbeddings(tiny_model).embed_documents("hello")
    embeddings = ClaraEmbeddings(tiny_model)
    assert embeddings.embed_documents(text for text in CORPUS[:2]) == embeddings.embed_documents(CORPUS[:2])


class NamedFakeEmbedding(DeterministicFakeEmbedding):
    model_name: str = "fake-a"


def test_an_embedding_of_the_same_class_and_width_but_another_model_is_refused(tiny_model, tmp_path):
    # the header named the class alone: another sentence-transformers model of one width opened the store
    import json

    store = ClaraVectorStore(tiny_model, NamedFakeEmbedding(size=16))
    store.add_texts(CORPUS[:3])
    store.save_local(tmp_path / "lc")
    with pytest.raises(StoreError, match="was indexed with keys"):
        ClaraVectorStore.load_local(tmp_path / "lc", tiny_model, NamedFakeEmbedding(size=16, model_name="fake-b"))
    assert len(ClaraVectorStore.load_local(tmp_path / "lc", tiny_model, NamedFakeEmbedding(size=16)).store) == 3
    header_file = next((tmp_path / "lc").glob("*/store.json"))  # a store saved before the model was recorded
    header = json.loads(header_file.read_text())
    del header["keys"]["model"]
    header_file.write_text(json.dumps(header))
    assert len(ClaraVectorStore.load_local(tmp_path / "lc", tiny_model, NamedFakeEmbedding(size=16)).store) == 3


async def test_the_async_constructors_have_the_defaults_of_the_sync_ones(tiny_model):
    # LangChain's own need an embedding: a TypeError for CLaRa's keys
    store = await ClaraVectorStore.afrom_texts(CORPUS[:2], model=tiny_model)
    assert len(store.store) == 2 and store.store.keys.signature() == ClaraKeys(tiny_model).signature()
    store = await ClaraVectorStore.afrom_documents([Document(page_content=CORPUS[0])], model=tiny_model)
    assert len(store.store) == 1


async def test_the_async_retriever_takes_the_calls_k_and_filter(tiny_model):
    # LangChain's async default passes neither: ainvoke(..., k=2) raised TypeError
    store = ClaraVectorStore(tiny_model)
    store.add_texts(CORPUS, metadatas=[{"topic": "tower" if i % 2 else "city"} for i in range(len(CORPUS))])
    retriever = ClaraRetriever(store=store)
    found = await retriever.ainvoke("Which tower is in Paris?", k=2, filter={"topic": "tower"})
    assert [d.id for d in found] == [d.id for d in retriever.invoke("Which tower is in Paris?", k=2,
                                                                    filter={"topic": "tower"})]
    assert len(found) == 2 and all(d.metadata["topic"] == "tower" for d in found)


def test_clara_embeddings_of_another_model_beside_model_are_refused(tiny_model, tiny_config):
    # the store searched with model='s keys and reported them as the embedding's
    other = ClaraModel(tiny_config, device="cpu")
    with pytest.raises(InvalidInputError, match="ClaraEmbeddings given beside model= are of another model"):
        ClaraVectorStore(tiny_model, ClaraEmbeddings(other))


def test_delete_without_ids_deletes_everything(vectorstore):
    assert vectorstore.delete() and vectorstore.store.all_ids() == []


def test_delete_by_filter_deletes_the_matching_documents_alone(tiny_model):
    # a filter was dropped with the other keywords, and the delete without ids deleted everything
    store = ClaraVectorStore(tiny_model)
    store.add_texts(CORPUS[:4], [{"topic": "a"}, {"topic": "b"}, {"topic": "a"}, {"topic": "c"}],
                    ids=["d0", "d1", "d2", "d3"])
    assert store.delete(filter={"topic": "a"}) and sorted(store.store.all_ids()) == ["d1", "d3"]
    with pytest.raises(TypeError, match="delete got arguments it does not take: where"):
        store.delete(where={"topic": "b"})
    with pytest.raises(InvalidInputError, match="ids or a filter, not both"):
        store.delete(["d1"], filter={"topic": "c"})
    assert sorted(store.store.all_ids()) == ["d1", "d3"]


def test_search_arguments_a_store_does_not_take_are_refused(vectorstore):
    # score_threshold and another store's where were dropped: unfiltered, unthresholded results
    with pytest.raises(TypeError, match="score_threshold.*similarity_score_threshold"):
        vectorstore.similarity_search(QUESTION, k=2, score_threshold=0.9)
    with pytest.raises(TypeError, match="where"):
        vectorstore.max_marginal_relevance_search(QUESTION, k=2, where={"topic": "a"})
    with pytest.raises(TypeError, match="ClaraRetriever got arguments it does not take: lambda_mult"):
        ClaraRetriever(store=vectorstore).invoke(QUESTION, lambda_mult=0.3)
    retriever = vectorstore.as_retriever(search_type="similarity_score_threshold",
                                         search_kwargs={"k": 3, "score_threshold": 0.0})
    assert len(retriever.invoke(QUESTION)) == 3
    # what LangChain passes on by itself, and FAISS's fetch_k (a filtered search here is exact)
    assert len(vectorstore.as_retriever(search_kwargs={"k": 2, "fetch_k": 50}).invoke(QUESTION, verbose=True)) == 2
    assert len(ClaraRetriever(store=vectorstore, k=2).invoke(QUESTION, verbose=True)) == 2


def test_settings_beside_a_store_are_refused(vectorstore):
    with pytest.raises(InvalidInputError, match="index, batch_size would go unused beside store="):
        ClaraVectorStore(store=vectorstore.store, index="hnsw", batch_size=32)
    with pytest.raises(InvalidInputError, match="index would go unused"):
        ClaraVectorStore.from_texts(["more"], store=vectorstore.store, index="hnsw")
    assert ClaraVectorStore(store=vectorstore.store).store is vectorstore.store
    # memory_dtype was a TypeError: an int8 store took a MemoryStore built by hand
    assert ClaraVectorStore(vectorstore.store.model, memory_dtype="int8").store.memory_dtype == "int8"
    with pytest.raises(InvalidInputError, match="memory_dtype would go unused"):
        ClaraVectorStore(store=vectorstore.store, memory_dtype="int8")


def test_add_texts_refuses_a_lone_string_of_texts_or_ids_and_one_metadata_dict(vectorstore):
    before = sorted(vectorstore.store.all_ids())
    with pytest.raises(ValueError, match="one str"):
        vectorstore.add_texts("hello")
    with pytest.raises(ValueError, match="ids must be a list of ids, got str 'abc'"):
        vectorstore.add_texts(["t1", "t2", "t3"], ids="abc")  # not the ids a, b and c
    with pytest.raises(ValueError, match="metadatas must be a list of dicts, one per text, got a dict"):
        vectorstore.add_texts(["t1", "t2"], metadatas={"topic": "x", "n": 1})
    for ids, metadatas in [("abc", None), (["a"], None), (None, [{"topic": "x"}])]:  # no texts: [] returned unread
        with pytest.raises(ValueError, match="texts is empty"):
            vectorstore.add_texts([], metadatas, ids=ids)
    # a set was listed in any order (ids paired with the wrong texts), an empty id made a new one
    with pytest.raises(ValueError, match="ids must be a list"):
        vectorstore.add_texts(["t1", "t2"], ids={"a", "b"})
    with pytest.raises(ValueError, match="ids must be non-empty strings"):
        vectorstore.add_texts(["t1", "t2"], ids=["", "b"])
    assert sorted(vectorstore.store.all_ids()) == before


def test_chat_clara_refuses_a_misspelt_setting_and_counts_tokens_as_its_generator(tiny_model, vectorstore):
    # ChatClara(model=m) answered from the shipped checkpoint; token counts needed GPT-2's tokenizer
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"ChatClara has no setting model \(the CLaRa model is clara=\)"):
        ChatClara(model=tiny_model)
    with pytest.raises(ValidationError, match="decodes greedily: temperature must be 0, got 0.7"):
        ChatClara(clara=tiny_model, temperature=0.7)
    ChatClara(clara=tiny_model, temperature=0, timeout=60, max_retries=2, streaming=True)  # LangChain's standard ones
    chat = ChatClara(clara=tiny_model)
    assert chat.get_num_tokens(CORPUS[0]) == len(tiny_model.tokenizer(CORPUS[0], add_special_tokens=False)["input_ids"])
    assert ChatClara(clara=tiny_model, custom_get_token_ids=lambda text: [0, 1, 2]).get_num_tokens(CORPUS[0]) == 3


def test_both_adapters_read_every_message_role_alike():
    from langchain_core.messages import AIMessageChunk, ChatMessage, SystemMessage, ToolMessage
    from langchain_clara.chat_models import _role

    roles = [_role(m) for m in [ChatMessage(role="developer", content=""), ChatMessage(role="model", content=""),
                                AIMessageChunk(content=""), SystemMessage(content=""),
                                ToolMessage(content="", tool_call_id="1")]]
    assert roles == ["system", "assistant", "assistant", "system", "user"]


def test_a_model_or_embedding_beside_a_store_must_be_the_stores_own(tiny_model, tiny_config):
    from langchain_core.embeddings import FakeEmbeddings

    from langchain_clara import ClaraEmbeddings

    store = MemoryStore(tiny_model)
    with pytest.raises(InvalidInputError, match="searches with its own keys"):
        ClaraVectorStore.from_texts(CORPUS[:2], FakeEmbeddings(size=8), store=store)
    with pytest.raises(InvalidInputError, match="model is not the model of store"):
        ClaraVectorStore(ClaraModel(tiny_config, device="cpu"), store=store)
    assert len(store) == 0  # nothing was added by the refused calls
    ClaraVectorStore(tiny_model, ClaraEmbeddings(tiny_model), store=store)  # its own: accepted


def test_adding_no_texts_adds_nothing(vectorstore, tiny_model):
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_clara import ClaraEmbeddings

    before = len(vectorstore.store)
    assert vectorstore.add_texts([]) == [] and vectorstore.add_documents([]) == []
    assert len(vectorstore.store) == before
    assert InMemoryVectorStore(ClaraEmbeddings(tiny_model)).add_documents([]) == []


def test_clara_embeddings_give_a_blank_page_a_unit_vector_as_the_llama_index_embedding_does(tiny_model):
    # a reader's blank page failed the whole batch ("documents[0] is empty")
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_clara import ClaraEmbeddings

    blank, filled = ClaraEmbeddings(tiny_model).embed_documents(["  ", CORPUS[1]])
    assert blank == [1.0] + [0.0] * (len(filled) - 1)
    assert filled == ClaraEmbeddings(tiny_model).embed_documents([CORPUS[1]])[0]
    store = InMemoryVectorStore.from_documents([Document(""), Document(CORPUS[1])], ClaraEmbeddings(tiny_model))
    assert len(store.store) == 2


def test_a_node_nested_deeper_than_python_reads_comes_back_as_stored():
    # a stored "_node_content" nested 100,000 deep failed every search that found it (RecursionError)
    from clara_plugins import StoredDocument
    from langchain_clara.vectorstores import to_document

    metadata = {"_node_content": "[" * 100_000 + "]" * 100_000, "page": 1}
    assert to_document(StoredDocument("d", "A text.", metadata)).metadata == metadata


def test_a_blank_page_is_left_out_of_the_store_as_the_llama_index_store_leaves_it(tiny_model):
    # an image-only PDF page (page_content "") failed the whole batch: nothing was stored
    with pytest.warns(UserWarning, match=r"2 of 3 texts are blank and are not stored \(first: texts\[0\]\)"):
        store = ClaraVectorStore.from_documents([Document(""), Document(CORPUS[1], metadata={"page": 2}),
                                                 Document(" \n", metadata={"page": 3})], model=tiny_model)
    assert [(d.page_content, d.metadata) for d in store.similarity_search("anything", k=5)] == [(CORPUS[1], {"page": 2})]
    with pytest.warns(UserWarning, match="1 of 2 texts are blank"):
        ids = store.add_texts([CORPUS[2], ""], metadatas=[{"page": 4}, {"page": 5}], ids=["p4", "p5"])
    assert ids == ["p4", "p5"] and store.get_by_ids(ids) == [Document(CORPUS[2], id="p4", metadata={"page": 4})]
    with pytest.warns(UserWarning, match="1 of 1 texts are blank"):
        assert len(store.add_texts([""])) == 1
    assert len(store.store) == 2


def test_a_text_reader_reads_passed_documents_as_text_only(tiny_model):
    # documents= compressed them into memory tokens for a generator trained on text, as clara ask --docs refuses
    from clara_plugins import InvalidInputError

    tiny_model.config.decoder_reads_text = True
    chat = ChatClara(clara=tiny_model, max_tokens=2)
    with pytest.raises(InvalidInputError, match=r"is a text reader \(clara train --stage text\): its generator reads "
                                                "documents as text"):
        chat.invoke("Where is Paris?", documents=[CORPUS[0]])
    assert isinstance(chat.invoke(f"{CORPUS[0]}\nWhere is Paris?").content, str)  # the text in the prompt: read


def test_warnings_of_one_call_leave_no_record_behind_in_a_long_running_service(tiny_model):
    # each text (its counts, a node's id) was kept in the warned module's registry for good: a
    # service that warned per request grew by each, and the default filter deduplicated none
    import warnings

    service = {}  # a module of the service's: warnings name its line
    exec("def request(store, texts):\n    return store.add_texts(texts)\n"
         "def embed(embeddings, texts):\n    return embeddings.embed_documents(texts)", service)
    store, long_text = ClaraVectorStore(tiny_model), " ".join(["word"] * 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for blanks in (1, 2, 3, 3):  # the last request word for word as the one before: shown once, as ever
            service["request"](store, [CORPUS[blanks]] + [" "] * blanks)
            service["embed"](ClaraEmbeddings(tiny_model), [long_text] * blanks)
    assert [str(w.message).split(" texts are")[0] for w in caught if "blank" in str(w.message)] == [
        "1 of 2", "2 of 3", "3 of 4"]
    assert sum("exceed doc_max_length" in str(w.message) for w in caught) == 3
    assert {w.filename for w in caught if "blank" in str(w.message)} == {"<string>"}  # still the service's lines
    embeddings_module = importlib.import_module("langchain_clara.embeddings")  # where the cut is named
    for registry in (service.get("__warningregistry__", {}), vars(embeddings_module).get("__warningregistry__", {})):
        assert [key for key in registry if key != "version"] == []
    from clara_plugins import errors  # what they record instead stays bounded

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("default")
        for number in range(errors._SHOWN_AT_MOST + 100):
            errors.warn_bounded(f"{number} of many")
    assert len(errors._SHOWN) <= errors._SHOWN_AT_MOST + 1


async def test_async_relevance_scores_are_calibrated_off_the_event_loop(vectorstore, monkeypatch):
    import threading

    threads = []
    real = vectorstore.store.relevances
    monkeypatch.setattr(vectorstore.store, "relevances", lambda cosines: threads.append(threading.current_thread())
                        or real(cosines))  # after a write it samples its calibration anew, under the store's lock
    scored = await vectorstore.asimilarity_search_with_relevance_scores("Who won Nobel prizes?", k=2)
    assert len(scored) == 2 and threads and threading.current_thread() not in threads


def test_relevance_scores_of_one_result_are_ranked_against_one_calibration(vectorstore, monkeypatch):
    # LangChain ranked one document's cosine at a time, and a write between two sampled the
    # calibration anew: a closer document could score as less relevant, and a threshold keep it alone
    store = vectorstore.store
    samples = iter([torch.linspace(-1, 1, 101).numpy(), torch.full((101,), -0.999).numpy()])
    monkeypatch.setattr(store, "_sample_pair_cosines", lambda: next(samples))
    real = store.relevance

    def after_a_write(cosine):  # another thread's upsert, between two documents
        store._pair_cosines = None
        return real(cosine)

    monkeypatch.setattr(store, "relevance", after_a_write)
    scores = [score for _, score in vectorstore.similarity_search_with_relevance_scores("Who won Nobel prizes?", k=3)]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and scores[0] < 1.0


def test_settings_that_change_the_answer_are_part_of_the_cache_key(tiny_model):
    # with an LLM cache on, a 4-token answer was served for a 64-token one, an uncut one for a cut one
    # and the store: a prompt read with a store's memory tokens got the answer cached without them
    stores = [MemoryStore(tiny_model), MemoryStore(tiny_model)]
    keys = [ChatClara(clara=tiny_model, **kwargs)._get_llm_string()
            for kwargs in ({}, {"max_tokens": 4}, {"stop": ["."]}, {"store": stores[0]}, {"store": stores[1]})]
    assert len(set(keys)) == 5
    # so is the model's own k and answer length, which a call without k or max_tokens reads
    default = ChatClara(clara=tiny_model)._get_llm_string()
    tiny_model.config.generation_top_k = 2
    assert ChatClara(clara=tiny_model)._get_llm_string() != default
    # a store is keyed by its own id, not by its address, which a later store may be given
    first = ChatClara(clara=tiny_model, store=MemoryStore(tiny_model))._get_llm_string()
    gc.collect()
    assert ChatClara(clara=tiny_model, store=MemoryStore(tiny_model))._get_llm_string() != first
    # and by what it holds: a cached answer outlived an upsert or a delete of the documents it read
    chat = ChatClara(clara=tiny_model, store=stores[0])
    seen = {chat._get_llm_string()}
    stores[0].upsert(["Paris is the capital of France."], ids=["d1"])
    seen.add(chat._get_llm_string())
    stores[0].delete(["d1"])
    seen.add(chat._get_llm_string())
    assert len(seen) == 3


def test_an_answer_length_below_one_token_is_refused(tiny_model):
    # max_tokens=0 in a call fell back to the model's 64 tokens
    with pytest.raises(ValidationError, match="max_tokens"):
        ChatClara(clara=tiny_model, max_tokens=0)
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        ChatClara(clara=tiny_model).invoke("Who?", max_tokens=0)


def test_a_lone_string_passed_as_documents_is_refused(tiny_model):
    # it was read as one document per letter
    from llama_index_clara import ClaraLLM

    with pytest.raises(ValueError, match="documents must be a list, got str"):
        ChatClara(clara=tiny_model).invoke("Where is Paris?", documents="Paris is in France.")
    with pytest.raises(ValueError, match="documents must be a list, got str"):
        ClaraLLM(clara=tiny_model).complete("Where is Paris?", documents="Paris is in France.")
    passages = ["Paris is the capital of France.", "Rome is the capital of Italy."]
    listed = ChatClara(clara=tiny_model, max_tokens=2).invoke("Where is Paris?", documents=passages).content
    for collection in (tuple(passages), iter(passages)):  # any collection but a lone string
        assert ChatClara(clara=tiny_model, max_tokens=2).invoke("Where is Paris?", documents=collection).content == \
            listed
    # but with a cache an iterator keyed it by its address, which the next call's iterator reused:
    # the answer read from other documents was served
    from langchain_core.caches import InMemoryCache

    cached = ChatClara(clara=tiny_model, max_tokens=2, cache=InMemoryCache())
    for name, value in (("documents", iter(passages)), ("document_ids", (i for i in ["d1"]))):
        with pytest.raises(InvalidInputError, match=f"with an LLM cache, pass {name} as a list"):
            cached.invoke("Where is Paris?", **{name: value})
    assert cached.invoke("Where is Paris?", documents=passages).content == listed
    with pytest.raises(ValueError, match=r"documents\[1\] is a int, not a string"):  # an AttributeError before
        ChatClara(clara=tiny_model).invoke("Where is Paris?", documents=["Paris is in France.", 3])


def test_two_checkpoints_of_one_backbone_have_two_cache_keys(tiny_model, tmp_path):
    # the same base model and rate: a cached answer of one checkpoint was served for the other
    for name in ("a", "b"):
        tiny_model.save_pretrained(tmp_path / name)
    keys = {ChatClara(clara=ClaraModel.from_pretrained(tmp_path / name, device="cpu"))._get_llm_string()
            for name in ("a", "b")}
    assert len(keys) == 2


def test_one_checkpoint_in_two_dtypes_has_two_cache_keys(tiny_model, tmp_path):
    # a persistent cache filled by a GPU's bfloat16 answers served them to float32 on a CPU
    import torch

    tiny_model.save_pretrained(tmp_path / "ck")
    keys = {ChatClara(clara=ClaraModel.from_pretrained(tmp_path / "ck", device="cpu", dtype=dtype))._get_llm_string()
            for dtype in (torch.float32, torch.bfloat16, torch.float32)}
    assert len(keys) == 2


def test_two_unsaved_models_of_one_configuration_have_two_cache_keys(tiny_model):
    # both keyed on no folder and no weights: one's cached answers were served for the other
    retrained = ClaraModel(tiny_model.config, device="cpu")
    randomize_adapters(retrained, seed=7)
    assert ChatClara(clara=tiny_model)._get_llm_string() != ChatClara(clara=retrained)._get_llm_string()


def test_the_weights_are_hashed_only_where_a_cache_asks(tiny_model, monkeypatch):
    # every call hashed an unsaved model's adapters for its traced parameters, cache or none
    from langchain_core.caches import InMemoryCache

    from langchain_clara import chat_models

    hashed = []
    monkeypatch.setattr(chat_models, "adapters_sha256", lambda model: hashed.append(1) or "digest")
    ChatClara(clara=tiny_model, max_tokens=2).invoke("Who?")
    assert hashed == []
    ChatClara(clara=tiny_model, max_tokens=2, cache=InMemoryCache()).invoke("Who?")
    assert hashed == [1]


def test_a_call_option_read_nowhere_is_refused_and_streaming_streams(tiny_model):
    # doc_ids= read no document, temperature=0.9 decoded greedily, streaming=True never streamed
    from langchain_core.callbacks import BaseCallbackHandler

    from llama_index_clara import ClaraLLM

    store = MemoryStore(tiny_model)
    store.upsert(["Paris is the capital of France."], ids=["a"])
    with pytest.raises(TypeError, match="reads no call option doc_ids"):
        ChatClara(clara=tiny_model, store=store).invoke("Where is Paris?", doc_ids=["a"])
    with pytest.raises(TypeError, match="ClaraLLM reads no call option doc_ids"):
        ClaraLLM(clara=tiny_model, store=store).complete("Where is Paris?", doc_ids=["a"])
    with pytest.raises(ValueError, match="temperature must be 0, got 0.9"):
        ChatClara(clara=tiny_model).invoke("Where is Paris?", temperature=0.9)
    with pytest.raises(ValidationError, match="search_kwargs"):
        ClaraRetriever(store=store, search_kwargs={"k": 1})

    class Tokens(BaseCallbackHandler):
        tokens: list[str] = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    handler = Tokens()
    answer = ChatClara(clara=tiny_model, max_tokens=3, streaming=True, callbacks=[handler]).invoke("Who?")
    assert handler.tokens and "".join(handler.tokens) == answer.content


def test_a_checkpoint_saved_again_in_its_folder_has_another_cache_key(tiny_model, tmp_path):
    # a checkpoint retrained in place kept its folder's key, and was served the old one's cached answers
    tiny_model.save_pretrained(tmp_path / "ckpt")
    before = ChatClara(clara=ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu"))._get_llm_string()
    with torch.no_grad():
        next(p for n, p in tiny_model.lm.named_parameters() if "decoder_adapter" in n).add_(0.1)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    again = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert ChatClara(clara=again)._get_llm_string() != before


def test_a_clara_model_in_the_embeddings_place_is_the_model_and_another_object_is_refused(tiny_model, monkeypatch):
    # the model in from_texts' second place loaded the shipped model, then failed at the first add
    monkeypatch.setattr("langchain_clara.vectorstores.load_model", lambda: pytest.fail("the shipped model loaded"))
    store = ClaraVectorStore.from_texts(CORPUS[:2], tiny_model, show_progress=True)
    assert store.store.model is tiny_model and len(store.store) == 2
    assert ClaraVectorStore(None, tiny_model).store.model is tiny_model
    with pytest.raises(InvalidInputError, match="embedding must be a LangChain Embeddings, got str"):
        ClaraVectorStore(tiny_model, "bge-small")


def test_adding_refuses_a_misspelt_argument_and_reads_empty_ids_as_none(vectorstore):
    before = vectorstore.store.all_ids()
    with pytest.raises(TypeError, match="add_texts got arguments it does not take: metadata"):
        vectorstore.add_texts(["A new text."], metadata=[{"a": 1}])  # stored without its metadata
    assert vectorstore.store.all_ids() == before
    (new,) = vectorstore.add_texts(["A new text."], ids=[], metadatas=[], batch_size=4)  # LangChain's stores' reading
    assert vectorstore.get_by_ids([new])[0].page_content == "A new text."


def test_an_empty_delete_filter_deletes_nothing(vectorstore):
    before = vectorstore.store.all_ids()
    for empty in ({}, {"$and": [{}]}, {"$or": [{}, {"$and": [{}]}]}, {"$or": [{"topic": "city"}, {"$and": [{}]}]}):
        with pytest.raises(InvalidInputError, match="a filter without a condition selects every document"):
            vectorstore.delete(filter=empty)  # a filter built from an empty selection deleted everything
    assert vectorstore.store.all_ids() == before


def test_a_stop_that_is_no_list_of_strings_and_a_message_the_generator_cannot_read_are_refused(tiny_model):
    from langchain_core.messages import AIMessage

    chat = ChatClara(clara=tiny_model)
    with pytest.raises(InvalidInputError, match="stop must be a list of non-empty strings, got 'User:'"):
        chat.invoke(QUESTION, stop="User:")  # cut at its first U, s, e, r or colon
    with pytest.raises(InvalidInputError, match="stop must be a list of non-empty strings"):
        chat.invoke(QUESTION, stop=[""])  # an empty answer
    image = HumanMessage(content=[{"type": "text", "text": "What is in this picture?"},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(InvalidInputError, match="reads text only: message 0 holds image_url"):
        chat.invoke([image])  # answered as if no picture was sent
    call = AIMessage(content="", tool_calls=[{"name": "search", "args": {}, "id": "1"}])
    unparsed = AIMessage(content="", additional_kwargs={"tool_calls": [  # read as an empty turn
        {"id": "1", "type": "function", "function": {"name": "search", "arguments": "{bad json"}}]})
    legacy = AIMessage(content="", additional_kwargs={"function_call": {"name": "search", "arguments": "{}"}})
    for message in (call, unparsed, legacy):
        with pytest.raises(InvalidInputError, match="message 1 holds tool_call"):
            chat.invoke([HumanMessage(content=QUESTION), message, HumanMessage(content="And?")])


def test_a_calls_own_stop_list_replaces_the_default_even_empty(tiny_model):
    # stop=[] still cut the answer at the stops given at construction
    full = ChatClara(clara=tiny_model, max_tokens=8).invoke(QUESTION).content
    chat = ChatClara(clara=tiny_model, max_tokens=8, stop=[full[-1]])
    assert chat.invoke(QUESTION).content != full
    assert chat.invoke(QUESTION, stop=[]).content == full
    assert "ls_stop" not in chat._get_ls_params(stop=[]) and chat._get_ls_params()["ls_stop"] == [full[-1]]
    # a call's own max_tokens is traced as its stop list is (the answer is cut at it)
    assert chat._get_ls_params(max_tokens=3)["ls_max_tokens"] == 3 and chat._get_ls_params()["ls_max_tokens"] == 8


def test_clara_embeddings_show_progress_past_one_batch(tiny_model, capsys):
    # a LangChain store embeds a whole corpus in one call: minutes on a CPU, without a word
    ClaraEmbeddings(tiny_model).embed_documents(CORPUS[:2])
    assert "compressing" not in capsys.readouterr().err
    ClaraEmbeddings(tiny_model).embed_documents(CORPUS * 2)
    assert "compressing" in capsys.readouterr().err


def test_ids_and_documents_given_in_the_wrong_shape_are_refused(tiny_model, vectorstore):
    # a message's document_ids "d1" read as "d" and "1"; a filter given as delete's ids deleted a
    # document with the id "source"; one Document as documents was read as its fields
    from llama_index.core.llms import ChatMessage

    from llama_index_clara import ClaraLLM

    chat = ChatClara(store=vectorstore, max_tokens=2)
    with pytest.raises(InvalidInputError, match="message 0's document_ids must be a list of ids, got str 'd1'"):
        chat.invoke([HumanMessage("Where?", additional_kwargs={"document_ids": "d1"})])
    with pytest.raises(InvalidInputError, match="message 0's document_ids must be a list of ids, got dict"):
        ClaraLLM(store=vectorstore, max_new_tokens=2).chat(
            [ChatMessage(role="user", content="Where?", additional_kwargs={"document_ids": {"d1": 1}})])
    vectorstore.add_texts(["A source."], ids=["source"])
    with pytest.raises(InvalidInputError, match="ids must be a collection of ids, got dict"):
        vectorstore.delete({"source": "s1"})
    assert vectorstore.get_by_ids(["source"])  # nothing deleted
    with pytest.raises(InvalidInputError, match="documents must be a list, got Document"):
        chat.invoke("Where?", documents=Document(page_content="Paris is in France."))
    with pytest.raises(InvalidInputError, match="documents must be a list, got dict"):
        chat.invoke("Where?", documents={"Paris is in France.": 1})
    for make in (lambda: ChatClara(store=vectorstore, k=True), lambda: ChatClara(store=vectorstore, max_tokens=True),
                 lambda: ClaraRetriever(store=vectorstore, k=True), lambda: ClaraLLM(store=vectorstore, k=True),
                 lambda: ClaraLLM(store=vectorstore, max_new_tokens=True)):
        with pytest.raises(ValidationError):  # True was a count of 1
            make()
    import numpy as np  # a numpy count is one, as the core takes it

    assert ChatClara(store=vectorstore, k=np.int64(3)).k == 3 and type(ClaraRetriever(store=vectorstore, k=np.int64(2)).k) is int


@pytest.mark.parametrize("delete", [lambda vs: vs.delete(filter={"status": "stale"}), lambda vs: vs.delete()])
def test_a_delete_keeps_a_document_another_thread_replaced_meanwhile(vectorstore, monkeypatch, delete):
    # the ids were read in one hold of the lock and deleted in another: a document replaced in
    # between by one the filter does not select (or added, for a delete of everything) was lost
    import threading

    store = vectorstore.store
    store.upsert(["Stale text."], ids=["x"], metadatas=[{"status": "stale"}])
    writers = []

    def replaced_meanwhile(read):
        def reading(*args):
            found = read(*args)
            writers.append(threading.Thread(target=store.upsert, args=(["Fresh text."], ["x"], [{"status": "fresh"}])))
            writers[0].start()
            writers[0].join(timeout=0.5)  # with the lock held, it waits for the delete
            return found
        return reading

    monkeypatch.setattr(store, "ids_where", replaced_meanwhile(store.ids_where))
    monkeypatch.setattr(store, "all_ids", replaced_meanwhile(store.all_ids))
    delete(vectorstore)
    writers[0].join()
    assert [d.page_content for d in vectorstore.get_by_ids(["x"])] == ["Fresh text."]
