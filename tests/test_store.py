"""MemoryStore: upsert/delete/get, filters, search, persistence, crashes and concurrency."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from clara_plugins import ClaraConfig, ClaraModel, InvalidInputError, MemoryStore, StoreError
from clara_plugins import store_folder
from clara_plugins.indexing import index_documents
from clara_plugins.keys import ClaraKeys
from conftest import CORPUS, randomize_adapters, with_one_records_file

METAS = [{"topic": "city", "n": 1}, {"topic": "tower", "n": 2}, {"topic": "city", "n": 3},
         {"topic": "river", "n": 4}, {"topic": "science", "n": 5}]


@pytest.fixture
def store(tiny_model) -> MemoryStore:
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:5], ids=[f"d{i}" for i in range(5)], metadatas=METAS)
    return store


def test_upsert_keeps_one_copy_per_id_and_replaces_content(store):
    store.upsert(["Rome is the capital of Italy."], ids=["d1"], metadatas=[{"topic": "city"}])
    assert len(store) == 5
    assert store.get(["d1"])[0].text == "Rome is the capital of Italy."
    assert torch.allclose(store.memories(["d1"]),
                          store.model.compress_documents(["Rome is the capital of Italy."]), atol=1e-2)


def test_stored_metadata_is_a_copy_of_what_was_given_and_of_what_comes_back(store, tmp_path):
    """A nested value changed by the caller used to change the stored metadata in RAM, while a
    save that links an unchanged record shard keeps the old value on disk."""
    given = {"tags": ["a"]}
    store.upsert(["Lisbon lies on the Tagus."], ids=["m"], metadatas=[given])
    given["tags"].append("b")
    store.get(["m"])[0].metadata["tags"].append("c")
    assert store.get(["m"])[0].metadata == {"tags": ["a"]}


def test_a_document_cut_to_doc_max_length_is_reported_when_stored(store):
    with pytest.warns(UserWarning, match="1 of 1 documents exceed doc_max_length=64"):
        store.upsert([" ".join(CORPUS * 3)], ids=["long"])
    assert store.get(["long"])[0].text == " ".join(CORPUS * 3)  # the text is kept whole


def test_an_upsert_compresses_in_parts_and_warns_once_of_every_cut_text(store, tiny_model, monkeypatch):
    # a whole corpus compressed in one call held the model's float32 memories and two copies
    import re
    import warnings

    monkeypatch.setattr("clara_plugins.model.COMPRESS_PART", 2)
    calls = []
    compress = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress", lambda texts, *a, **k: calls.append(len(texts)) or compress(texts, *a, **k))
    texts = CORPUS[:3] + [" ".join(CORPUS * 3)] + CORPUS[3:4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.upsert(texts, ids=[f"d{i}" for i in range(5)])
    assert calls == [2, 2, 1]
    cut = [str(w.message) for w in caught if "doc_max_length" in str(w.message)]
    assert len(cut) == 1 and re.fullmatch(r"1 of 5 documents exceed doc_max_length=64 tokens; \d+ tokens were cut "
                                          r"\(documents \[3\]\)", cut[0])  # numbered in the whole call
    expected = compress(texts, warn=False).memories.to(torch.float16)
    assert torch.allclose(store.memories([f"d{i}" for i in range(5)]).float(), expected.float(), atol=1e-2)


def test_keys_compress_as_an_upsert_and_refuse_what_is_no_list_of_texts(store, tiny_model, monkeypatch):
    # framework embeddings compressed a whole call's float32 memories at once, apart from a store's parts
    monkeypatch.setattr("clara_plugins.model.COMPRESS_PART", 2)
    calls = []
    compress = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress", lambda texts, *a, **k: calls.append(len(texts)) or compress(texts, *a, **k))
    texts = CORPUS[:3] + ["  "] + CORPUS[3:4]
    keys, memories = ClaraKeys(tiny_model).keys_and_memories(texts)
    assert calls == [2, 2] and keys.shape[0] == 5 and keys[3].tolist() == ClaraKeys(tiny_model).blank_key.tolist()
    store.upsert(texts[:3] + texts[4:], ids=["n0", "n1", "n2", "n3"])
    assert torch.equal(store.memories(["n0", "n1", "n2", "n3"]).to(torch.float16), memories)
    with pytest.raises(InvalidInputError, match="texts must be a list of strings, got str"):  # its letters
        ClaraKeys(tiny_model).document_keys("hello")
    with pytest.raises(InvalidInputError, match=r"texts\[1\] is a NoneType, not a string"):
        ClaraKeys(tiny_model).document_keys(["a", None])
    assert ClaraKeys(tiny_model).document_keys([]).shape == (0, tiny_model.hidden_size)


def test_delete_ignores_missing_ids_and_get_skips_them(store):
    store.delete(["d0", "nope"])
    store.delete(["nope"])
    assert [d.id for d in store.get(["d0", "d1", "nope", "d2"])] == ["d1", "d2"]
    assert all(doc.id != "d0" for doc, _ in store.search("Paris", k=5))


def test_memories_are_fp16_copies_of_the_compression(store, tiny_model):
    expected = tiny_model.compress_documents(CORPUS[2:4])
    assert torch.allclose(store.memories(["d2", "d3"]), expected, atol=1e-2)
    with pytest.raises(InvalidInputError, match="unknown document ids: \\['zz'\\]"):
        store.memories(["d2", "zz"])


def test_memories_of_another_shape_are_refused_by_an_empty_store_too(tiny_model):
    # only a store holding documents compared shapes: an empty one kept another rate's memories
    store = MemoryStore(tiny_model)
    n_mem, hidden = tiny_model.config.n_mem_tokens, tiny_model.hidden_size
    with pytest.raises(InvalidInputError, match="do not match this model's"):
        store.upsert(["A passage."], ids=["a"], memories=torch.zeros(1, n_mem // 2, hidden))
    assert len(store) == 0


def test_a_text_reader_is_refused_a_store_in_either_framework_as_the_cli_refuses_it(tiny_model, tmp_path):
    # the CLI refused a checkpoint of clara train --stage text; a store built in Python took it, and
    # its memories (an untrained compressor's) passed for CLaRa's
    from langchain_clara import ClaraVectorStore
    from llama_index_clara import ClaraVectorStore as LlamaIndexStore

    MemoryStore(tiny_model).save(tmp_path / "store")
    tiny_model.config.decoder_reads_text = True
    for make in (lambda: MemoryStore(tiny_model), lambda: ClaraVectorStore(tiny_model),
                 lambda: LlamaIndexStore(tiny_model), lambda: MemoryStore.load(tmp_path / "store", tiny_model)):
        with pytest.raises(InvalidInputError, match=r"is a text reader \(clara train --stage text\): its generator "
                                                    "reads text"):
            make()


@pytest.mark.parametrize("write", ["delete", "replace"])
def test_a_ctrl_c_during_a_write_comes_once_the_store_is_whole(tiny_model, tmp_path, monkeypatch, write):
    # a KeyboardInterrupt between two of its lists left ids naming other rows' texts, and a save
    # of that store that did not load
    import signal

    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:4], ids=["a", "b", "c", "d"])
    count_dead = store._count_dead

    def interrupted(row):  # Ctrl-C, as the first row is counted dead: the rest of the write is still to come
        os.kill(os.getpid(), signal.SIGINT)
        count_dead(row)

    monkeypatch.setattr(store, "_count_dead", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if write == "delete":
            store.delete(["b"])
        else:
            store.upsert([CORPUS[5]], ids=["b"])
    monkeypatch.undo()
    expected = {"a": CORPUS[0], "c": CORPUS[2], "d": CORPUS[3], **({} if write == "delete" else {"b": CORPUS[5]})}
    assert {d.id: d.text for d in store.get(list(expected))} == expected and len(store) == len(expected)
    store.save(tmp_path / "store")
    reloaded = MemoryStore.load(tmp_path / "store", tiny_model)
    assert {d.id: d.text for d in reloaded.get(list(expected))} == expected
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_memories_upserted_from_a_buffer_the_caller_refills_stay_as_they_were(tiny_model):
    # the store kept a view of the caller's fp16 tensor: refilling it for the next group rewrote stored rows
    store = MemoryStore(tiny_model)
    buffer = tiny_model.compress_documents(CORPUS[:2]).half()
    first = buffer.clone()
    store.upsert(CORPUS[:2], ids=["a", "b"], memories=buffer)
    buffer.copy_(tiny_model.compress_documents(CORPUS[2:4]).half())
    store.upsert(CORPUS[2:4], ids=["c", "d"], memories=buffer)
    assert torch.equal(store.memories(["a", "b"]).half(), first)


@pytest.mark.parametrize("index", ["flat", "hnsw"])  # the compact index: test_store_compact.py
def test_a_numpy_integer_k_searches_as_a_python_int(tiny_model, index):
    # k from numpy passed the check and failed in faiss' search with a TypeError
    store = MemoryStore(tiny_model, index=index)
    store.upsert(CORPUS[:5], ids=[f"d{i}" for i in range(5)])
    assert len(store.search("Who won Nobel prizes?", k=np.int64(2))) == 2
    assert len(store.search("Who won Nobel prizes?", k=np.int64(2), lambda_mult=np.float32(0.5), fetch_k=np.int32(3))) == 2


def test_search_ranks_by_cosine_of_query_reasoner_and_memories(store, tiny_model):
    from clara_plugins.retrieval import cosine_scores

    query = "Who won prizes in physics?"
    expected = cosine_scores(tiny_model.encode_queries([query]), tiny_model.compress_documents(CORPUS[:5]),
                             tiny_model.config.retrieval_key)[0]
    results = store.search(query, k=3)
    assert [d.id for d, _ in results] == [f"d{i}" for i in expected.topk(3).indices.tolist()]
    assert np.allclose([s for _, s in results], expected.topk(3).values.numpy(), atol=1e-2)


@pytest.mark.parametrize("where,expected", [
    ({"topic": "city"}, {"d0", "d2"}),
    ({"topic": {"$in": ["river", "tower"]}}, {"d1", "d3"}),
    ({"$and": [{"topic": "city"}, {"n": {"$ne": 1}}]}, {"d2"}),
    ({"$or": [{"n": 5}, {"topic": "tower"}]}, {"d1", "d4"}),
    ({"topic": "none"}, set()),
])
def test_metadata_filters(store, where, expected):
    assert {d.id for d, _ in store.search("capital", k=5, where=where)} == expected
    assert set(store.ids_where(where)) == expected


def test_indexing_without_ids_is_refused(tiny_model):
    # fresh random ids each run: a resumed run stored every document again, under new ids
    with pytest.raises(InvalidInputError, match="needs the documents' ids"):
        index_documents(MemoryStore(tiny_model), CORPUS[:2], None)


def test_indexing_shows_the_batches_of_a_group_as_they_are_compressed(tiny_model, monkeypatch):
    # the bar moved once a group of save_every documents was done: 0/1000 for the README's corpus
    shown = []
    compress = tiny_model.compress
    monkeypatch.setattr(tiny_model, "compress", lambda texts, batch_size, show_progress=False, warn=True, progress=None:
                        shown.append(not progress.disable) or compress(texts, batch_size, warn=warn, progress=progress))
    index_documents(MemoryStore(tiny_model), CORPUS[:3], ["a", "b", "c"])  # long work: a bar unless asked for none
    index_documents(MemoryStore(tiny_model), CORPUS[:3], ["a", "b", "c"], show_progress=False)
    assert shown == [True, False]


def test_indexing_warns_once_of_the_documents_every_group_cut(tiny_model):
    # a warning a group, numbered within it: a corpus indexed 1,024 documents at a time warned
    # up to a thousand times over the progress bars
    long = " ".join(CORPUS * 3)
    texts = [f"{long} {i}" if i % 2 else CORPUS[i] for i in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index_documents(MemoryStore(tiny_model), texts, [f"d{i}" for i in range(6)], save_every=2)
    cut = [w for w in caught if "doc_max_length" in str(w.message)]
    assert [str(w.message).split(";")[0] for w in cut] == ["3 of 6 documents exceed doc_max_length=64 tokens"]
    assert cut[0].filename == __file__

    def stopped():  # and a stopped run's (its resume skips what it stored)
        raise KeyboardInterrupt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            index_documents(MemoryStore(tiny_model), texts, [f"d{i}" for i in range(6)], save_every=2, save=stopped)
    assert [str(w.message).split(";")[0] for w in caught] == ["1 of 2 documents exceed doc_max_length=64 tokens"]


def test_indexing_a_pandas_like_column_names_what_it_needs(tiny_model):
    # `not texts` of a pandas Series raised "The truth value of a Series is ambiguous"
    pandas = pytest.importorskip("pandas")
    with pytest.raises(InvalidInputError, match="texts must be a list of strings, got Series"):
        index_documents(MemoryStore(tiny_model), pandas.Series(CORPUS[:2]), ["a", "b"])
    assert index_documents(MemoryStore(tiny_model), [], []) == []  # nothing new: nothing to do


def test_texts_compressed_in_parts_show_one_bar_kept_unless_nested(tiny_model, monkeypatch, capsys):
    # a bar a part (an IngestionPipeline of 2,500 chunks printed three, each from zero), and under
    # `clara index`'s bar each group's bar stayed, a line for each 1,024 documents
    from clara_plugins import model

    bars, tqdm = [], model.tqdm
    monkeypatch.setattr(model, "tqdm", lambda *a, **k: bars.append(k) or tqdm(*a, **k))
    monkeypatch.setattr(model, "COMPRESS_PART", 2)
    model.compress_in_parts(tiny_model, CORPUS[:5], 2, show_progress=True)
    assert [(bar["total"], bar["leave"], bar["disable"]) for bar in bars] == [(5, None, False)]
    assert "5/5" in capsys.readouterr().err  # a lone bar stays when done


def test_a_set_of_targets_matches_list_values_without_hashing_them(tiny_model):
    # `value in {...}` hashed a list value: one document with a list field failed every such search
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["one", "tags"], metadatas=[{"n": 1}, {"n": ["a"]}])
    assert store.ids_where({"n": {"$in": {1, "a"}}}) == ["one"]
    assert store.ids_where({"n": {"$nin": {1}}}) == ["tags"]


def test_a_numpy_number_matches_a_list_value_as_the_python_number_does(tiny_model):
    # numpy compared a stored list element by element: a bare "truth value of an array is
    # ambiguous" for [1, 2], and [1] equal to 1
    import numpy as np

    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:3], ids=["one", "pair", "single"], metadatas=[{"n": 1}, {"n": [1, 2]}, {"n": [1]}])
    for target in (1, np.int64(1), np.float32(1.0)):
        assert store.ids_where({"n": target}) == store.ids_where({"n": {"$eq": target}}) == ["one"]
        assert store.ids_where({"n": {"$in": [target]}}) == ["one"]
        assert store.ids_where({"n": {"$ne": target}}) == store.ids_where({"n": {"$nin": [target]}}) == ["pair", "single"]
    # a float32's exact value, as Milvus reads it, in equality and in ranges alike (they disagreed)
    store.upsert(CORPUS[3:4], ids=["tenth"], metadatas=[{"n": 0.1}])
    tenth = np.float32(0.1)
    assert store.ids_where({"n": tenth}) == store.ids_where({"n": {"$gte": tenth, "$lte": tenth}}) == []
    assert store.ids_where({"n": {"$lt": tenth}}) == ["tenth"]
    # inside a list or a dict too (numpy compared a nested float32 in float32, and matched 0.1)
    store.upsert(CORPUS[4:5], ids=["tenths"], metadatas=[{"n": [0.1], "d": {"x": 0.1}}])
    assert store.ids_where({"n": [tenth]}) == store.ids_where({"d": {"$eq": {"x": tenth}}}) == []
    assert store.ids_where({"n": [np.float32(0.5)]}) == []
    store.upsert(CORPUS[5:6], ids=["half"], metadatas=[{"n": [0.5]}])
    assert store.ids_where({"n": [np.float32(0.5)]}) == ["half"]  # exact in float32: still matched


def test_membership_filters_read_their_targets_once_and_match_as_equality_does(tiny_model, monkeypatch):
    # every stored document was compared with every listed value, each read again as a Python value:
    # a $in of 1,000 values took minutes over a million documents
    from clara_plugins import filters

    values = [1, True, 1.0, 0, "1", [1], [1.0, 2], {"a": 1}, None, 2.5, "x"]
    store = MemoryStore(tiny_model)
    store.upsert([f"{CORPUS[0]} {n}" for n in range(len(values))], ids=[f"v{n}" for n in range(len(values))],
                 metadatas=[{"f": value} for value in values])
    read, plain = [], filters._plain
    monkeypatch.setattr(filters, "_plain", lambda target: read.append(target) or plain(target))
    for targets in ([1], [True, "x"], [[1], {"a": 1}], [None, 2.5, np.float64(1.0)], ["missing"], [[1.0, 2], 0]):
        expected = [f"v{n}" for n, value in enumerate(values) if any(value == plain(t) for t in targets)]
        read.clear()
        filters._plain(targets)
        once = len(read)  # the list and what it holds
        assert store.ids_where({"f": {"$in": targets}}) == expected
        assert len(read) == 2 * once  # read once more, not once a document
        assert store.ids_where({"f": {"$nin": targets}}) == [f"v{n}" for n in range(len(values)) if f"v{n}" not in expected]


def test_a_filter_on_a_huge_integer_is_read_as_the_integer(tiny_model):
    # math.isnan of 10**400 raised a bare OverflowError, for a value the store keeps
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["huge", "small"], metadatas=[{"n": 10**400}, {"n": 1}])
    assert store.ids_where({"n": 10**400}) == store.ids_where({"n": {"$in": [10**400]}}) == ["huge"]
    assert store.ids_where({"n": {"$lt": 10**309}}) == ["small"]


def test_malformed_filters_are_named(store):
    with pytest.raises(ValueError, match="unknown operator '\\$regex'"):
        store.search("x", where={"n": {"$regex": 1}})
    with pytest.raises(ValueError, match="\\$or takes a non-empty list"):
        store.search("x", where={"$or": {}})
    with pytest.raises(ValueError, match="field names are strings"):  # was an AttributeError
        store.search("x", where={1: "a"})
    # values no stored (JSON) one equals matched nothing, and with $ne or $nin everything
    import numpy as np

    for where in ({"n": float("nan")}, {"tags": ("a", "b")}, {"n": {"$ne": float("nan")}},
                  {"n": {"$nin": [float("nan")]}}, {"tags": {"$ne": ("a", "b")}}, {"n": {"$in": [{1: "a"}]}}):
        with pytest.raises(ValueError, match="which no stored metadata value equals"):
            store.ids_where(where)
    assert store.ids_where({"n": {"$in": (np.int64(1), None, [1, 2], {"k": "v"})}}) == ["d0"]  # numpy, JSON alike


def test_ids_that_are_not_strings_are_refused_as_the_milvus_store_refuses_them(store):
    # the local store ignored them as unknown ids; Milvus failed with an AttributeError
    for call in (lambda: store.delete([1]), lambda: store.get([1]), lambda: store.search("x", ids=[1])):
        with pytest.raises(InvalidInputError, match="ids are strings, got int 1"):
            call()
    assert len(store) == 5


def test_a_string_where_a_list_of_ids_belongs_is_refused(store):
    store.upsert(["a text", "b text", "c text", "abc text"], ids=["a", "b", "c", "abc"])
    before = sorted(store.all_ids())
    for call in (lambda: store.delete("abc"), lambda: store.get("abc"), lambda: store.memories("abc"),
                 lambda: store.upsert(["x", "y", "z"], ids="xyz"), lambda: store.search("text", ids="abc"),
                 # nor a dict, whose keys were taken for ids
                 lambda: store.delete({"abc": 1}), lambda: store.search("text", ids={"a": 1})):
        with pytest.raises(InvalidInputError, match="must be a (list|collection) of ids"):
            call()
    assert sorted(store.all_ids()) == before
    with pytest.raises(InvalidInputError, match="must be a list of ids"):  # a set has no order to match the texts
        store.upsert(["x", "y"], ids={"x", "y"})


def test_a_set_of_ids_filters_a_search_and_deletes(store):
    assert {doc.id for doc, _ in store.search("Paris", k=5, ids={"d1", "d3"})} == {"d1", "d3"}
    store.delete({"d1", "d3"})
    assert store.all_ids() == ["d0", "d2", "d4"]


def test_bad_input_changes_nothing(store):
    before = store.all_ids()
    documents, memories = store.get(before), store.memories(before)
    for texts, kwargs, problem in [
            # a stored document's replacement, refused for its neighbour: neither changes
            (["new", 5], {"ids": ["d0", "d1"]}, "texts.1. is a int"),
            (["new", "new"], {"ids": ["d0", "d1"], "metadatas": [{}, {"bad": object()}]}, "is not JSON-serialisable"),
            ([""], {}, "texts.0. is empty"), (["ok", 5], {}, "texts.1. is a int"),
            (["ok"], {"ids": [""]}, "ids must be non-empty strings"),
            (["ok"], {"metadatas": [{"bad": object()}]}, "is not JSON-serialisable"),
            (["a", "b"], {"ids": ["x"]}, "got 2 texts, 1 ids"),
            (["a", "b"], {"metadatas": {"a": 1, "b": 2}}, "metadatas must be a list of dicts, one per text, got a dict"),
            (["ok"], {"metadatas": ["topic"]}, "got an item 'topic'")]:
        with pytest.raises(InvalidInputError, match=problem):
            store.upsert(texts, **kwargs)
    assert store.all_ids() == before and store.get(before) == documents
    assert torch.equal(store.memories(before), memories)


def test_save_and_load_round_trip(store, tiny_model, tmp_path):
    store.save(tmp_path / "s")
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert loaded.all_ids() == store.all_ids()
    assert loaded.get(["d3"]) == store.get(["d3"])
    assert torch.equal(loaded.memories(["d0", "d4"]), store.memories(["d0", "d4"]))
    assert [d.id for d, _ in loaded.search("Paris", k=3)] == [d.id for d, _ in store.search("Paris", k=3)]
    loaded.upsert(["New text about Vienna."], ids=["d9"])
    loaded.save(tmp_path / "s")
    assert len(MemoryStore.load(tmp_path / "s", tiny_model)) == 6
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", "CURRENT", "gen-000001", "gen-000002"]


def test_a_save_keeps_an_older_generation_holding_files_it_did_not_write(store, tmp_path):
    # it removed every generation but the current one, whatever it held
    for _ in range(2):
        store.save(tmp_path / "s")
    (tmp_path / "s" / "gen-000001" / "notes.md").write_text("keep me")
    store.upsert(["New text about Vienna."], ids=["d9"])
    store.save(tmp_path / "s")
    assert (tmp_path / "s" / "gen-000001" / "notes.md").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", "CURRENT", "gen-000001", "gen-000002",
                                                                   "gen-000003"]
    store.save(tmp_path / "s")  # a generation of store files alone goes, once readers have moved on
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", "CURRENT", "gen-000001", "gen-000003",
                                                                   "gen-000004"]


@pytest.mark.parametrize("entries,message", [
    ({"notes.txt": "keep me"}, r"holds files but no CLaRa memory store \(notes.txt\): choose an empty or new folder"),
    ({"CURRENT": "MANIFEST-000004\n", "MANIFEST-000004": "a database's"},  # e.g. a LevelDB folder
     r"CURRENT names 'MANIFEST-000004', not a generation folder"),
    # a partial copy, and a user's copy of a generation: the save removed the generations they held
    ({"CURRENT": "gen-000007\n", "gen-000003/records-00000.json": "[]"},
     r"CURRENT names gen-000007, which is missing: the store is damaged"),
    ({"gen-000001/notes.txt": "keep me"}, r"holds files but no CLaRa memory store \(gen-000001\)"),
])
def test_a_save_refuses_a_folder_of_other_files_and_leaves_them(store, tmp_path, entries, message):
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name, text in entries.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(StoreError, match=message):
        store.save(folder)
    assert {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()} == entries


def test_a_store_of_format_2_with_one_records_file_loads(store, tiny_model, tmp_path, monkeypatch):
    """Stores saved before the records were sharded keep loading, and save in shards after
    (full shards too, which a save of a format-3 generation would link)."""
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    folder = store.save(tmp_path / "s")
    header = with_one_records_file(folder, json.loads((folder / "store.json").read_text()))
    (folder / "store.json").write_text(json.dumps({**header, "format": "clara-memory-store/2"}))
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert loaded.all_ids() == store.all_ids() and loaded.get(["d3"]) == store.get(["d3"])
    loaded.upsert(["Vienna lies on the Danube."], ids=["d9"])
    again = loaded.save(tmp_path / "s")
    assert (again / "records-00000.json").is_file() and not (again / "records.json").exists()
    reloaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert reloaded.all_ids() == store.all_ids() + ["d9"] and reloaded.get(["d3"]) == store.get(["d3"])
    del header["sha256"]["records.json"]  # format 2 without its records file is refused, whatever else is there
    (folder / "store.json").write_text(json.dumps({**header, "format": "clara-memory-store/2"}))
    (tmp_path / "s" / "CURRENT").write_text(folder.name + "\n")
    with pytest.raises(StoreError, match="no checksum for records.json"):
        MemoryStore.load(tmp_path / "s", tiny_model)


@pytest.mark.parametrize("memory_dtype", ["float16", "int8"])
def test_a_save_links_the_shards_whose_rows_did_not_change(tiny_model, tmp_path, monkeypatch, memory_dtype):
    """Indexing a corpus in groups saves after each: the full shards saved before are linked
    from the previous generation, not written again (which made indexing quadratic)."""
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    store = MemoryStore(tiny_model, memory_dtype=memory_dtype)
    store.upsert(CORPUS[:5], ids=[f"d{i}" for i in range(5)])
    first = store.save(tmp_path / "s")

    def same_file(name: str, old: Path, new: Path) -> bool:
        return (old / name).stat().st_ino == (new / name).stat().st_ino

    store.upsert([CORPUS[5], "Vienna lies on the Danube."], ids=["d5", "d6"])  # appended: shards 0 and 1 (rows 0-3) are unchanged
    second = store.save(tmp_path / "s")
    files = ["memories-{}.npy", "records-{}.json"] + (["scales-{}.npy"] if memory_dtype == "int8" else [])
    for file in files:
        assert same_file(file.format("00000"), first, second) and same_file(file.format("00001"), first, second)
        assert not same_file(file.format("00002"), first, second)  # row 4 was alone in it, now rows 4-5
    store.upsert(["Rome is the capital of Italy."], ids=["d1"])  # replaces row 1: shard 0 changes
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    third = store.save(tmp_path / "s")
    for file in files:
        assert not same_file(file.format("00000"), second, third) and same_file(file.format("00001"), second, third)
    assert store.get(["d1"])[0].text == "Rome is the capital of Italy."
    store.delete(["d0"])  # every row moves up one
    fourth = store.save(tmp_path / "s")
    assert not same_file("memories-00001.npy", third, fourth) and not same_file("records-00001.json", third, fourth)
    reloaded = MemoryStore.load(tmp_path / "s", tiny_model)
    ids = [f"d{i}" for i in range(1, 7)]
    assert reloaded.all_ids() == ids and torch.equal(reloaded.memories(ids), store.memories(ids))
    loaded.upsert(["Madrid is the capital of Spain."], ids=["d9"])  # a store loaded from an older generation
    with pytest.raises(StoreError, match="saved by another writer"):
        loaded.save(tmp_path / "s")  # it would undo the saves since
    loaded.save(tmp_path / "t")  # its generation is gone from s: nothing is linked from it
    assert MemoryStore.load(tmp_path / "t", tiny_model).all_ids() == [f"d{i}" for i in range(7)] + ["d9"]


def test_a_save_interrupted_while_removing_old_generations_does_not_refuse_the_next(tiny_model, tmp_path,
                                                                                    monkeypatch):
    # old generations were removed after CURRENT named the new one: a save interrupted there had
    # saved, but the store never recorded it and refused its own next save as another writer's
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["d0", "d1"])
    store.save(tmp_path / "s")
    store.upsert([CORPUS[2]], ids=["d2"])
    store.save(tmp_path / "s")  # gen-000001 stays for its readers until the next save

    def interrupted(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_folder.shutil, "rmtree", interrupted)
    store.upsert([CORPUS[3]], ids=["d3"])
    with pytest.raises(KeyboardInterrupt):
        store.save(tmp_path / "s")
    monkeypatch.undo()
    store.save(tmp_path / "s")
    assert MemoryStore.load(tmp_path / "s", tiny_model).all_ids() == ["d0", "d1", "d2", "d3"]


def test_a_generation_another_store_wrote_under_the_same_name_is_not_saved_over(tiny_model, tmp_path, monkeypatch):
    # the folder wiped and another store saved there: the first store's next save passed the
    # check by the name alone (gen-000001 again) and dropped the other's documents
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    mine, other = MemoryStore(tiny_model), MemoryStore(tiny_model)
    mine.upsert(CORPUS[:4], ids=[f"d{i}" for i in range(4)])
    mine.save(tmp_path / "s")
    shutil.rmtree(tmp_path / "s")
    other.upsert(CORPUS[2:6], ids=[f"o{i}" for i in range(4)])
    other.save(tmp_path / "s")  # gen-000001 again
    mine.upsert([CORPUS[5]], ids=["d4"])
    with pytest.raises(StoreError, match="saved by another writer"):
        mine.save(tmp_path / "s")
    assert MemoryStore.load(tmp_path / "s", tiny_model).all_ids() == [f"o{i}" for i in range(4)]
    shutil.rmtree(tmp_path / "s")
    mine.save(tmp_path / "s")  # the folder gone: nothing to save over, and nothing linked from the other's
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert loaded.all_ids() == [f"d{i}" for i in range(5)] and loaded.get(["d0"])[0].text == CORPUS[0]


@pytest.mark.parametrize("returned, problem", [(lambda keys: keys[:-1], "shape"),
                                               (lambda keys: keys * np.nan, "not finite")], ids=["fewer", "nan"])
def test_keys_of_another_encoder_are_checked_before_the_store_changes(tiny_model, tmp_path, returned, problem):
    # two keys for three texts: the third document joined no index, and every later save failed
    class Faulty(_WordKeys):
        def document_keys(self, texts):
            return returned(super().document_keys(texts))

    store = MemoryStore(tiny_model, keys=Faulty(), index="hnsw")
    store.keys.document_keys = _WordKeys().document_keys  # a first upsert that is right
    store.upsert(CORPUS[:2], ids=["a", "b"])
    store.search("Paris", k=1)  # the index built
    del store.keys.document_keys
    with pytest.raises(StoreError, match=f"key encoder returned .*{problem}"):
        store.upsert(CORPUS[2:5], ids=["c", "d", "e"])
    assert store.all_ids() == ["a", "b"]
    store.save(tmp_path / "s")
    assert MemoryStore.load(tmp_path / "s", tiny_model, keys=_WordKeys()).all_ids() == ["a", "b"]


class _WordKeys:
    """A key encoder of its own (not the memories): which of a few words a text holds."""

    keys_are_memories = False
    words = ["paris", "tower", "river", "capital", "science", "rome"]

    def signature(self) -> dict:
        return {"words": self.words}

    def document_keys(self, texts: list[str]) -> np.ndarray:
        return np.array([[float(w in t.lower()) for w in self.words] + [1.0] for t in texts], dtype=np.float32)

    query_keys = document_keys


def test_a_star_import_needs_no_milvus_extra():
    # it listed MilvusMemoryStore, whose module refuses to load without pymilvus
    code = "import sys; sys.modules['pymilvus'] = None; from clara_plugins import *; print(MemoryStore.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "MemoryStore", done.stderr


def test_an_hnsw_stores_search_breadth_is_set_on_the_store(tiny_model, monkeypatch):
    # fixed at 128, an hnsw store's recall (0.66 at a million passages) could not be raised
    asked = []
    real = faiss.SearchParametersHNSW
    monkeypatch.setattr(faiss, "SearchParametersHNSW", lambda efSearch: asked.append(efSearch) or real(efSearch=efSearch))
    store = MemoryStore(tiny_model, index="hnsw")
    store.upsert(CORPUS[:4])
    store.ef_search = 512
    store.search(CORPUS[0], k=2)
    assert asked == [512]
    for bad in (0, 0.5, True):
        with pytest.raises(InvalidInputError, match="ef_search must be a positive integer"):
            store.ef_search = bad


def test_an_id_given_twice_in_one_upsert_keeps_a_built_index(tiny_model):
    # the second copy replaced the first: the hnsw index was dropped (rebuilt whole at the next
    # search) and the first copy's memories were held as a dead row
    store = MemoryStore(tiny_model, index="hnsw")
    store.upsert(CORPUS[:4], ids=["a", "b", "c", "d"])
    store.search(CORPUS[0], k=1)
    index = store._index
    assert store.upsert([CORPUS[4], CORPUS[5]], ids=["new", "new"]) == ["new", "new"]
    assert store._index is index and store.get(["new"])[0].text == CORPUS[5] and len(store) == 5
    assert sum(len(chunk) for chunk in store._memory_chunks) == 5


def test_a_key_encoder_of_its_own_cannot_claim_keys_made_from_memories(tiny_model):
    # accepted, and every search then failed on a missing ClaraKeys attribute
    class _MemoryWordKeys(_WordKeys):
        keys_are_memories = True

    with pytest.raises(InvalidInputError, match="_MemoryWordKeys sets keys_are_memories, which only ClaraKeys"):
        MemoryStore(tiny_model, _MemoryWordKeys())


@pytest.mark.parametrize("memory_dtype, keys", [("float16", None), ("int8", _WordKeys())])
def test_the_memories_of_replaced_and_deleted_documents_leave_ram(tiny_model, tmp_path, monkeypatch, memory_dtype,
                                                                  keys):
    """A long-running store used to hold every memory it was ever given until saved and loaded."""
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    store = MemoryStore(tiny_model, keys, memory_dtype=memory_dtype)
    ids = [f"d{i}" for i in range(5)]
    store.upsert(CORPUS[:5], ids=ids)
    store.upsert([CORPUS[5], "Vienna lies on the Danube."], ids=["d5", "d6"])
    expected = store.memories(ids + ["d5", "d6"])
    held = lambda: sum(len(chunk) for chunk in store._memory_chunks)  # noqa: E731
    store.delete(["d0", "d6"])  # 2 dead rows of 7: kept
    assert held() == 7
    replaced = ["Rome is the capital of Italy.", "Madrid is the capital of Spain.", "Oslo lies on a fjord."]
    store.upsert(replaced, ids=["d1", "d2", "d3"])  # 5 dead rows of 10: packed
    assert held() == 5 and len(store) == 5
    now = torch.cat([store.model.compress_documents(replaced), expected[4:6]])
    assert torch.allclose(store.memories(["d1", "d2", "d3", "d4", "d5"]), now, atol=2e-2)
    assert torch.equal(store.memories(["d4", "d5"]), expected[4:6])
    for chunks in (store._scale_chunks, store._key_chunks):  # chunked with the memories, or not at all
        assert [len(c) for c in chunks] in ([], [len(c) for c in store._memory_chunks])
    for text in replaced * 2:  # packed again: each write's emptied chunk took an array of its own
        store.upsert([text], ids=["d1"])
    assert store.get(["d1"])[0].text == replaced[-1]
    for chunks in (store._memory_chunks, store._scale_chunks, store._key_chunks):
        assert len({id(chunk) for chunk in chunks if not len(chunk)}) <= 1
    store.upsert([replaced[0]], ids=["d1"])
    fresh = MemoryStore(tiny_model, keys, memory_dtype=memory_dtype)  # the same documents, never replaced
    fresh.upsert([d.text for d in store.get(store.all_ids())], ids=store.all_ids())
    assert [d.id for d, _ in store.search("Paris", k=5)] == [d.id for d, _ in fresh.search("Paris", k=5)]
    store.save(tmp_path / "s")
    loaded = MemoryStore.load(tmp_path / "s", tiny_model, keys)
    assert loaded.all_ids() == ["d1", "d2", "d3", "d4", "d5"] and loaded.get(["d1"])[0].text == replaced[0]
    assert torch.equal(loaded.memories(loaded.all_ids()), store.memories(store.all_ids()))
    loaded.delete(["d1", "d2", "d3", "d4"])  # memory-mapped rows cost no RAM and stay where they are
    assert sum(len(chunk) for chunk in loaded._memory_chunks) == 5 and loaded.all_ids() == ["d5"]


def test_a_repack_stopped_midway_leaves_the_store_as_it_was(tiny_model, tmp_path, monkeypatch):
    # the memories were emptied before the scales were gathered: an out-of-memory there left rows
    # pointing into empty chunks, and no search or save worked again
    monkeypatch.setattr(store_folder, "SHARD_ROWS", 2)
    store = MemoryStore(tiny_model, memory_dtype="int8")
    store.upsert(CORPUS[:6], ids=[f"d{i}" for i in range(6)])
    store.upsert(["Vienna lies on the Danube.", "Oslo lies on a fjord."], ids=["e0", "e1"])
    before = store.memories(store.all_ids())
    real, calls = store_folder.gather, []

    def gather_then_fail(chunks, where):
        calls.append(len(where))
        if len(calls) == 2:
            raise MemoryError("no room for the scales")
        return real(chunks, where)

    monkeypatch.setattr(store_folder, "gather", gather_then_fail)
    with pytest.raises(MemoryError):
        store.delete(["d0", "d1", "d2", "e0"])
    monkeypatch.setattr(store_folder, "gather", real)
    left = ["d3", "d4", "d5", "e1"]
    assert store.all_ids() == left
    assert torch.equal(store.memories(left), before[[3, 4, 5, 7]])
    assert {d.id for d, _ in store.search("Paris", k=4)} == set(left)
    store.save(tmp_path / "s")
    assert torch.equal(MemoryStore.load(tmp_path / "s", tiny_model).memories(left), before[[3, 4, 5, 7]])


def test_a_large_store_shows_progress_as_it_builds_its_index_and_saves(tiny_model, tmp_path, monkeypatch, capsys):
    # a million passages built their index (about 400 s) and saved (about 50 s) in silence
    monkeypatch.setattr(store_folder, "PROGRESS_ROWS", 3)
    store = MemoryStore(tiny_model, index="hnsw")
    store.upsert(CORPUS[:3], ids=["a", "b", "c"])
    store.search("Paris", k=1)
    store.save(tmp_path / "s")
    shown = capsys.readouterr().err
    assert "building the search index" in shown and "saving the store" in shown
    small = MemoryStore(tiny_model, index="hnsw")
    small.upsert(CORPUS[:2], ids=["a", "b"])
    small.search("Paris", k=1)
    small.save(tmp_path / "t")
    assert capsys.readouterr().err == ""


def test_the_millionth_save_can_be_loaded_and_saved_again(tiny_model, tmp_path):
    # gen-1000000 was written into CURRENT, and then neither load nor save read it
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    folder = store.save(tmp_path / "s").parent
    (folder / "gen-000001").rename(folder / "gen-999999")
    (folder / "CURRENT").write_text("gen-999999\n")
    loaded = MemoryStore.load(folder, tiny_model)
    loaded.upsert(CORPUS[2:3], ids=["c"])
    assert loaded.save(folder).name == "gen-1000000"
    again = MemoryStore.load(folder, tiny_model)
    again.delete(["a"])
    assert again.save(folder).name == "gen-1000001"
    assert MemoryStore.load(folder, tiny_model).all_ids() == ["b", "c"]
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "CURRENT", "gen-1000000", "gen-1000001"]


def test_key_shards_unlike_the_memory_shards_are_refused_at_load(tiny_model, tmp_path):
    # the header is the one file no checksum covers: a store with no keys loaded, then failed its
    # searches on a bare IndexError
    store = MemoryStore(tiny_model, _WordKeys())
    store.upsert(CORPUS[:2], ids=["a", "b"])
    generation = store.save(tmp_path / "s")
    header = json.loads((generation / "store.json").read_text())
    (generation / "store.json").write_text(json.dumps({**header, "key_shards": []}))
    with pytest.raises(StoreError, match="store.json: the key shards do not match the memory shards row for row"):
        MemoryStore.load(tmp_path / "s", tiny_model, _WordKeys())


def test_replacing_every_document_copies_no_chunk_whose_rows_all_live(tiny_model, monkeypatch):
    # the new chunk was copied whole into a packed one: four copies of the memories at the peak
    from clara_plugins import store_folder

    monkeypatch.setattr(store_folder, "SHARD_ROWS", 2)
    store = MemoryStore(tiny_model)
    ids = [f"d{i}" for i in range(4)]
    store.upsert(CORPUS[:4], ids=ids)
    gathered = []
    real = store_folder.gather
    monkeypatch.setattr(store_folder, "gather", lambda chunks, where: gathered.append(len(where)) or real(chunks, where))
    store.upsert(CORPUS[2:6], ids=ids)  # every document replaced: 4 dead rows of 8, packed
    assert gathered == [] and sum(len(chunk) for chunk in store._memory_chunks) == 4
    assert torch.equal(store.memories(ids), store.model.compress_documents(CORPUS[2:6]).to(torch.float16).float())


def test_a_store_reads_what_it_saved_from_its_files_not_ram(tiny_model, tmp_path, monkeypatch):
    # a save kept every memory in RAM too: clara index held a whole corpus' (18 GB a million at CR16)
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    store = MemoryStore(tiny_model)
    ids = index_documents(store, CORPUS[:5], [f"d{i}" for i in range(5)], save=lambda: store.save(tmp_path / "s"),
                          save_every=2)
    expected = MemoryStore.load(tmp_path / "s", tiny_model)
    assert all(isinstance(chunk, np.memmap) for chunk in store._memory_chunks)
    assert torch.equal(store.memories(ids), expected.memories(ids))
    assert [d.id for d, _ in store.search("Paris", k=3)] == [d.id for d, _ in expected.search("Paris", k=3)]
    store.upsert(["Vienna lies on the Danube."], ids=["d0"])  # and writes on after it, saving what changed
    generation = store.save(tmp_path / "s")
    assert torch.equal(MemoryStore.load(tmp_path / "s", tiny_model).memories(["d0", "d4"]), store.memories(["d0", "d4"]))
    assert (generation / "memories-00001.npy").stat().st_nlink == 2  # a whole shard unchanged: linked, not written


@pytest.mark.parametrize("memory_dtype, keys", [("float16", None), ("int8", _WordKeys())])
def test_a_store_written_while_it_saves_reads_its_other_rows_from_the_new_files(tiny_model, tmp_path, monkeypatch,
                                                                                 memory_dtype, keys):
    # a store written during every save mapped no new files: every row written since its load
    # stayed in RAM, and the generation it loaded stayed mapped once a later save removed it
    monkeypatch.setattr(store_folder, "SHARD_ROWS", 2)
    first = MemoryStore(tiny_model, keys, memory_dtype=memory_dtype)
    first.upsert(CORPUS[:4], ids=[f"d{i}" for i in range(4)])
    first.save(tmp_path / "s")
    store = MemoryStore.load(tmp_path / "s", tiny_model, keys)
    write, written = store_folder.write_generation, []

    def meanwhile(*args):  # another thread writes once the save has let go of the lock
        generation, header = write(*args)
        number = len(written)
        store.upsert([f"Note {number}: {CORPUS[4 + number]}"], ids=[f"new{number}"])
        store.upsert([f"{CORPUS[number]} Revised {number}."], ids=[f"d{number}"])
        written.append(generation)
        return generation, header

    monkeypatch.setattr(store_folder, "write_generation", meanwhile)
    for _ in range(2):
        store.save(tmp_path / "s")
    mapped = [chunk for chunk in store._memory_chunks if isinstance(chunk, np.memmap)]
    assert {Path(chunk.filename).parent for chunk in mapped} == {written[-1]}
    assert sum(len(chunk) for chunk in store._memory_chunks if not isinstance(chunk, np.memmap)) == 2
    assert store._ram_rows == 2 and store._dead_ram_rows == 0
    monkeypatch.undo()
    ids = store.all_ids()
    assert sorted(ids) == ["d0", "d1", "d2", "d3", "new0", "new1"]
    store.save(tmp_path / "s")  # nothing written meanwhile: every row from the files
    loaded = MemoryStore.load(tmp_path / "s", tiny_model, keys)
    assert all(isinstance(chunk, np.memmap) for chunk in store._memory_chunks)
    assert loaded.get(ids) == store.get(ids) and loaded.get(["d1"])[0].text.endswith("Revised 1.")
    assert torch.equal(loaded.memories(ids), store.memories(ids))
    assert [d.id for d, _ in store.search("Paris", k=6)] == [d.id for d, _ in loaded.search("Paris", k=6)]


@pytest.mark.skipif(sys.platform != "linux", reason="counts this process's open files in /proc")
def test_a_store_of_more_shards_than_the_open_file_limit_loads_and_saves_mapped(tiny_model, tmp_path, monkeypatch):
    # each mapped shard keeps a file open: past the soft limit (1,024, about a million int8
    # passages) a load failed as "missing or corrupted", and a save kept its memories in RAM unsaid
    import resource

    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 1)
    texts = [f"{CORPUS[i % len(CORPUS)]} Note {i}." for i in range(40)]
    store = MemoryStore(tiny_model, memory_dtype="int8")  # two files a shard
    store.upsert(texts, ids=[f"d{i}" for i in range(40)])
    store.save(tmp_path / "s")
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[1] != resource.RLIM_INFINITY and limits[1] < 2048:
        pytest.skip(f"the hard open-file limit {limits[1]} leaves no room to lower the soft one")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 30, limits[1]))
        loaded = MemoryStore.load(tmp_path / "s", tiny_model)
        assert all(isinstance(chunk, np.memmap) for chunk in loaded._memory_chunks)
        assert torch.equal(loaded.memories(["d0", "d39"]), store.memories(["d0", "d39"]))
        loaded.upsert(["Vienna lies on the Danube."], ids=["d40"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "its memories stay in RAM"
            loaded.save(tmp_path / "s")
        assert all(isinstance(chunk, np.memmap) for chunk in loaded._memory_chunks)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_a_save_that_cannot_map_its_files_says_its_memories_stay_in_ram(tiny_model, tmp_path, monkeypatch):
    def fail(*args):
        raise StoreError("too many open files")

    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    monkeypatch.setattr(store, "_map", fail)
    with pytest.warns(UserWarning, match="keeps its memories in RAM, not read from .*: too many open files"):
        store.save(tmp_path / "s")
    assert MemoryStore.load(tmp_path / "s", tiny_model).get(["a", "b"]) == store.get(["a", "b"])


@pytest.mark.parametrize("index", ["hnsw"])  # a compact index of a store big enough to learn one: test_store_compact.py
def test_approximate_indexes_persist(tiny_model, tmp_path, index):
    store = MemoryStore(tiny_model, index=index)
    store.upsert(CORPUS, ids=[str(i) for i in range(len(CORPUS))])
    expected = [d.id for d, _ in store.search("Nobel prizes", k=2)]
    store.save(tmp_path / index)
    loaded = MemoryStore.load(tmp_path / index, tiny_model)
    generation = tmp_path / index / (tmp_path / index / "CURRENT").read_text().strip()
    assert loaded.index_kind == index and (generation / "index.faiss").is_file()  # the index was saved, not rebuilt
    assert [d.id for d, _ in loaded.search("Nobel prizes", k=2)] == expected


def test_an_hnsw_search_reaches_every_document_a_large_k_asks_for(tiny_model):
    # faiss searched 128 nodes wide whatever k was: 9 of 600 documents asked for were left out, unsaid
    store = MemoryStore(tiny_model, index="hnsw")
    shape = (600, tiny_model.config.n_mem_tokens, tiny_model.hidden_size)
    store.upsert([f"text {i}" for i in range(600)], memories=torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    key = store._row_keys([0])[0]
    faiss.downcast_index(store._ensure_index()).hnsw.efSearch = 16  # as an earlier version saved it
    assert len(store.search_by_key(key, k=600)) == len(store.search_by_key(key, k=6000)) == 600
    assert len(store.search_by_key(key, k=10)) == 10 and store.search_by_key(key, k=1)[0][0].text == "text 0"


def test_tied_documents_come_in_the_order_they_were_stored_whatever_k_or_filter(tiny_model):
    # faiss gave ties last-stored first, the exact search first-stored first: an empty filter, or
    # another k, changed which document the generator read first
    store = MemoryStore(tiny_model)
    store.upsert([CORPUS[0]] * 4 + [CORPUS[1]], ids=["a", "b", "c", "d", "e"])
    key = store._row_keys([0])[0]
    ranked = [d.id for d, _ in store.search_by_key(key, k=5)]
    assert ranked[:4] == ["a", "b", "c", "d"] and [d.id for d, _ in store.search_by_key(key, k=5, where={})] == ranked
    assert all([d.id for d, _ in store.search_by_key(key, k=j)] == ranked[:j] for j in range(1, 5))


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_copies_below_better_documents_come_in_stored_order_with_a_filter_or_without(tiny_model, index):
    # faiss kept any of the copies tied at the k-th place, the exact search the first stored; and
    # a matrix product scored copies a last bit apart by their place in its blocks; hnsw asked
    # for every document missed some among many alike
    rng = np.random.default_rng(0)
    shape = (tiny_model.config.n_mem_tokens, tiny_model.hidden_size)
    copy = rng.standard_normal((1, *shape))
    memories = np.concatenate([rng.standard_normal((50, *shape)), np.repeat(copy, 150, 0),
                               rng.standard_normal((50, *shape))]).astype(np.float32)
    store = MemoryStore(tiny_model, index=index)
    store.upsert([f"text {i}" for i in range(250)], [f"d{i:03d}" for i in range(250)], memories=torch.tensor(memories))
    for query in rng.standard_normal((20, store._key_size())).astype(np.float32):
        ranked = [d.id for d, _ in store.search_by_key(query, k=10)]
        if index == "flat":  # exact both ways (hnsw's graph search is approximate)
            assert ranked == [d.id for d, _ in store.search_by_key(query, k=10, where={})]
        tied = [i for i in ranked if 50 <= int(i[1:]) < 200]
        assert tied == sorted(tied) and (not tied or tied[0] == "d050")
    assert len(store.search_by_key(query, k=250)) == 250 and len(store.search_by_key(query, k=249)) == 249
    if index == "hnsw":  # 12 copies tied past twice k widen the graph's search, not to every row
        scored = []
        small = MemoryStore(tiny_model, index="hnsw")
        small.upsert([f"text {i}" for i in range(212)],
                     memories=torch.tensor(np.concatenate([memories[:200], np.repeat(memories[:1], 12, 0)])))
        small._best = lambda rows, *a: scored.append(len(rows)) or MemoryStore._best(small, rows, *a)
        small.search_by_key(small._row_keys([0])[0], k=4)
        assert scored and scored[-1] < 100
    # a corpus added twice ties every document with its copy: found in one search
    searches, search = [], store._index.search
    store._index.search = lambda *a, **k: searches.append(1) or search(*a, **k)
    store.search_by_key(store._row_keys([3])[0], k=5)
    assert searches == [1]


@pytest.mark.parametrize("key, problem", [(None, "real numbers, got object"), ("hello", "real numbers, got <U5"),
                                          (np.ones(4, dtype=complex), "real numbers, got complex128")])
def test_a_search_key_that_is_no_real_vector_is_refused_by_name(tiny_model, key, problem):
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2])
    with pytest.raises(InvalidInputError, match=f"the search key must hold {problem}"):
        store.search_by_key(key)
    # a tensor that carries gradients, and a float64 key past float32's range, are keys
    wanted = store._row_keys([1])[0]
    assert store.search_by_key(torch.tensor(wanted, requires_grad=True), k=1)[0][0].text == CORPUS[1]
    assert store.search_by_key(wanted.astype(np.float64) * 1e300, k=1)[0][0].text == CORPUS[1]
    assert store.search_by_key(torch.tensor(wanted, dtype=torch.bfloat16), k=1)[0][0].text == CORPUS[1]


def test_fresh_models_of_one_configuration_read_each_others_stores(tiny_config, tmp_path):
    # their random LoRA A matrices, which add nothing while B is zero, signed the compressor:
    # clara index on a --base-model without a checkpoint wrote a store no later run could open
    from clara_plugins.checkpoint import compressor_signature

    torch.manual_seed(1)
    first = ClaraModel(tiny_config, device="cpu")
    torch.manual_seed(2)
    second = ClaraModel(tiny_config, device="cpu")
    assert compressor_signature(first) == compressor_signature(second)
    store = MemoryStore(first)
    store.upsert(CORPUS[:2])
    store.save(tmp_path / "s")
    assert len(MemoryStore.load(tmp_path / "s", second)) == 2
    with torch.no_grad():  # a trained compressor is told apart, its <MEM> rows alike
        for name, parameter in second.lm.named_parameters():
            if "lora_B.encoder_adapter" in name:
                parameter.normal_()
    assert compressor_signature(first) != compressor_signature(second)


def test_a_zero_search_key_is_refused_and_one_document_is_at_most_fully_relevant(tiny_model):
    # a zero key scored every document 0 and returned the first stored; 1 + a float32 self-cosine of 1.0000001
    store = MemoryStore(tiny_model)
    store.upsert([CORPUS[0]])
    with pytest.raises(InvalidInputError, match="the search key is all zeros"):
        store.search_by_key(np.zeros(store._key_size(), dtype=np.float32))
    assert store.relevance(1.0000001) == 1.0 and store.relevance(-1.0000001) == 0.0


def test_an_upsert_while_a_save_writes_leaves_the_saved_index_whole(tiny_model, tmp_path, monkeypatch):
    store = MemoryStore(tiny_model, index="hnsw")
    store.upsert(CORPUS, ids=[str(i) for i in range(len(CORPUS))])
    write = store_folder.write_generation

    def write_after_an_upsert(*args):  # another thread upserts once the save has let go of the lock
        store.upsert(["Madrid is the capital of Spain."], ids=["late"], memories=store.memories(["0"]))
        return write(*args)

    monkeypatch.setattr(store_folder, "write_generation", write_after_an_upsert)
    store.save(tmp_path / "s")
    monkeypatch.undo()
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)  # its index holds the rows it was saved with
    assert loaded.all_ids() == [str(i) for i in range(len(CORPUS))] and loaded._index.ntotal == len(CORPUS)
    assert "late" in store.all_ids()


def test_store_of_another_compressor_is_refused(store, tiny_config, tmp_path):
    store.save(tmp_path / "s")
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=7)
    with pytest.raises(StoreError, match="another compressor"):
        MemoryStore.load(tmp_path / "s", other)
    other_rate = ClaraModel(ClaraConfig(base_model=tiny_config.base_model, compression_rate=8,
                                        doc_max_length=64), device="cpu")
    with pytest.raises(StoreError, match="compression_rate=16, this model has 8: load the model at compression rate 16"):
        MemoryStore.load(tmp_path / "s", other_rate)
    # not for a design that reads at its own rate alone (loaded at 16, it was refused), and advice
    # clara index can follow (a new folder: it loads the old store first)
    tokens_at_8 = ClaraModel(dataclasses.replace(tiny_config, memory_design="tokens", compression_rate=8), device="cpu")
    with pytest.raises(StoreError, match="compression_rate=16, this model has 8: read it with the model that wrote it, "
                                         "or compress its documents again with this one into a new folder"):
        MemoryStore.load(tmp_path / "s", tokens_at_8)
    other_design = ClaraModel(dataclasses.replace(tiny_config, memory_design="tokens"), device="cpu")
    with pytest.raises(StoreError, match="memory_design"):
        MemoryStore.load(tmp_path / "s", other_design)
    other_key = ClaraModel(dataclasses.replace(tiny_config, retrieval_key="flat"), device="cpu")
    randomize_adapters(other_key)  # the same compressor, but flattened keys
    with pytest.raises(StoreError, match="indexed with keys"):
        MemoryStore.load(tmp_path / "s", other_key)


def test_a_store_written_on_another_base_model_is_refused(store, tiny_config, other_tiny_base, tmp_path):
    # the same adapters and rows on another base: only the base model's fingerprint tells them apart
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    store.save(tmp_path / "s")
    other = ClaraModel(dataclasses.replace(tiny_config, base_model=str(other_tiny_base)), device="cpu")
    for name in ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter"):
        set_peft_model_state_dict(other.lm, get_peft_model_state_dict(store.model.lm, adapter_name=name),
                                  adapter_name=name)
    with torch.no_grad():
        rows = store.model.base_vocab_size
        other.lm.get_input_embeddings().weight[rows:] = store.model.lm.get_input_embeddings().weight[rows:]
    with pytest.raises(StoreError, match="was written by another base model: .*; read it with the model that wrote it"):
        MemoryStore.load(tmp_path / "s", other)
    # named as the store's and this model's, not as a checkpoint's and a base model's, and with the remedy
    from clara_plugins.checkpoint import check_compressor, compressor_signature

    signature = compressor_signature(store.model)
    stored = {**signature, "base_model_fingerprint": {**signature["base_model_fingerprint"], "model_type": "gpt2"}}
    with pytest.raises(StoreError, match=r"model_type differs \(the store's: 'gpt2', this model's: 'llama'\)"):
        check_compressor(stored, signature, "s")


def test_a_store_of_another_compressor_is_refused_before_its_files_are_hashed(store, tiny_config, tmp_path,
                                                                              monkeypatch):
    store.save(tmp_path / "s")
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=7)
    monkeypatch.setattr(store_folder, "_sha256", lambda *args: pytest.fail("hashed before the header's checks"))
    with pytest.raises(StoreError, match="another compressor .*: read it with the model that wrote it, or compress"):
        MemoryStore.load(tmp_path / "s", other)


def test_corrupted_files_are_named(store, tiny_model, tmp_path):
    generation = store.save(tmp_path / "s")
    (generation / "memories-00000.npy").write_bytes(b"not numpy")
    with pytest.raises(StoreError, match="memories-00000.npy is corrupted: its checksum"):
        MemoryStore.load(tmp_path / "s", tiny_model)
    approximate = MemoryStore(tiny_model, index="hnsw")
    approximate.upsert(CORPUS[:3])
    generation = approximate.save(tmp_path / "h")
    (generation / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="index.faiss is corrupted: its checksum"):
        MemoryStore.load(tmp_path / "h", tiny_model)
    with pytest.raises(StoreError, match="CURRENT is missing"):
        MemoryStore.load(tmp_path, tiny_model)


def test_process_killed_during_save_leaves_the_last_good_store(store, tiny_model, tiny_base, tmp_path):
    store.save(tmp_path / "s")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import os, numpy as np
        from clara_plugins import ClaraModel, MemoryStore
        model = ClaraModel.from_pretrained({str(tmp_path / 'ckpt')!r}, device="cpu")
        store = MemoryStore.load({str(tmp_path / 's')!r}, model)
        store.upsert(["A sixth document that must not appear."], ids=["d5"])
        store.delete(["d0"])
        real_save = np.save
        def die_midway(handle, array):
            real_save(handle, array[: len(array) // 2])
            os._exit(9)  # the process is killed while writing the memory shard
        np.save = die_midway
        store.save({str(tmp_path / 's')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    survivor = MemoryStore.load(tmp_path / "s", tiny_model)
    assert survivor.all_ids() == [f"d{i}" for i in range(5)]
    assert torch.equal(survivor.memories(["d0"]), store.memories(["d0"]))
    assert len(list(Path(tmp_path / "s").glob(".staging-" + "[0-9a-f]" * 32))) == 1  # what the kill left
    (tmp_path / "s" / ".staging-notes").mkdir()  # a folder beside the store, not the store's own
    survivor.save(tmp_path / "s")  # the next save clears the abandoned staging folder
    assert [p.name for p in Path(tmp_path / "s").glob(".staging-*")] == [".staging-notes"]


def test_concurrent_readers_and_a_writer(store):
    errors: list[Exception] = []
    results: list[int] = []

    def read() -> None:
        try:
            for _ in range(5):
                results.append(len(store.search("capital city", k=3)))
        except Exception as error:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(error)

    def write() -> None:
        try:
            for i in range(5):
                store.upsert([f"Extra document number {i}."], ids=[f"x{i}"])
                store.delete([f"x{i - 1}"])
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [3] * 15
    assert sorted(store.all_ids()) == ["d0", "d1", "d2", "d3", "d4", "x4"]


def test_a_save_over_another_writers_newer_save_is_refused_and_loses_nothing(store, tiny_model, tmp_path):
    # two processes that loaded one store each saved their own snapshot: the later one dropped
    # the documents the other had added, without a word
    store.save(tmp_path / "s")
    first, second = MemoryStore.load(tmp_path / "s", tiny_model), MemoryStore.load(tmp_path / "s", tiny_model)
    first.upsert(["New text about Vienna."], ids=["vienna"])
    first.save(tmp_path / "s")
    second.upsert(["New text about Lisbon."], ids=["lisbon"])
    with pytest.raises(StoreError, match="saved by another writer since this store read it"):
        second.save(tmp_path / "s")
    assert "vienna" in MemoryStore.load(tmp_path / "s", tiny_model).all_ids()
    second.save(tmp_path / "elsewhere")  # another folder takes it
    first.upsert(["More about Vienna."], ids=["vienna 2"])
    first.save(tmp_path / "s")  # the writer of the current generation goes on saving
    assert len(MemoryStore.load(tmp_path / "s", tiny_model)) == 7
    first.save(tmp_path / "copy")  # a copy elsewhere, then another writer, then back: still refused
    MemoryStore.load(tmp_path / "s", tiny_model).save(tmp_path / "s")
    with pytest.raises(StoreError, match="saved by another writer"):
        first.save(tmp_path / "s")


def test_an_index_left_short_by_a_failed_extension_is_built_again(tiny_model, tmp_path, monkeypatch):
    # the documents went in, the index did not: searches missed them, and the save it made refused to load
    store = MemoryStore(tiny_model, index="hnsw")
    store.upsert(CORPUS[:3], ids=["d0", "d1", "d2"])
    store.search("Paris", k=1)  # builds the index
    row_keys = store._row_keys
    monkeypatch.setattr(store, "_row_keys", lambda rows: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        store.upsert(CORPUS[3:5], ids=["d3", "d4"])
    monkeypatch.setattr(store, "_row_keys", row_keys)
    assert len(store) == 5 and {doc.id for doc, _ in store.search("Paris", k=5)} == {f"d{i}" for i in range(5)}
    store.save(tmp_path / "s")
    assert len(MemoryStore.load(tmp_path / "s", tiny_model).search("Paris", k=5)) == 5


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_a_filtered_search_reads_the_mean_keys_of_a_built_index_not_the_memories(tiny_model, monkeypatch, index):
    # it read and averaged every candidate's memory vectors: 16 times the bytes of its mean key
    store = MemoryStore(tiny_model, index=index)
    store.upsert(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))], metadatas=[{"n": i % 2} for i in range(len(CORPUS))])
    expected = store.search("Nobel prizes", k=3, where={"n": 0})
    diverse = store.search("Nobel prizes", k=2, where={"n": 0}, lambda_mult=0.3)
    store.search("Nobel prizes", k=1)  # builds the index
    monkeypatch.setattr(store, "_memory_rows", lambda rows: pytest.fail("the memories were read"))
    assert store.search("Nobel prizes", k=3, where={"n": 0}) == expected
    assert store.search("Nobel prizes", k=2, where={"n": 0}, lambda_mult=0.3) == diverse


def test_a_flat_store_searched_with_filters_alone_builds_its_index_once_they_made_as_many_keys(tiny_model,
                                                                                               monkeypatch, tmp_path):
    # a loaded store whose every search was filtered made each match's key from its memories at each search
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS, ids=[f"d{i}" for i in range(len(CORPUS))], metadatas=[{"n": i % 2} for i in range(len(CORPUS))])
    expected = store.search("Nobel prizes", k=3, where={"n": 0})
    store.save(tmp_path / "s")
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert loaded.search("Nobel prizes", k=3, where={"n": 0}) == expected and loaded._index is None  # half the keys
    assert loaded.search("Nobel prizes", k=3, where={"n": 0}) == expected and loaded._index is not None
    monkeypatch.setattr(loaded, "_memory_rows", lambda rows: pytest.fail("the memories were read"))
    assert loaded.search("Nobel prizes", k=3, where={"n": 0}) == expected


def test_a_save_through_a_linked_current_leaves_the_linked_store_alone(store, tiny_model, tmp_path):
    # a copy whose CURRENT links to the original's ("cp -rs"): its save pointed the original at a
    # generation only the copy holds, and the original no longer loaded
    store.save(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    (tmp_path / "copy" / "CURRENT").unlink()
    (tmp_path / "copy" / "CURRENT").symlink_to(tmp_path / "orig" / "CURRENT")
    copy = MemoryStore.load(tmp_path / "copy", tiny_model)
    copy.upsert(["One more document."], ids=["more"])
    copy.save(tmp_path / "copy")
    assert sorted(MemoryStore.load(tmp_path / "orig", tiny_model).all_ids()) == sorted(store.all_ids())
    assert "more" in MemoryStore.load(tmp_path / "copy", tiny_model).all_ids()
    assert not (tmp_path / "copy" / "CURRENT").is_symlink()


def test_a_delete_where_among_ids_deletes_those_the_filter_selects(tiny_model):
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:4], ids=["a", "b", "c", "d"], metadatas=[{"t": 1}, {"t": 1}, {"t": 2}, {"t": 1}])
    listings = store.all_ids, store.ids_where
    store.all_ids = lambda: pytest.fail("every id was listed to delete one")
    ids_where = store.ids_where  # read among the ids given, not over every row
    store.ids_where = lambda where, among=None: ids_where(where, among) if among is not None else pytest.fail(
        "every row's metadata was read to choose among a few ids")
    store.delete_where({"t": 1}, ids=["a", "c", "x"])
    assert [document.id for document in store.get_where({"t": 1}, ids=["d", "c", "a"])] == ["d"]
    assert [document.id for document in store.get_where(None, ids=["b", "x"])] == ["b"]
    with pytest.raises(ValueError, match="unknown operator"):
        store.get_where({"t": {"$near": 1}}, ids=["b"])
    store.delete_where(None, ids=["b"])
    store.all_ids, store.ids_where = listings
    assert sorted(store.all_ids()) == ["c", "d"]
    store.delete_where()
    assert store.all_ids() == []
