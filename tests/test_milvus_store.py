"""MilvusMemoryStore against milvus-lite: the local MemoryStore's behaviour, kept in Milvus."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from collections.abc import Iterator

import milvus_lite  # noqa: F401  the [milvus] extra, in [dev]: a broken install fails here, it does not skip
import numpy as np
import pymilvus
import pytest
import torch

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoreError, milvus_store
from clara_plugins.indexing import index_documents
from clara_plugins.milvus_store import MilvusMemoryStore
from conftest import CORPUS, randomize_adapters

IDS = [f"d{i}" for i in range(len(CORPUS))]
QUERIES = ["Who won prizes in physics?", "The capital of Germany", "A river through Vienna"]
METAS = [  # values of every kind the filters compare, and strings that must not break an expression
    {"topic": "city", "n": 1, "date": "2024-01-05", "tags": ["a", "b"]},
    {"topic": "tower", "n": 2.5, "date": "2023-12-31", 'quote"key\\': 'say "hi"\\'},
    {"topic": "city", "n": -3, "flag": True, "big": sys.float_info.max},
    {"topic": "river\nnile", "n": "4", "big": -sys.float_info.max},
    {"topic": "科学", "flag": False, "nested": {"x": [1, None]}},
    {"topic": 'x" or id != "', "n": 10**6},
]
FILTERS = [
    {}, {"topic": "city"}, {"topic": {"$eq": "tower"}}, {"n": 1}, {"n": 2.5}, {"flag": True}, {"flag": False},
    {"topic": {"$ne": "city"}}, {"n": {"$ne": 1}}, {"tags": {"$ne": "a"}}, {"missing": {"$ne": 1}},
    {"topic": {"$in": ["tower", "科学"]}}, {"n": {"$in": []}}, {"n": {"$in": [2.5, "4"]}},
    {"topic": {"$nin": ["city"]}}, {"n": {"$nin": []}},
    {"n": {"$gt": 1}}, {"n": {"$gte": 2.5}}, {"n": {"$lt": 0}}, {"n": {"$lte": 10**6}}, {"n": {"$gt": 1, "$lt": 100}},
    {"date": {"$gte": "2024-01-01"}}, {"topic": {"$lt": "d"}},
    {"n": {"$lt": float("inf")}}, {"n": {"$gt": float("-inf")}}, {"n": {"$gt": float("inf")}},
    # the largest numbers against infinite bounds (a clamp to them made +inf equal the largest)
    {"big": {"$lt": float("inf")}}, {"big": {"$gte": float("inf")}}, {"big": float("inf")},
    {"big": {"$ne": float("inf")}}, {"big": {"$gt": float("-inf")}}, {"big": {"$lte": float("-inf")}},
    {"big": {"$in": [float("inf"), sys.float_info.max]}}, {"big": {"$nin": [float("-inf")]}},
    {"$and": [{"topic": "city"}, {"n": {"$gt": 0}}]}, {"$or": [{"topic": "tower"}, {"flag": True}]},
    {"$or": [{}, {"topic": "none"}]}, {"$and": [{}]}, {"tags": {}},
    {"$or": [{"$and": [{"topic": "city"}, {"n": {"$lt": 0}}]}, {"n": {"$in": [2.5, "4"]}}]},
    {'quote"key\\': 'say "hi"\\'}, {"topic": "river\nnile"}, {"topic": 'x" or id != "'},
    {"n": True}, {"flag": 1}, {"flag": {"$in": [1]}}, {"flag": {"$ne": 0}}, {"n": {"$nin": [True]}},  # JSON's types
    # numpy's: a float broke the expression, an int bound and a boolean were refused
    {"n": np.int64(1)}, {"n": {"$gt": np.float64(0.5)}}, {"n": {"$gte": np.int64(1)}}, {"n": {"$lt": np.float32(3)}},
    {"flag": np.bool_(True)},
]


@pytest.fixture
def local(tiny_model) -> MemoryStore:
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS, IDS, METAS)
    return store


@pytest.fixture
def uri(tmp_path) -> str:
    return str(tmp_path / "stores" / "clara.db")  # the store makes the folder


@pytest.fixture
def milvus(tiny_model, uri) -> Iterator[MilvusMemoryStore]:
    store = MilvusMemoryStore(tiny_model, uri)
    store.upsert(CORPUS, IDS, METAS)
    yield store
    store.close()


def assert_same_results(found, expected) -> None:
    """Two stores' (document, score) lists: the same ids in the same order, the same cosines."""
    assert [doc.id for doc, _ in found] == [doc.id for doc, _ in expected]
    assert np.allclose([score for _, score in found], [score for _, score in expected], atol=1e-6)



def test_a_document_is_found_in_a_prompt_that_trimmed_it_as_in_the_local_store(milvus, local):
    # frameworks trim a document's text on its way into a prompt; the exact text was looked for
    text = "  The Volga flows into the Caspian Sea near Astrakhan. \n"
    prompt = f"Context:\n{text.strip()}\n\nQuestion: Where does the Volga end?"
    for store in (milvus, local):
        store.upsert([text], ids=["volga"])
        assert [doc_id for _, _, doc_id in store.documents_in(prompt)] == ["volga"]


def test_close_releases_the_store_and_keeps_its_documents(tiny_model, uri):
    store = MilvusMemoryStore(tiny_model, uri)
    store.upsert(CORPUS[:2], IDS[:2])
    store.close()
    reopened = MilvusMemoryStore(tiny_model, Path(uri))  # a Path failed on str.endswith
    assert sorted(reopened.all_ids()) == sorted(IDS[:2])
    reopened.close()


def test_ids_that_are_not_strings_are_refused_by_name(milvus):
    # an AttributeError came from the filter expression
    with pytest.raises(InvalidInputError, match="ids are strings"):
        milvus.delete([1])


def test_a_numpy_integer_k_searches_as_a_python_int(milvus):
    # pymilvus refused a numpy limit after the check had passed it
    assert len(milvus.search("Who won Nobel prizes?", k=np.int64(2))) == 2


def test_upsert_get_and_replace_by_id(milvus, tiny_model):
    assert len(milvus) == len(CORPUS) and sorted(milvus.all_ids()) == IDS
    assert [(d.id, d.text, d.metadata) for d in milvus.get(["d4", "nope", "d1"])] == [
        ("d4", CORPUS[4], METAS[4]), ("d1", CORPUS[1], METAS[1])]
    new_text = "Rome is the capital of Italy and of its Lazio region."
    milvus.upsert([new_text], ids=["d1"])
    milvus.upsert(["first", "second"], ids=["d9", "d9"])  # an id given twice keeps its last document
    assert len(milvus) == len(CORPUS) + 1 and milvus.get(["d1", "d9"])[1].text == "second"
    assert milvus.get(["d1"])[0].metadata == {}
    assert torch.allclose(milvus.memories(["d1"]), tiny_model.compress_documents([new_text]), atol=1e-2)
    assert milvus.documents_in(f"Context: {new_text}") == [(9, 9 + len(new_text), "d1")]
    assert milvus.documents_in(f"Context: {CORPUS[1]}") == []


def test_an_upsert_writes_request_by_request_the_rows_one_request_would(milvus, local, monkeypatch):
    # a whole corpus' float32 keys and norms were made before the first request
    from clara_plugins import milvus_store

    monkeypatch.setattr(milvus_store, "BATCH_ROWS", 2)
    texts = ["The Loire is the longest river in France.", "The Tagus flows through Lisbon.",
             "The Vistula rises in the Beskids.", "The Elbe flows into the North Sea."]
    ids = ["n1", "n2", "n3", "n1"]  # n1 given twice keeps its last document
    keyed = []
    memory_keys = milvus.keys.memory_keys
    monkeypatch.setattr(milvus.keys, "memory_keys", lambda memories: keyed.append(len(memories)) or memory_keys(memories))
    milvus.upsert(texts, ids=ids)
    assert keyed == [2, 1]  # float32 keys a request at a time
    local.upsert(texts, ids=ids)
    assert [d.text for d in milvus.get(["n1", "n2", "n3"])] == texts[3:] + texts[1:3]
    assert torch.equal(milvus.memories(["n1", "n2", "n3"]), local.memories(["n1", "n2", "n3"]))
    assert_same_results(milvus.search("Which city is the capital of Italy?", k=4),
                        local.search("Which city is the capital of Italy?", k=4))


def test_delete_ignores_unknown_ids(milvus):
    milvus.delete(["d0", "nope"])
    milvus.delete([])
    assert sorted(milvus.all_ids()) == IDS[1:] and milvus.get(["d0"]) == []
    assert all(doc.id != "d0" for doc, _ in milvus.search("Paris", k=6))


def test_ids_with_quotes_delete_only_themselves(milvus):
    odd = ["O'Brien.pdf_0", "x'] or id not in ['", "a','b", 'say "hi"\\']
    milvus.upsert(CORPUS[:4], ids=odd)
    for doc_id in odd:
        milvus.delete([doc_id])
    assert sorted(milvus.all_ids()) == IDS  # the stored documents are all there, the odd ones gone


def test_a_file_another_process_serves_is_refused_by_name(tiny_model, uri):
    # pymilvus said only "Open local milvus failed"; milvus-lite logged the lock held elsewhere
    import subprocess
    import sys

    Path(uri).parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"from pymilvus import MilvusClient; MilvusClient({uri!r}); "
                               "print('open', flush=True); input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match="another process has it open"):
            MilvusMemoryStore(tiny_model, uri)
    finally:
        holder.kill()
        holder.wait()


def test_a_home_relative_path_and_a_milvus_lite_2_file_are_read_as_meant(tiny_model, tmp_path, monkeypatch):
    # "~/..." made a folder named "~" where the process ran, which another working directory did not
    # find; a milvus-lite 2 file (milvus-lite 3 keeps a folder) was refused as another process's
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    store = MilvusMemoryStore(tiny_model, "~/stores/clara.db")
    store.upsert(CORPUS[:2], ids=["a", "b"])
    store.close()
    assert (tmp_path / "home" / "stores" / "clara.db").is_dir() and not (tmp_path / "~").exists()
    (tmp_path / "old.db").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(StoreError, match="old.db is a file: milvus-lite 3 keeps a store in a folder"):
        MilvusMemoryStore(tiny_model, str(tmp_path / "old.db"))


def test_an_index_is_built_and_searched_with_the_settings_given(tiny_model, uri, monkeypatch):
    # Milvus' defaults (nprobe, ef) bounded a large collection's recall, and no argument raised them
    import pymilvus

    built, searched = [], []
    add_index, search = pymilvus.milvus_client.IndexParams.add_index, pymilvus.MilvusClient.search
    monkeypatch.setattr(pymilvus.milvus_client.IndexParams, "add_index", lambda self, field_name, **options:
                        built.append((field_name, options.get("params"))) or add_index(self, field_name, **options))
    monkeypatch.setattr(pymilvus.MilvusClient, "search", lambda self, *a, **options:
                        searched.append(options["search_params"]) or search(self, *a, **options))
    with pytest.raises(InvalidInputError, match="milvus-lite builds no 'IVFPQ' index"):  # searched every row, unsaid
        MilvusMemoryStore(tiny_model, uri, index_type="IVFPQ")
    store = MilvusMemoryStore(tiny_model, uri, index_type="IVF_FLAT", index_params={"nlist": 4},
                              search_params={"nprobe": 4})
    store.upsert(CORPUS, IDS)
    store.search(CORPUS[0], k=2)
    store.search_params = {"ef": 2}  # an HNSW breadth below the documents asked for: refused by a server
    store.search(CORPUS[0], k=4)
    assert ("key", {"nlist": 4}) in built and searched == [{"metric_type": "IP", "params": {"nprobe": 4}},
                                                           {"metric_type": "IP", "params": {"ef": 4}}]
    store.search_params = {"ef": "128"}  # a bare TypeError in max()
    with pytest.raises(InvalidInputError, match="search_params\\['ef'\\] must be a positive integer"):
        store.search(CORPUS[0], k=4)
    # opened again it keeps the index it was built with: another asked for was ignored, unsaid
    with pytest.raises(StoreError, match="was indexed with IVF_FLAT, not FLAT: open it without index_type"):
        MilvusMemoryStore(tiny_model, uri, index_type="FLAT")
    assert len(MilvusMemoryStore(tiny_model, uri, index_type="IVF_FLAT")) == len(MilvusMemoryStore(tiny_model, uri))
    store.close()
    with pytest.raises(InvalidInputError, match="search_params must be a dict"):
        MilvusMemoryStore(tiny_model, uri, search_params=4)


def test_ids_holding_quotes_and_backslashes_page_as_any_other(milvus, monkeypatch):
    # pymilvus' iterator wrote the id ending a page into its next filter unescaped: a quote or a
    # backslash there failed every listing, or listed an id twice
    from clara_plugins import milvus_store

    monkeypatch.setattr(milvus_store, "BATCH_ROWS", 1)  # pages of 4 ids
    odd = ["b0", "b1", "b2", 'b3"q', "b4", "b5", "b6\\", "b7\\new"]  # the 4th and 8th in id order
    milvus.upsert(CORPUS[:6] + CORPUS[:2], ids=odd, metadatas=[{"k": 1}] * 8)
    listed = milvus.all_ids()
    assert sorted(listed) == sorted(IDS + odd) and len(listed) == len(set(listed))
    assert sorted(milvus.ids_where({"k": 1})) == sorted(odd)
    # a server's page may come back short before the end (milvus-lite's never does): read on
    query = milvus._client.query
    monkeypatch.setattr(milvus._client, "query", lambda *a, **k: query(*a, **k)[:3] if "iterator" in k else query(*a, **k))
    listed = milvus.all_ids()
    assert sorted(listed) == sorted(IDS + odd) and len(listed) == len(set(listed))


def test_memories_are_exactly_the_local_stores(milvus, local):
    assert torch.equal(milvus.memories(IDS[::-1]), local.memories(IDS[::-1]))  # key * norm gives back the fp16 bits
    assert milvus.memories([]).shape == local.memories([]).shape
    with pytest.raises(InvalidInputError, match="unknown document ids: \\['zz'\\]"):
        milvus.memories(["d2", "zz"])


def test_memories_as_found_keep_only_documents_that_still_hold_their_text_as_the_local_store(milvus, local,
                                                                                           monkeypatch):
    # another client deleting or rewriting a document between the text check and the memories
    # failed the request (unknown ids) or read new memories for old text: one query reads both
    found = [("d0", CORPUS[0].strip()), ("d1", "a text d1 no longer holds"), ("gone", "anything"),
             ("d0", CORPUS[0].strip())]
    from_local = local.memories_as_found(found)

    def deleted_by_another_client_meanwhile(ids):
        raise InvalidInputError(f"unknown document ids: {ids}")

    monkeypatch.setattr(milvus, "memories", deleted_by_another_client_meanwhile)  # a second read would meet it
    from_milvus = milvus.memories_as_found(found)
    assert list(from_milvus) == list(from_local) == [("d0", CORPUS[0].strip())]
    assert torch.equal(from_milvus[("d0", CORPUS[0].strip())], from_local[("d0", CORPUS[0].strip())])


def test_search_ranks_as_the_local_exact_search(milvus, local):
    searches = [{"k": len(CORPUS) + 2}, {"k": 2, "where": {"topic": "city"}}, {"k": 3, "ids": ["d1", "d3", "zz"]},
                {"k": 3, "lambda_mult": 0.3, "fetch_k": 5}]
    for query in QUERIES:
        for kwargs in searches:
            assert_same_results(milvus.search(query, **kwargs), local.search(query, **kwargs))
        key = local.keys.query_keys([query])[0]
        assert_same_results(milvus.search_by_key(key, k=3), local.search_by_key(key, k=3))
    assert milvus.relevance(0.5) == pytest.approx(local.relevance(0.5))  # both calibrate on every pair here


def test_every_filter_operator_keeps_what_the_local_store_keeps(milvus, local):
    for where in FILTERS:
        assert sorted(milvus.ids_where(where)) == sorted(local.ids_where(where)), where
        assert_same_results(milvus.search(QUERIES[0], k=len(CORPUS), where=where),
                            local.search(QUERIES[0], k=len(CORPUS), where=where))


def test_a_resumed_index_asks_which_ids_are_stored_without_reading_their_texts(milvus, local, monkeypatch):
    # it read every stored text and metadata (4,000 queries of up to 64 KB rows for a million)
    asked = ["d1", "nope", "d3", "d1"]
    assert milvus.stored_ids(asked) == local.stored_ids(asked) == {"d1", "d3"}
    monkeypatch.setattr(milvus, "get", lambda ids: pytest.fail("texts were read"))
    assert index_documents(milvus, [CORPUS[1], "a new text"], ["d1", "new"]) == ["new"]


def test_texts_are_found_in_prompts_as_in_the_local_store(milvus, local):
    prompt = f"Background:\n{CORPUS[2]}\n\n{CORPUS[4]} and {CORPUS[2][:40]}"
    assert milvus.documents_in(prompt) == local.documents_in(prompt)
    assert milvus.documents_in("short") == []
    texts = [CORPUS[3], "not stored", CORPUS[0]]
    assert milvus.ids_for_texts(texts) == local.ids_for_texts(texts) == ["d3", None, "d0"]


def test_documents_persist_in_milvus_across_processes(tiny_model, local, uri, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        from clara_plugins import ClaraModel
        from clara_plugins.milvus_store import MilvusMemoryStore
        model = ClaraModel.from_pretrained({str(tmp_path / "ckpt")!r}, device="cpu")
        MilvusMemoryStore(model, {uri!r}).upsert({CORPUS!r}, {IDS!r}, {METAS!r})
    """)
    written = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    reopened = MilvusMemoryStore(tiny_model, uri)
    assert sorted(reopened.all_ids()) == IDS and reopened.get(IDS) == local.get(IDS)
    assert torch.equal(reopened.memories(IDS), local.memories(IDS))
    assert_same_results(reopened.search(QUERIES[1], k=4), local.search(QUERIES[1], k=4))


def test_the_core_imports_without_pymilvus():
    script = "import sys, clara_plugins.store, clara_plugins.cli; assert 'pymilvus' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0


def test_a_collection_of_another_compressor_is_refused(milvus, tiny_config, uri):
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=7)
    with pytest.raises(StoreError, match="another compressor"):
        MilvusMemoryStore(other, uri)
    other_rate = ClaraModel(dataclasses.replace(tiny_config, compression_rate=8), device="cpu")
    with pytest.raises(StoreError, match="compression_rate=16"):
        MilvusMemoryStore(other_rate, uri)
    assert len(MilvusMemoryStore(milvus.model, uri)) == len(CORPUS)  # refusing changed nothing


def test_a_collection_the_store_did_not_create_is_refused(milvus, tiny_model, uri):
    client = pymilvus.MilvusClient(uri)  # another program's collection beside the store's
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("theirs", schema=schema, index_params=index)
    with pytest.raises(StoreError, match="'theirs' .* is not a CLaRa memory store"):
        MilvusMemoryStore(tiny_model, uri, collection="theirs")
    assert client.has_collection("theirs")


def test_a_collection_whose_creation_failed_is_not_left_behind(tiny_model, uri, monkeypatch):
    def fail(self, collection, **kwargs):
        raise pymilvus.MilvusException(message="the index could not be built")

    monkeypatch.setattr(pymilvus.MilvusClient, "load_collection", fail)
    with pytest.raises(pymilvus.MilvusException, match="the index could not be built"):
        MilvusMemoryStore(tiny_model, uri, collection="half_made")
    monkeypatch.undo()
    assert not pymilvus.MilvusClient(uri).has_collection("half_made")


def test_both_stores_calibrate_on_documents_spread_over_the_store(milvus, local, monkeypatch):
    # Milvus calibrated on a query's first rows, in storage order: one source's, indexed source by source
    monkeypatch.setattr("clara_plugins.base_store.CALIBRATION_SAMPLE", 3)
    monkeypatch.setattr("clara_plugins.milvus_store.CALIBRATION_IDS", 5)
    for store in (milvus, local):
        store.delete(store.all_ids())
        store.upsert(CORPUS[:5], ids=[f"d{i}" for i in (4, 3, 2, 1, 0)])  # d4 stored first
    # the local store's first, middle and last stored, Milvus' first, middle and last ids: one sample
    assert len(local._sample_pair_cosines()) == len(milvus._sample_pair_cosines()) == 3  # 3 documents' pairs, not 5's
    for cosine in local._sample_pair_cosines():  # the tiny model's keys lie close: ranked at their own pairs
        assert milvus.relevance(float(cosine)) == pytest.approx(local.relevance(float(cosine)))


def test_a_write_that_failed_midway_recalibrates_the_relevance(milvus, monkeypatch):
    milvus.relevance(0.5)  # the calibration is computed
    real = milvus._client.upsert
    calls = {"n": 0}

    def second_batch_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise pymilvus.MilvusException(message="connection lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(milvus_store, "BATCH_ROWS", 1)
    monkeypatch.setattr(milvus._client, "upsert", second_batch_fails)
    with pytest.raises(pymilvus.MilvusException):
        milvus.upsert(["first new", "second new"], ids=["n1", "n2"])
    assert milvus.get(["n1"]) and milvus._pair_cosines is None  # the first batch is in: the old pairs are stale


def test_bad_input_is_named_and_changes_nothing(milvus, tiny_model, uri, monkeypatch):
    for bad_upsert, message in [
        (lambda: milvus.upsert(["x", "y", "z"], ids="xyz"), "must be a list of ids"),
        (lambda: milvus.upsert([""]), "empty"),
        (lambda: milvus.upsert(["ok"], metadatas=[{"bad": object()}]), "not JSON-serialisable"),
        (lambda: milvus.upsert(["ok"], ids=["é" * 300]), "longer than 512 bytes"),
        (lambda: milvus.upsert(["long " * 14_000]), "longer than Milvus' 65,535 bytes"),
        (lambda: milvus.upsert(["ok"], metadatas=[{"notes": "名" * 22_000}]), "more than Milvus' 65,536 bytes"),
        (lambda: milvus.upsert(["ok"], memories=torch.zeros(1, 2, 3)), "do not match this model's"),
        # failed in pymilvus' encoder, after the batches before it were written
        (lambda: index_documents(milvus, ["new", "newer"], ["n1", "n2"], [{}, {"hash": {"sha": [2**200]}}],
                                 save_every=1), "beyond the 64 bits"),
        (lambda: milvus.delete("d1"), "must be a collection of ids"),
        (lambda: index_documents(milvus, ["new", "long " * 14_000], ["n1", "n2"], save_every=1),
         "longer than Milvus' 65,535 bytes"),  # refused before the first group is written
    ]:
        with pytest.raises(InvalidInputError, match=message):
            bad_upsert()
    for where, message in [({"topic": None}, "compares with None"), ({"tags": ["a", "b"]}, "strings, numbers"),
                           ({"n": {"$regex": "x"}}, "unknown operator"), ({"$or": []}, "non-empty list")]:
        with pytest.raises(ValueError, match=message):
            milvus.search("x", where=where)
        with pytest.raises(ValueError, match=message):
            milvus.ids_where(where)
    with pytest.raises(InvalidInputError, match="the search key has 3 values"):
        milvus.search_by_key(np.ones(3))
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        milvus.search("x", k=0)
    for collection in ("no-dashes", "clara\n", None):  # a trailing line break made a collection of its own
        with pytest.raises(InvalidInputError, match="collection must be letters"):
            MilvusMemoryStore(tiny_model, uri, collection=collection)
    monkeypatch.setattr(milvus_store, "MAX_DIMENSIONS", 64)
    with pytest.raises(StoreError, match="more than Milvus' 64"):
        MilvusMemoryStore(tiny_model, uri)
    assert sorted(milvus.all_ids()) == IDS
    milvus.upsert(["ok"], ids=["cjk"], metadatas=[{"notes": "名" * 21_000}])  # 63,000 bytes as the client sends it
    assert milvus.get(["cjk"])[0].metadata["notes"] == "名" * 21_000


def test_both_stores_refuse_what_a_milvus_server_cannot_read_by_name(milvus, local, uri):
    # a lone surrogate failed in Milvus' encoder (a bare codec error) and passed the local store;
    # an empty key, a key holding "][" and an integer past int64 failed on a server alone
    for store in (milvus, local):
        with pytest.raises(InvalidInputError, match="ids must be valid Unicode"):
            store.upsert(["ok"], ids=["i\ud800"])
        with pytest.raises(InvalidInputError, match="metadata of 'ok' is not JSON-serialisable"):
            store.upsert(["ok"], ids=["ok"], metadatas=[{"k": "\ud800"}])
        with pytest.raises(InvalidInputError, match="must be valid Unicode"):
            store.get(["\ud800"])
        with pytest.raises(InvalidInputError, match="the search key is all zeros"):
            type(store)(store.model, *([] if store is local else [str(Path(uri).with_name("empty.db"))])
                        ).search_by_key(np.zeros(store.keys.dimensions))  # an empty store's too
        assert sorted(store.all_ids()) == IDS
        # a bare AttributeError on Milvus, None on the local store; bad Unicode read as a bad filter
        for texts, message in [([None], r"texts\[0\] is a NoneType"), (["i\ud800"], "not valid Unicode")]:
            with pytest.raises(InvalidInputError, match=message):
                store.ids_for_texts(texts)
    for where, message in [({"": 1}, "cannot filter on the metadata key ''"),
                           ({"a][b": {}}, "cannot filter on the metadata key 'a]\\[b'"),
                           ({"n": 2**63}, "integers within int64 only"), ({"n": {"$gt": -2**63 - 1}}, "int64"),
                           ({"n": -2**63}, "int64"),  # a server's parser reads minus 2**63, past int64
                           # past float's range: a bare OverflowError, where the local store reads them
                           ({"n": 10**400}, "int64"), ({"n": {"$lt": 10**309}}, "int64"),
                           ({"n": {"$in": [10**400]}}, "int64"),
                           ({"topic": "\ud800"}, "no valid Unicode")]:
        with pytest.raises(InvalidInputError, match=message):
            milvus.ids_where(where)


def test_langchain_store_over_milvus(tiny_model, uri, tmp_path):
    from langchain_clara import CLARA_PROMPT, ChatClara, ClaraRetriever, ClaraVectorStore

    stores = [ClaraVectorStore(tiny_model, store=MilvusMemoryStore(tiny_model, uri)), ClaraVectorStore(tiny_model)]
    for store in stores:
        store.add_texts(CORPUS, METAS, ids=IDS)
        store.delete(["d0"])
    milvus, local = stores
    for search in (lambda s: s.similarity_search_with_score(QUERIES[0], k=3, filter={"topic": {"$ne": "tower"}}),
                   lambda s: s.similarity_search_with_relevance_scores(QUERIES[0], k=2),
                   lambda s: [(d, 0.0) for d in s.max_marginal_relevance_search(QUERIES[0], k=2, fetch_k=4)]):
        assert_same_results(search(milvus), search(local))
    assert [d.id for d in milvus.get_by_ids(["d0", "d2"])] == ["d2"]
    assert [d.id for d in ClaraRetriever(store=milvus, k=2).invoke(QUERIES[0])] == [
        d.id for d in local.similarity_search(QUERIES[0], k=2)]
    prompt = CLARA_PROMPT.invoke({"context": f"{CORPUS[1]}\n\n{CORPUS[2]}", "question": QUERIES[0]})
    answers = [ChatClara(store=store).invoke(prompt) for store in stores]  # both read d1 and d2 from memories
    assert answers[0].content == answers[1].content and answers[0].response_metadata["clara"]["stored_documents"] == 2
    with pytest.raises(NotImplementedError, match="no folder to save"):
        milvus.save_local(tmp_path / "saved")


def test_llama_index_store_over_milvus(tiny_model, uri, tmp_path):
    from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage
    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters, VectorStoreQuery

    from llama_index_clara import ClaraVectorStore

    store = ClaraVectorStore(tiny_model, store=MilvusMemoryStore(tiny_model, uri))
    documents = [Document(text=text, id_=f"doc{i}", metadata={"topic": meta["topic"]})
                 for i, (text, meta) in enumerate(zip(CORPUS, METAS))]
    index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=store.embed_model)
    city = MetadataFilters(filters=[MetadataFilter(key="topic", value="city")])
    result = store.query(VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=6, filters=city))
    assert sorted(node.get_content() for node in result.nodes) == sorted([CORPUS[0], CORPUS[2]])
    index.delete_ref_doc("doc0")
    assert len(store.client) == len(CORPUS) - 1
    index.storage_context.persist(persist_dir=tmp_path / "index")
    assert not (tmp_path / "index" / "default__vector_store.clara").exists()  # the nodes stay in Milvus
    reopened = ClaraVectorStore(tiny_model, store=MilvusMemoryStore(tiny_model, uri))
    reloaded = load_index_from_storage(StorageContext.from_defaults(persist_dir=tmp_path / "index",
                                                                    vector_store=reopened),
                                       embed_model=reopened.embed_model)
    retrieved = reloaded.as_retriever(similarity_top_k=3).retrieve(QUERIES[0])
    assert [n.node.get_content() for n in retrieved] == [
        n.node.get_content() for n in index.as_retriever(similarity_top_k=3).retrieve(QUERIES[0])]


def test_flattened_keys_keep_one_vector_per_document_and_the_key_kind_is_checked(tiny_config, uri, tmp_path):
    flat = ClaraModel(dataclasses.replace(tiny_config, retrieval_key="flat"), device="cpu")
    randomize_adapters(flat)  # the same compressor as tiny_model, with the paper's key
    local = MemoryStore(flat)
    local.upsert(CORPUS, IDS, METAS)
    store = MilvusMemoryStore(flat, uri)
    store.upsert(CORPUS, IDS, METAS)
    fields = [field["name"] for field in store._client.describe_collection(store.collection)["fields"]]
    assert "memory" not in fields  # the key is the memory
    assert torch.equal(store.memories(IDS), local.memories(IDS))
    for query in QUERIES:
        assert_same_results(store.search(query, k=4), local.search(query, k=4))
    mean = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(mean)
    with pytest.raises(StoreError, match="indexed with keys .*same retrieval_key"):
        MilvusMemoryStore(mean, uri)
    assert len(MilvusMemoryStore(flat, uri)) == len(CORPUS)  # refusing changed nothing
    mean_store = MilvusMemoryStore(mean, str(tmp_path / "mean.db"))
    mean_store.upsert(CORPUS, IDS, METAS)
    fields = {f["name"]: f for f in mean_store._client.describe_collection(mean_store.collection)["fields"]}
    assert fields["key"]["params"]["dim"] == mean.hidden_size and "memory" in fields


def test_a_collection_made_before_the_key_setting_opens_with_flattened_keys_only(tiny_config, uri):
    """Its header has no "keys": its keys are flattened memories."""
    flat = ClaraModel(dataclasses.replace(tiny_config, retrieval_key="flat"), device="cpu")
    randomize_adapters(flat)
    MilvusMemoryStore(flat, uri).upsert(CORPUS, IDS)
    client = pymilvus.MilvusClient(uri)
    header = json.loads(client.describe_collection("clara_memories")["properties"][milvus_store.HEADER_PROPERTY])
    assert header["keys"] == {"kind": "clara-memories"}  # what flattened keys always wrote
    del header["keys"]
    client.alter_collection_properties("clara_memories", {milvus_store.HEADER_PROPERTY: json.dumps(header)})
    assert len(MilvusMemoryStore(flat, uri)) == len(CORPUS)
    mean = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(mean)
    with pytest.raises(StoreError, match="same retrieval_key"):
        MilvusMemoryStore(mean, uri)


def test_searches_name_the_key_field(milvus, monkeypatch):
    """A mean-key collection has two vector fields, and a Milvus server refuses a search that
    does not say which one it is for."""
    calls = []
    search = milvus._client.search
    monkeypatch.setattr(milvus._client, "search", lambda *args, **kwargs: calls.append(kwargs) or search(*args, **kwargs))
    milvus.search("Paris", k=2)
    milvus.search("Paris", k=2, lambda_mult=0.5)
    assert [call["anns_field"] for call in calls] == ["key", "key"]


def test_a_collection_whose_creation_was_killed_before_its_indexes_opens_and_stores(tiny_model, local, uri,
                                                                                     monkeypatch):
    """A kill runs no cleanup: the collection stays, with its header and without its indexes."""
    def killed(self, collection, index_params, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pymilvus.MilvusClient, "create_index", killed)
    with pytest.raises(KeyboardInterrupt):
        MilvusMemoryStore(tiny_model, uri)
    monkeypatch.undo()
    assert pymilvus.MilvusClient(uri).list_indexes("clara_memories") == []
    store = MilvusMemoryStore(tiny_model, uri)
    store.upsert(CORPUS, IDS, METAS)
    assert_same_results(store.search(QUERIES[0], k=3), local.search(QUERIES[0], k=3))
    store.close()


def test_two_clients_creating_one_collection_at_once_both_open_it(tiny_model, milvus, uri):
    # the loser of the creation dropped the winner's collection (found empty): both failed
    import threading

    opened, barrier = {}, threading.Barrier(2)

    def open_store(number: int) -> None:
        barrier.wait()
        try:
            opened[number] = MilvusMemoryStore(tiny_model, uri, collection="raced")
        except Exception as error:  # reported below
            opened[number] = error

    threads = [threading.Thread(target=open_store, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert all(isinstance(store, MilvusMemoryStore) for store in opened.values()) and len(opened) == 2, opened
        opened[0].upsert(CORPUS[:1], IDS[:1])
        assert opened[1].all_ids() == IDS[:1]
    finally:
        for store in opened.values():
            if isinstance(store, MilvusMemoryStore):
                store.close()


def test_a_creation_refused_before_another_clients_collection_is_listed_opens_it(tiny_model, milvus, uri,
                                                                                  monkeypatch):
    # milvus-lite refuses the second creation ("File exists") before it lists the first one's
    # collection: the loser of the race failed (1 in about 10 runs of the test above, on 2 busy cores)
    import threading

    create = pymilvus.MilvusClient.create_collection
    late = []

    def created_elsewhere(self, collection, **kwargs):
        late.append(threading.Timer(0.3, create, (milvus._client, collection), kwargs))
        late[0].start()
        raise pymilvus.MilvusException(message="[Errno 17] File exists")

    monkeypatch.setattr(pymilvus.MilvusClient, "create_collection", created_elsewhere)
    store = MilvusMemoryStore(tiny_model, uri, collection="raced")
    late[0].join()
    store.upsert(CORPUS[:1], IDS[:1])
    assert store.all_ids() == IDS[:1]
    store.close()

    def refused(self, collection, **kwargs):  # any other refusal is said at once, not after a wait
        raise pymilvus.MilvusException(message="the schema is refused")

    monkeypatch.setattr(pymilvus.MilvusClient, "create_collection", refused)
    monkeypatch.setattr("clara_plugins.milvus_store.time.sleep", lambda seconds: pytest.fail("waited"))
    with pytest.raises(pymilvus.MilvusException, match="the schema is refused"):
        MilvusMemoryStore(tiny_model, uri, collection="refused")


def test_a_delete_by_filter_or_of_everything_is_one_delete_on_the_server(milvus, monkeypatch):
    # the ids were listed, then deleted in batches: another client's replacement in between was lost
    monkeypatch.setattr(milvus, "_ids_matching", lambda expression: pytest.fail("ids were listed first"))
    milvus.delete_where({"topic": "city"})
    monkeypatch.undo()
    assert sorted(milvus.all_ids()) == sorted(i for i, m in zip(IDS, METAS) if m.get("topic") != "city")
    kept = sorted(milvus.all_ids())
    topic = METAS[IDS.index(kept[0])]["topic"]  # the first one's, not the second's
    assert METAS[IDS.index(kept[1])].get("topic") != topic
    milvus.delete_where({"topic": topic}, ids=kept[:2])  # among ids: one delete on the server a batch
    assert sorted(milvus.all_ids()) == kept[1:]
    milvus.delete_where(None, ids=kept[-1:])
    assert kept[-1] not in milvus.all_ids()
    listed = milvus._ids_matching  # read among ids: asked of the server for those ids, not for every match
    monkeypatch.setattr(milvus, "_ids_matching", lambda expression: listed(expression) if expression.startswith(
        "(id in [") else pytest.fail(f"every match was listed: {expression}"))
    among = [kept[1], "no-such-id", kept[2]]
    assert [d.id for d in milvus.get_where({"topic": METAS[IDS.index(kept[2])]["topic"]}, ids=among)] == [kept[2]]
    assert milvus.ids_where({"topic": METAS[IDS.index(kept[1])]["topic"]}, among) == [kept[1]]
    monkeypatch.undo()
    milvus.delete_where()
    assert milvus.all_ids() == [] and len(milvus) == 0
