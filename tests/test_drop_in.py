"""Any prompt, chain or engine reads the store's documents from memory tokens, safely.

Each test would fail on an adapter that reads only its own special prompt: the counters that
ChatClara and ClaraLLM expose (``stats``, and each response's ``clara`` metadata) show how
many stored documents the generator read as memory tokens and how many positions it saw.
"""

import asyncio
import copy
import pickle
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.schema import TextNode

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore
from clara_plugins.context import read_messages
from clara_plugins.config import ANSWER_TEMPLATE
from clara_plugins.found import TextLookup
from conftest import CORPUS, randomize_adapters
from langchain_clara import ChatClara, ClaraRetriever, ClaraVectorStore, format_documents
from llama_index_clara import ClaraLLM
from llama_index_clara import ClaraVectorStore as LlamaClaraVectorStore

QUESTION = "Who won Nobel prizes?"
TWO_PARAGRAPHS = "The Rhine rises in the Swiss Alps near Lake Toma.\n\nIt flows north into the North Sea."
OWN_PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You are a helpful assistant. Answer from the context only.\n\nContext:\n{context}"),
    ("human", "{question}"),
])


@pytest.fixture
def vectorstore(tiny_model) -> ClaraVectorStore:
    store = ClaraVectorStore(tiny_model)
    store.add_texts([*CORPUS, TWO_PARAGRAPHS], ids=[f"d{i}" for i in range(len(CORPUS) + 1)])
    return store


def refuse_compression(model: ClaraModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything is compressed again: stored documents must be read from the store."""
    def refuse(texts, *args, **kwargs):
        raise AssertionError(f"compressed again: {texts}")
    monkeypatch.setattr(model, "compress_documents", refuse)


@pytest.fixture
def no_compression(tiny_model, monkeypatch):
    refuse_compression(tiny_model, monkeypatch)


def test_a_model_of_another_compressor_is_refused_beside_a_store(vectorstore, tiny_model, tiny_config, tmp_path):
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=1)
    for reader in (ChatClara, ClaraLLM):
        with pytest.raises(ValueError, match="the store beside clara was written by another compressor"):  # pydantic's
            reader(clara=other, store=vectorstore)
    tiny_model.save_pretrained(tmp_path / "ckpt")  # the same checkpoint loaded again, in another dtype, reads it
    again = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16)
    assert ChatClara(clara=again, store=vectorstore).store


def test_a_users_own_prompt_reads_the_retrieved_documents_from_the_store(tiny_model, vectorstore, no_compression):
    chat = ChatClara(store=vectorstore)  # the framework store is accepted, and lends its model
    assert chat.clara is tiny_model and chat.store is vectorstore.store
    chain = ({"context": ClaraRetriever(store=vectorstore.store, k=3) | format_documents,
              "question": RunnablePassthrough()} | OWN_PROMPT | chat)
    result = chain.invoke(QUESTION)
    assert result.response_metadata["clara"]["stored_documents"] == 3
    assert result.response_metadata["clara"]["compressed_documents"] == 0
    assert chat.stats.calls == 1 and chat.stats.stored_documents == 3


@pytest.mark.parametrize("change", ["deleted", "rewritten"])
def test_a_document_another_writer_changes_while_a_prompt_is_read_is_read_as_its_text(tiny_model, vectorstore,
                                                                                      monkeypatch, change):
    # found in the prompt, then deleted (the request failed: unknown document ids) or rewritten
    # (its new memories were read in the old text's place) before its memories were fetched
    store = vectorstore.store
    found = store.documents_in

    def a_writer_acts_meanwhile(text):
        spans = found(text)
        if change == "deleted":
            store.delete(["d1"])
        else:
            store.upsert(["Rome is the capital of Italy, and this text is new."], ids=["d1"])
        return spans

    monkeypatch.setattr(store, "documents_in", a_writer_acts_meanwhile)
    prompt = f"Context:\n{CORPUS[0]}\n\n{CORPUS[1]}\n\nQuestion: {QUESTION}"
    reading = read_messages(tiny_model, [("user", prompt)], store)
    assert reading.stored_ids == ["d0"] and reading.compressed == 1
    expected = tiny_model.compress_documents([CORPUS[1]])[0]
    assert any(torch.allclose(memory, expected, atol=1e-5) for memory in reading.memories)


def test_one_id_found_with_two_texts_reads_memories_only_where_the_text_is_the_stored_one(tiny_model, vectorstore,
                                                                                         monkeypatch):
    # the texts were kept one per id: a rewrite between two messages' lookups read the new
    # memories for the old text too
    store = vectorstore.store
    found, calls = store.documents_in, []
    rewritten = "Rome is the capital of Italy, and this text is new."

    def rewritten_after_the_first_message(text):
        spans = found(text)
        calls.append(text)
        if len(calls) == 1:
            store.upsert([rewritten], ids=["d1"])
        return spans

    monkeypatch.setattr(store, "documents_in", rewritten_after_the_first_message)
    reading = read_messages(tiny_model, [("user", f"Context:\n{CORPUS[1]}"), ("assistant", "Noted."),
                                         ("user", f"And:\n{rewritten}\n\nQuestion: {QUESTION}")], store)
    assert reading.stored_ids == ["d1"] and reading.compressed == 1


def test_a_document_with_a_blank_line_stays_one_document(tiny_model, vectorstore, no_compression):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    result = chat.invoke(OWN_PROMPT.invoke({"context": TWO_PARAGRAPHS, "question": "Where does the Rhine rise?"}))
    assert result.response_metadata["clara"] == {
        "memory_documents": 1, "stored_documents": 1, "compressed_documents": 0,
        "input_positions": result.usage_metadata["input_tokens"]}


def test_create_stuff_documents_chain_reads_memory_tokens(tiny_model, vectorstore, no_compression):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    prompt = ChatPromptTemplate.from_messages([("system", "Use the context to answer.\n\n{context}"),
                                               ("human", "{input}")])
    chain = create_stuff_documents_chain(chat, prompt)
    documents = [Document(CORPUS[4]), Document(CORPUS[0])]
    chain.invoke({"input": QUESTION, "context": documents})
    assert chat.stats.stored_documents == 2 and chat.stats.compressed_documents == 0


def test_chat_history_is_part_of_the_prompt(tiny_model, vectorstore):
    messages = [HumanMessage("Where does the Danube flow?"), AIMessage("Through Vienna."),
                HumanMessage("And which other capitals?")]
    reading = read_messages(tiny_model, [("user", m.text) if isinstance(m, HumanMessage) else ("assistant", m.text)
                                         for m in messages], vectorstore.store, documents=[CORPUS[3]])
    assert "Where does the Danube flow?" in reading.prompt and "Through Vienna." in reading.prompt
    assert reading.prompt.index("Through Vienna.") < reading.prompt.index("Question:And which other capitals?")
    chat = ChatClara(clara=tiny_model, store=vectorstore.store)
    result = chat.invoke(messages, documents=[CORPUS[3]])
    assert result.usage_metadata["input_tokens"] == reading.positions


def test_a_search_between_streamed_tokens_does_not_change_the_answer(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store, max_tokens=12)
    alone = "".join(chunk.text for chunk in chat.stream(QUESTION, document_ids=["d4"]))
    stream = chat.stream(QUESTION, document_ids=["d4"])
    pieces = [next(stream).text]
    vectorstore.similarity_search("Where is the tower?", k=2)  # runs the query reasoner mid-stream
    pieces += [chunk.text for chunk in stream]
    assert "".join(pieces) == alone


def test_threads_share_one_model(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store, max_tokens=12)
    questions = [QUESTION, "Where is the tower?", "Which river flows through Vienna?", "What is Berlin?"]
    alone = [chat.invoke(q, document_ids=["d1", "d3"]).content for q in questions]
    barrier = threading.Barrier(len(questions))

    def answer(question: str) -> str:
        barrier.wait()
        text = ""
        for chunk in chat.stream(question, document_ids=["d1", "d3"]):
            vectorstore.similarity_search(question, k=1)
            text += chunk.text
        return text

    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(answer, questions)) == alone


@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
def test_a_pipeline_without_memory_tokens_is_told_once_by_name(tiny_model, framework):
    if framework == "langchain":
        model, ask = ChatClara(clara=tiny_model, max_tokens=2), ChatClara.invoke
    else:
        model, ask = ClaraLLM(clara=tiny_model, max_new_tokens=2), ClaraLLM.complete
    with pytest.warns(UserWarning, match=f"^{type(model).__name__} read no memory tokens"):
        ask(model, "A question with no documents at all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ask(model, "Another one")
    assert not [w for w in caught if "memory tokens" in str(w.message)]


def test_each_model_keeps_its_own_reading_totals(tiny_model, vectorstore):
    reading, idle = ChatClara(clara=tiny_model, store=vectorstore, max_tokens=2), ChatClara(clara=tiny_model)
    reading.invoke(CORPUS[0], document_ids=["d1"])  # two documents, no text to rank them by: both read
    assert reading.stats.calls == 1 and idle.stats.calls == 0
    # a copy counted into the original's totals; the totals' lock made a snapshot fail to copy
    copied = reading.model_copy(update={"max_tokens": 1})
    copied.invoke(CORPUS[0], document_ids=["d1"])
    assert reading.stats.calls == 1 and copied.stats.calls == 1
    snapshot = copy.deepcopy(reading.stats)
    assert pickle.loads(pickle.dumps(reading.stats)) == snapshot == reading.stats
    snapshot.add(read_messages(tiny_model, [("user", QUESTION)], documents=[CORPUS[1]]))
    assert snapshot.calls == 2 and reading.stats.calls == 1
    # a deep copy failed on the store's lock (and, without a store, copied the model's weights)
    from langchain_core.rate_limiters import InMemoryRateLimiter

    limited = ChatClara(store=vectorstore, rate_limiter=InMemoryRateLimiter())  # a lock of its own
    for model in (reading, ClaraLLM(store=vectorstore), limited):
        deep = model.model_copy(deep=True)
        assert deep.clara is model.clara and deep.store is model.store and deep.stats.calls == 0
        assert deep.rate_limiter is model.rate_limiter
        copied = copy.deepcopy([model.clara, model, model.clara])  # one object stays one object
        assert copied[0] is copied[2] and copied[1].clara is copied[0]
    retriever = ClaraRetriever(store=vectorstore, k=2)  # the store's lock failed a retriever's (a chain's) copy
    assert retriever.model_copy(deep=True).store is retriever.store


def test_copies_share_the_model_of_an_embedding_and_pickles_of_a_store_refuse_it_by_name(tiny_model, vectorstore):
    # a deep copy of an embedding (alone, in a store or in a retriever) duplicated the model's
    # weights, and the LlamaIndex copy's memory tokens reached no store; LangChain's store, its
    # retriever and the core store failed to pickle on the store's lock, a bare TypeError
    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_clara import ClaraEmbeddings

    assert copy.deepcopy(LlamaClaraVectorStore(tiny_model)).embed_model.clara is tiny_model
    retriever = InMemoryVectorStore(ClaraEmbeddings(tiny_model)).as_retriever()
    assert retriever.model_copy(deep=True).vectorstore.embedding.model is tiny_model
    for use in (lambda: pickle.loads(pickle.dumps(vectorstore)).similarity_search(QUESTION),
                lambda: pickle.loads(pickle.dumps(vectorstore.as_retriever())).invoke(QUESTION)):
        with pytest.raises(TypeError, match="ClaraVectorStore was unpickled without the CLaRa model it held"):
            use()
    with pytest.raises(TypeError, match="a MemoryStore is not pickled: save it"):
        pickle.dumps(vectorstore.store)
    # copies are no picklings: they share the store (a retriever's deep copy held a stand-in)
    assert copy.copy(vectorstore) is copy.deepcopy(vectorstore) is vectorstore
    assert copy.copy(vectorstore.store) is vectorstore.store
    assert len(vectorstore.as_retriever(search_kwargs={"k": 2}).model_copy(deep=True).invoke(QUESTION)) == 2


def test_tools_and_structured_output_are_refused_with_a_reason(tiny_model):
    chat = ChatClara(clara=tiny_model)
    with pytest.raises(NotImplementedError, match="cannot call tools"):
        chat.bind_tools([])
    with pytest.raises(NotImplementedError, match="no structured output"):
        chat.with_structured_output(dict)


def test_llama_index_structured_output_is_refused_before_any_generation(tiny_model, monkeypatch):
    # it generated a whole answer, then failed on "Could not extract json string from output"
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    llm = ClaraLLM(clara=tiny_model)
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: pytest.fail("an answer was generated"))
    prompt = PromptTemplate("Capital of {country}?")
    for call in (lambda: llm.structured_predict(City, prompt, country="France"),
                 lambda: llm.stream_structured_predict(City, prompt, country="France"),
                 lambda: llm.as_structured_llm(City),
                 lambda: asyncio.run(llm.astructured_predict(City, prompt, country="France")),
                 lambda: asyncio.run(llm.astream_structured_predict(City, prompt, country="France"))):
        with pytest.raises(NotImplementedError, match="ClaraLLM has no structured output"):
            call()


@pytest.fixture
def llama_index(tiny_model) -> tuple[VectorStoreIndex, LlamaClaraVectorStore]:
    store = LlamaClaraVectorStore(tiny_model)
    nodes = [TextNode(text=text, id_=f"n{i}") for i, text in enumerate(CORPUS)]
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=store.embed_model)
    return index, store


def test_llama_index_default_query_engine_reads_memory_tokens(tiny_model, llama_index, no_compression):
    index, store = llama_index
    llm = ClaraLLM(store=store)  # the framework store is accepted, and lends its model
    assert llm.clara is tiny_model
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION)
    assert isinstance(response.response, str)
    assert llm.stats.calls == 1 and llm.stats.stored_documents == 2 and llm.stats.compressed_documents == 0


def test_nodes_whose_text_the_synthesizer_trims_are_read_from_the_store(tiny_model, monkeypatch):
    # LlamaIndex trims a node's text on its way into the prompt (semantic splitter chunks end in
    # a space): the exact stored text was not in the prompt, so it was read as text
    store = LlamaClaraVectorStore(tiny_model)
    nodes = [TextNode(text=f"  {text} \n", id_=f"n{i}", metadata={"n": i}) for i, text in enumerate(CORPUS)]
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=store.embed_model)
    refuse_compression(tiny_model, monkeypatch)
    llm = ClaraLLM(store=store, max_new_tokens=4)
    index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION)
    assert llm.stats.stored_documents == 2 and llm.stats.compressed_documents == 0


@pytest.mark.parametrize("mode", ["context", "condense_plus_context"])
def test_llama_index_chat_engines_read_memory_tokens(tiny_model, llama_index, no_compression, mode):
    index, store = llama_index
    llm = ClaraLLM(clara=tiny_model, store=store.client, max_new_tokens=8)
    engine = index.as_chat_engine(chat_mode=mode, llm=llm, similarity_top_k=2)
    engine.chat(QUESTION)
    engine.chat("And in which fields?")
    assert llm.stats.stored_documents >= 2 and llm.stats.compressed_documents == 0


def test_llama_index_completion_and_chat_agree(tiny_model, llama_index):
    _, store = llama_index
    llm = ClaraLLM(clara=tiny_model, store=store.client)
    completion = llm.complete(f"Context: {CORPUS[4]}\n\nQuestion: {QUESTION}")
    assert completion.additional_kwargs["clara"]["stored_documents"] == 1
    assert completion.additional_kwargs["clara"]["input_positions"] == llm.stats.input_positions > 0
    from llama_index.core.base.llms.types import ChatMessage

    chat = llm.chat([ChatMessage(role="user", content=f"Context: {CORPUS[4]}\n\nQuestion: {QUESTION}")])
    assert chat.message.content == completion.text


def test_stored_documents_are_found_wherever_they_occur(tiny_model, vectorstore):
    store = vectorstore.store
    text = f"Intro. {CORPUS[2]} middle {CORPUS[4]}{CORPUS[1]} end {CORPUS[2][:40]}"
    found = store.documents_in(text)
    assert [doc_id for _, _, doc_id in found] == ["d2", "d4", "d1"]  # a partial text is not a document
    assert all(text[start:end] == store.get([doc_id])[0].text for start, end, doc_id in found)


def test_the_text_lookup_is_kept_up_with_every_write_not_built_again(tiny_model, monkeypatch):
    import clara_plugins.store

    builds = []

    class CountedLookup(TextLookup):
        def __init__(self, rows=()):
            builds.append(1)
            super().__init__(rows)

    monkeypatch.setattr(clara_plugins.store, "TextLookup", CountedLookup)
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    prompt = f"Context: {CORPUS[0]}\n{CORPUS[1]}\n{CORPUS[2]}\n{CORPUS[3]}"

    def found():
        return [doc_id for _, _, doc_id in store.documents_in(prompt)]

    assert found() == ["a", "b"] and len(builds) == 1
    # appended, a text the prompt holds as a's (its whitespace trimmed) is found as the later one
    store.upsert([CORPUS[2], f"  {CORPUS[0]}\n"], ids=["c", "a-again"])
    assert found() == ["a-again", "b", "c"] and store.ids_for_texts([CORPUS[2], CORPUS[0]]) == ["c", "a"]
    store.upsert([CORPUS[3]], ids=["b"])  # replaced: b's text is another now
    assert found() == ["a-again", "c", "b"] and store.ids_for_texts([CORPUS[1]]) == [None]
    store.upsert([CORPUS[3], CORPUS[1]], ids=["d", "b"])  # b's text moves to d, and b takes its first one back
    assert found() == ["a-again", "b", "c", "d"] and store.ids_for_texts([CORPUS[3]]) == ["d"]
    store.delete(["a-again", "d"])
    assert found() == ["a", "b", "c"] and store.ids_for_texts([CORPUS[0], CORPUS[3]]) == ["a", None]
    assert len(builds) == 1  # a million documents took 2.5 s to build it again after each write
    store.upsert([CORPUS[0]], ids=["a"])  # written again: last now, as its copy under "b" is not
    store.upsert([CORPUS[0]], ids=["b"])
    assert store.ids_for_texts([CORPUS[0]]) == ["b"]
    store.delete(["b"])
    assert store.ids_for_texts([CORPUS[0]]) == ["a"] and found() == ["a", "c"]
    # as built anew from the stored rows (a loaded store's lookup), for every write made
    assert TextLookup((doc.id, doc.text) for doc in store.get(store.all_ids())).find(prompt) == \
        store.documents_in(prompt)


def test_a_write_stopped_while_its_text_lookup_is_kept_up_leaves_the_rest_of_the_store_whole(tiny_model,
                                                                                            monkeypatch):
    # the lookup was kept up before the index: a stopped write left a built index short of the new
    # rows, and every later search mapped its hits to the wrong documents
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:3], ids=["a", "b", "c"])
    store.search("capital", k=1), store.documents_in(CORPUS[0])  # both built
    revision = store.revision

    def stopped(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(TextLookup, "add", stopped)
    with pytest.raises(KeyboardInterrupt):
        store.upsert(CORPUS[3:5], ids=["d", "b"])  # an append and a replace
    monkeypatch.undo()
    assert store._index.ntotal == len(store) == 4 and store.revision > revision
    assert [doc_id for _, _, doc_id in store.documents_in(f"{CORPUS[4]} {CORPUS[3]}")] == ["b", "d"]
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(TextLookup, "remove", stopped)
        store.delete(["a"])
    monkeypatch.undo()
    assert store._index.ntotal == len(store) == 3 and store.documents_in(CORPUS[0]) == []


def test_interleaved_streams_leave_no_switch_behind(tiny_model):
    tiny_model.train()
    memories = tiny_model.compress_documents(CORPUS[:2])
    first = tiny_model.stream_answer(QUESTION, memories, max_new_tokens=4)
    second = tiny_model.stream_answer("Where is the tower?", memories, max_new_tokens=4)
    next(first), next(second)
    list(first), list(second)  # finished in another order than they started
    assert torch.is_grad_enabled() and tiny_model.training
    tiny_model.eval()


def test_every_encoder_pass_sets_its_inference_switches_under_the_models_lock(tiny_model, monkeypatch):
    # compress and encode_queries switched to eval once, outside the lock: a thread finishing
    # first put a shared training-mode model back in training mode under another's pass (dropout on)
    real, passes = tiny_model._encode_tokens, []

    def recording(*args, **kwargs):
        passes.append((tiny_model.training, torch.is_grad_enabled(), tiny_model._lock._is_owned()))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "_encode_tokens", recording)
    tiny_model.train()
    try:
        tiny_model.compress(CORPUS[:3], batch_size=2)
        tiny_model.encode_queries([QUESTION])
    finally:
        tiny_model.eval()
    assert passes == [(False, False, True)] * 3


@pytest.mark.parametrize("call", ["ChatClara.ainvoke", "ClaraLLM.acomplete", "ClaraLLM.achat",
                                  "ClaraSynthesizer.aget_response"])
def test_a_cancelled_async_answer_stops_generating(tiny_model, call):
    # the whole answer was one worker-thread call, which went on to its last token after a
    # timeout or a client gone, holding the model's lock and an executor thread meanwhile
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index_clara import ClaraSynthesizer

    tiny_model.stop_token_ids = set()  # every answer runs to its limit
    llm = ClaraLLM(clara=tiny_model, max_new_tokens=40)
    start = {"ChatClara.ainvoke": lambda: ChatClara(clara=tiny_model, max_tokens=40).ainvoke(QUESTION),
             "ClaraLLM.acomplete": lambda: llm.acomplete(QUESTION),
             "ClaraLLM.achat": lambda: llm.achat([ChatMessage(role="user", content=QUESTION)]),
             "ClaraSynthesizer.aget_response": lambda: ClaraSynthesizer(llm).aget_response(QUESTION, CORPUS[:2])}[call]
    passes, real = [], tiny_model._decode

    async def cancelled_at_the_third_pass() -> None:
        task = asyncio.ensure_future(start())
        loop = asyncio.get_running_loop()

        def counted(**inputs):
            passes.append(1)
            if len(passes) == 3:
                loop.call_soon_threadsafe(task.cancel)
            return real(**inputs)

        tiny_model._decode = counted
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_at_the_third_pass())  # which waits for its worker threads to end
    assert len(passes) <= 4


async def test_concurrent_astreams_answer_as_they_would_alone(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store, max_tokens=10)
    questions = [QUESTION, "Where is the tower?", "Which river flows through Vienna?"]
    alone = [chat.invoke(q, document_ids=["d2", "d4"]).content for q in questions]

    async def answer(question: str) -> str:
        return "".join([chunk.text async for chunk in chat.astream(question, document_ids=["d2", "d4"])])

    assert await asyncio.gather(*(answer(q) for q in questions)) == alone


def test_either_frameworks_store_is_accepted_by_either_model(tiny_model, vectorstore, llama_index):
    _, llama_store = llama_index
    assert ChatClara(store=llama_store).store is llama_store.client
    assert ClaraLLM(store=vectorstore).store is vectorstore.store
    # and by either framework's vector store (a bare AttributeError, 'ClaraVectorStore' has no 'model')
    assert ClaraVectorStore(store=llama_store).store is llama_store.client
    assert LlamaClaraVectorStore(store=vectorstore).client is vectorstore.store
    for make in (ClaraVectorStore, LlamaClaraVectorStore):
        with pytest.raises(TypeError, match="store must be a MemoryStore or a CLaRa vector store .*got str"):
            make(store="stores/x")


def test_memories_follow_the_documents_where_the_chat_template_moved_their_messages(tiny_model):
    # a template without a system role gets the system texts in the first user turn: the prompt
    # held A, C, B while the memories went in as A, B, C, each into another document's slots
    tiny_model.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    a, b, c = CORPUS[0], CORPUS[2], CORPUS[4]
    messages = [("system", a), ("user", b), ("assistant", "Noted."), ("system", c), ("user", QUESTION)]
    reading = read_messages(tiny_model, messages, documents=[a, b, c])
    assert torch.allclose(reading.memories, tiny_model.compress_documents([a, c, b]).cpu(), atol=1e-5)
    assert reading.prompt.index("<|user|>") < reading.prompt.index(tiny_model.document_placeholder)


@pytest.mark.parametrize("template", ["no system role", "a default system turn"])
def test_a_system_message_anywhere_takes_the_trained_system_prompts_place(tiny_model, template):
    # one after the first turn (a system instruction below a history) was read beside the trained
    # one; and, moved to no place of its own, beside the template's default (SmolLM2's writes one
    # before messages a system turn does not lead)
    from clara_plugins.config import SYSTEM_PROMPT

    if template == "a default system turn":
        tiny_model.tokenizer.chat_template = (
            "{% if messages[0]['role'] != 'system' %}<|system|>DEFAULT\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    for messages in ([("user", "Hello."), ("assistant", "Hi."), ("system", "Be terse."), ("user", QUESTION)],
                     [("system", "Be terse."), ("user", QUESTION)]):
        prompt = read_messages(tiny_model, messages).prompt
        assert SYSTEM_PROMPT not in prompt and "DEFAULT" not in prompt
        first_turn = min(place for place in (prompt.find("Hello."), prompt.find(QUESTION)) if place >= 0)
        assert prompt.index("Be terse.") < first_turn
    assert SYSTEM_PROMPT in read_messages(tiny_model, [("user", "Hello."), ("assistant", "Hi."), ("user", QUESTION)]).prompt


def test_a_template_whose_turns_must_alternate_reads_runs_of_one_role_as_one_turn(tiny_model, monkeypatch):
    # two user turns in a row (a tool's result reads as user text) raised the template's own error
    tiny_model.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    reading = read_messages(tiny_model, [("system", "Be brief."), ("user", CORPUS[0]), ("user", QUESTION)],
                            documents=[CORPUS[0]])
    assert reading.prompt.count("<|user|>") == 1 and len(reading.memories) == 1
    compressed = []
    monkeypatch.setattr(tiny_model, "compress_documents", lambda texts: compressed.append(texts))
    with pytest.raises(InvalidInputError, match="the model's chat template refuses these messages: Conversation"):
        read_messages(tiny_model, [("assistant", "Hello."), ("user", QUESTION)], documents=[CORPUS[1]])
    assert compressed == []  # refused before the documents were compressed, not after


def test_documents_a_chat_template_leaves_out_are_refused_by_name(tiny_model):
    tiny_model.tokenizer.chat_template = (  # drops the system message
        "{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(InvalidInputError, match="chat template left out 1 of the messages' documents"):
        read_messages(tiny_model, [("system", CORPUS[0]), ("user", QUESTION)], documents=[CORPUS[0]])


def test_a_message_holding_a_documents_mark_is_refused_before_any_compression(tiny_model, monkeypatch):
    # read as a document's place: the memories came out in another order, or a slot too many
    monkeypatch.setattr(tiny_model, "compress", lambda *a, **k: pytest.fail("documents were compressed"))
    with pytest.raises(InvalidInputError, match="message 0 holds U\\+E000, digits, U\\+E001"):
        read_messages(tiny_model, [("system", "icons \ue0001\ue001 here"), ("user", QUESTION)],
                      documents=[CORPUS[0], CORPUS[1]])
    # a private-use character alone (an icon font's glyph) is text
    assert read_messages(tiny_model, [("user", "Rate \ue000 or \ue001: " + QUESTION)]).prompt


def test_a_passed_document_overlapping_another_in_the_prompt_is_read_once(tiny_model):
    # chunks cut with overlap: the one the others overlapped was read in place (its middle as text)
    # and again, whole, in the Background block
    article = " ".join(f"Sentence {i} is about the Danube." for i in range(5))  # 164 characters
    chunks = [article[:60], article[40:120], article[100:]]
    reading = read_messages(tiny_model, [("user", f"Summarize this article:\n{article}")], documents=chunks, k=5)
    assert "Background:" not in reading.prompt and len(reading.memories) == 2


def test_a_short_explicit_document_is_not_cut_out_of_the_question(tiny_model):
    reading = read_messages(tiny_model, [("user", "Tell me about Paris")], documents=["Paris"])
    assert "Question:Tell me about Paris" in reading.prompt and len(reading.memories) == 1


def test_a_rewriting_step_after_reading_is_not_warned_about(tiny_model, vectorstore):
    chat = ChatClara(clara=tiny_model, store=vectorstore.store, max_tokens=2)
    chat.invoke(QUESTION, document_ids=["d1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat.invoke("Rewrite this question as a search query: who won prizes?")
    assert not [w for w in caught if "memory tokens" in str(w.message)]


def test_k_or_fewer_passed_documents_are_read_best_first(tiny_model, vectorstore):
    ranked = [d.id for d, _ in vectorstore.store.search(QUESTION, k=4)]
    reading = read_messages(tiny_model, [("user", QUESTION)], vectorstore.store, ids=ranked[::-1], k=5)
    assert reading.stored_ids == ranked  # the generator reads its first document most
    assert torch.equal(reading.memories, vectorstore.store.memories(ranked).float())


def test_the_query_reasoner_reads_the_question_of_the_trained_layout_alone(tiny_model, monkeypatch):
    # "Background:\n\n\nQuestion:" around the question was pooled into the mean query key, so the
    # documents kept beyond k differed from those a store search for the question kept
    queries = []
    encode = tiny_model.encode_queries
    monkeypatch.setattr(tiny_model, "encode_queries", lambda texts: queries.extend(texts) or encode(texts))
    prompt = ANSWER_TEMPLATE.format(documents="\n\n".join(CORPUS[:3]), question=" " + QUESTION)
    read_messages(tiny_model, [("user", prompt)], documents=CORPUS[:3], k=1)
    read_messages(tiny_model, [("user", f"Answer briefly. {QUESTION}")], documents=CORPUS[:3], k=1)
    assert queries == [QUESTION, f"Answer briefly. {QUESTION}"]
    # nor LlamaIndex's instructions around it: a query engine's nodes beyond k were ranked by them
    from llama_index.core.prompts.chat_prompts import CHAT_REFINE_PROMPT_TMPL_MSGS, TEXT_QA_PROMPT_TMPL_MSGS

    queries.clear()
    for template, fields in [(TEXT_QA_PROMPT_TMPL_MSGS[-1], {"context_str": "\n\n".join(CORPUS[:3])}),
                             (CHAT_REFINE_PROMPT_TMPL_MSGS[-1], {"context_msg": "\n\n".join(CORPUS[:3]),
                                                               "existing_answer": "Paris."})]:
        read_messages(tiny_model, [("user", template.content.format(query_str=QUESTION, **fields))],
                      documents=CORPUS[:3], k=1)
    assert queries == [QUESTION, QUESTION]


def test_k_or_fewer_documents_in_place_need_no_query_reasoner_pass(tiny_model, vectorstore, monkeypatch):
    # a retriever's k documents in a chain's prompt were ranked again (a query pass of 140 ms on 2
    # cores) though every one is read in its place
    queries = []
    encode = tiny_model.encode_queries
    monkeypatch.setattr(tiny_model, "encode_queries", lambda texts: queries.extend(texts) or encode(texts))
    prompt = ANSWER_TEMPLATE.format(documents="\n\n".join(CORPUS[:3]), question=" " + QUESTION)
    reading = read_messages(tiny_model, [("user", prompt)], vectorstore.store, k=3)
    assert queries == [] and len(reading.memories) == 3
    read_messages(tiny_model, [("user", prompt)], vectorstore.store, k=2)  # one of them is left out: ranked
    assert queries == [QUESTION]


def test_no_empty_background_block_when_the_top_k_keeps_none_of_the_passed_documents(tiny_model, vectorstore,
                                                                                     monkeypatch):
    # the question read "Background:\n\n\nQuestion:...", a layout the generator never trained on
    from clara_plugins import context

    monkeypatch.setattr(context, "_kept", lambda model, memories, texts, pieces, k, ordered: {1: 0})  # in place
    reading = read_messages(tiny_model, [("user", f"{CORPUS[1]}\n\nQuestion: {QUESTION}")], vectorstore.store,
                            documents=["An extra passage, ranked below the top k."], k=1)
    assert len(reading.memories) == 1 and "Background:" not in reading.prompt


def test_documents_passed_beside_the_trained_layout_join_its_background_block(tiny_model, vectorstore):
    # CLARA_PROMPT's message given another document read "Background:\n<doc>\n\nQuestion:Background:..."
    prompt = ANSWER_TEMPLATE.format(documents=CORPUS[1], question=" " + QUESTION)
    reading = read_messages(tiny_model, [("user", prompt)], vectorstore.store, documents=[CORPUS[2]], k=2)
    placeholder = tiny_model.document_placeholder
    assert reading.prompt.count("Background:") == 1 and reading.stored_ids == ["d2", "d1"]
    assert f"Background:\n{placeholder}{placeholder}\n\nQuestion: {QUESTION}" in reading.prompt


def test_a_document_the_prompt_holds_twice_counts_once_among_the_k(tiny_model, vectorstore):
    # a chat that repeated its passages gave each copy a place: k=2 read A twice and left B out
    turn = f"{CORPUS[0]}\n\n{CORPUS[1]}"
    reading = read_messages(tiny_model, [("user", turn), ("assistant", "Noted."), ("user", f"{turn}\n\n{QUESTION}")],
                            vectorstore.store, k=2)
    assert len(reading.memories) == 4 and sorted(set(reading.stored_ids)) == ["d0", "d1"]


def test_a_passed_document_is_read_at_every_place_the_prompt_holds_it(tiny_model):
    # the first copy was read from memory tokens, the second as text
    text = "A passage the store does not hold, passed with the call."
    reading = read_messages(tiny_model, [("user", f"{text}\n\nAgain: {text}\n\n{QUESTION}")], documents=[text])
    assert text not in reading.prompt and len(reading.memories) == 2


def test_a_refused_call_is_not_counted_and_the_totals_are_plain_data(tiny_model):
    # the reading was counted before the generator refused it (an answer length of 0, a prompt
    # past the window): the totals reported reads that never were; asdict failed on their lock
    import dataclasses

    from clara_plugins import InvalidInputError
    from langchain_clara import ChatClara
    from llama_index_clara import ClaraLLM

    for adapter in (ChatClara(clara=tiny_model), ClaraLLM(clara=tiny_model)):
        call = adapter.invoke if isinstance(adapter, ChatClara) else adapter.complete
        with pytest.raises(InvalidInputError, match="max_new_tokens must be a positive integer"):
            call("Capital?", documents=[CORPUS[0]], max_tokens=0)
        assert adapter.stats.calls == 0
        call("Capital?", documents=[CORPUS[0]], max_tokens=2)
        assert dataclasses.asdict(adapter.stats)["calls"] == 1
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        tiny_model.stream("Capital?", None, 0)  # at the call, not at the first piece
