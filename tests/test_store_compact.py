"""Compact stores: int8 memories, the compact ("ivfpq") index with exact re-scoring, and
format 1 stores, written before either existed, refused."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoreError
from clara_plugins.compact import MIN_ROWS, RETRAIN_GROWTH, CompactIndex
from clara_plugins.keys import ClaraKeys, memory_keys
from conftest import CORPUS

GROUPS, PER_GROUP = 160, 8  # 1,280 documents: enough to train the compact index


def grouped_memories(model, seed: int = 0) -> torch.Tensor:
    """Memories in tight groups around random centres: a group's members are far closer to each
    other, and to a query near their centre, than to anything else, so the exact top k is clear."""
    rng = np.random.default_rng(seed)
    shape = (model.config.n_mem_tokens, model.hidden_size)
    centres = rng.standard_normal((GROUPS, 1, *shape))
    members = centres + 0.1 * rng.standard_normal((GROUPS, PER_GROUP, *shape))
    return torch.tensor(members.reshape(-1, *shape), dtype=torch.float32)


def grouped_store(model, index: str, memory_dtype: str = "float16") -> MemoryStore:
    store = MemoryStore(model, index=index, memory_dtype=memory_dtype)
    count = GROUPS * PER_GROUP
    store.upsert([f"passage {i}" for i in range(count)], ids=[str(i) for i in range(count)],
                 metadatas=[{"group": i // PER_GROUP} for i in range(count)], memories=grouped_memories(model))
    return store


def query_near(model, group: int) -> np.ndarray:
    """A query key close to one group's centre."""
    memories = grouped_memories(model)[group * PER_GROUP:(group + 1) * PER_GROUP].numpy()
    noise = np.random.default_rng(group).standard_normal(memories.shape[1:])
    return ClaraKeys(model).memory_keys((memories.mean(axis=0) + 0.1 * noise)[None])[0]


def generation(folder: Path) -> Path:
    return folder / (folder / "CURRENT").read_text().strip()


def ids(results) -> list[str]:
    return [doc.id for doc, _ in results]


def test_int8_memories_come_back_within_half_a_step(tiny_model):
    exact, compact = MemoryStore(tiny_model), MemoryStore(tiny_model, memory_dtype="int8")
    for store in (exact, compact):
        store.upsert(CORPUS, ids=[str(i) for i in range(len(CORPUS))])
    original = exact.memories(exact.all_ids()).numpy()
    restored = compact.memories(compact.all_ids()).numpy()
    step = np.abs(original).max(axis=-1, keepdims=True) / 127  # one int8 step of each memory vector
    assert np.all(np.abs(restored - original) <= step / 2 + 1e-6)
    cosines = (memory_keys(original, "flat") * memory_keys(restored, "flat")).sum(axis=1)
    assert cosines.min() > 0.999


def test_save_and_load_keep_the_memory_dtype(tiny_model, tmp_path):
    store = MemoryStore(tiny_model, memory_dtype="int8")
    store.upsert(CORPUS, ids=[str(i) for i in range(len(CORPUS))])
    folder = store.save(tmp_path / "s")
    assert json.loads((folder / "store.json").read_text())["memory_dtype"] == "int8"
    assert np.load(folder / "memories-00000.npy").dtype == np.int8 and (folder / "scales-00000.npy").is_file()
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    assert loaded.memory_dtype == "int8"
    assert torch.equal(loaded.memories(["0", "4"]), store.memories(["0", "4"]))
    assert ids(loaded.search("Nobel prizes", k=3)) == ids(store.search("Nobel prizes", k=3))
    loaded.upsert(["A new text about Vienna."], ids=["new"])  # int8 chunks added to memory-mapped ones
    loaded.save(tmp_path / "s")
    assert MemoryStore.load(tmp_path / "s", tiny_model).get(["new"])[0].text == "A new text about Vienna."


def test_int8_takes_about_half_the_bytes_on_disk(tiny_model, tmp_path):
    sizes = {}
    for dtype in ("float16", "int8"):
        folder = grouped_store(tiny_model, "flat", dtype).save(tmp_path / dtype)
        sizes[dtype] = sum(p.stat().st_size for p in folder.glob("*") if p.name.startswith(("memories", "scales")))
    # 32 one-byte values and a 4-byte scale per memory vector, against 32 two-byte values
    assert sizes["int8"] < 0.6 * sizes["float16"]


@pytest.mark.parametrize("memory_dtype, retrieval_key", [("float16", "mean"), ("int8", "mean"), ("float16", "flat")])
def test_the_compact_index_returns_the_exact_top_k(tiny_config, tmp_path, memory_dtype, retrieval_key):
    tiny_model = ClaraModel(dataclasses.replace(tiny_config, retrieval_key=retrieval_key), device="cpu")
    exact = grouped_store(tiny_model, "flat", memory_dtype)
    compact = grouped_store(tiny_model, "ivfpq", memory_dtype)
    assert len(compact) >= MIN_ROWS
    folder = compact.save(tmp_path / "s")
    assert (folder / "index-projection.npy").is_file()  # trained, not the exact fallback of small stores
    loaded = MemoryStore.load(tmp_path / "s", tiny_model)
    for group in (0, 41, 159):
        query = query_near(tiny_model, group)
        expected = exact.search_by_key(query, k=PER_GROUP)
        assert {doc.metadata["group"] for doc, _ in expected} == {group}
        for store in (compact, loaded):
            found = store.search_by_key(query, k=PER_GROUP)
            assert ids(found) == ids(expected)
            assert np.allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)


def test_filters_and_mmr_work_with_the_compact_index(tiny_model):
    exact, compact = grouped_store(tiny_model, "flat"), grouped_store(tiny_model, "ivfpq", "int8")
    query = query_near(tiny_model, 7)
    for store in (exact, compact):
        assert {doc.metadata["group"] for doc, _ in store.search_by_key(query, k=5, where={"group": 12})} == {12}
        assert len(store.search_by_key(query, k=np.int64(3), lambda_mult=0.5, fetch_k=np.int32(9))) == 3
        assert set(ids(store.search_by_key(query, k=5, ids=["1", "2", "900"]))) == {"1", "2", "900"}
    diverse = [ids(store.search_by_key(query, k=4, lambda_mult=0.3, fetch_k=PER_GROUP)) for store in (exact, compact)]
    # the approximate index may fetch another near-tie of the group, so only the best pick must agree
    assert diverse[0][0] == diverse[1][0] and len(set(diverse[1])) == 4
    assert {int(i) // PER_GROUP for i in diverse[1]} == {7}


def test_a_format_1_store_is_refused_by_its_format(tiny_model, tmp_path):
    """Format 1 signed its compressor from fp32 weights: even the checkpoint that wrote it was
    refused as "another compressor"."""
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:3])
    folder = store.save(tmp_path / "s")
    header = json.loads((folder / "store.json").read_text())
    del header["memory_dtype"], header["scale_shards"]
    (folder / "store.json").write_text(json.dumps({**header, "format": "clara-memory-store/1"}))
    with pytest.raises(StoreError, match="format 'clara-memory-store/1'.*index its documents again"):
        MemoryStore.load(tmp_path / "s", tiny_model)


def test_bad_dtypes_formats_and_scales_are_named(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown memory_dtype 'int4'; choose one of"):
        MemoryStore(tiny_model, memory_dtype="int4")
    store = MemoryStore(tiny_model, memory_dtype="int8")
    with pytest.raises(InvalidInputError, match="memories must be finite"):
        store.upsert(["a text"], memories=torch.full((1, tiny_model.config.n_mem_tokens, tiny_model.hidden_size),
                                                     float("nan")))
    store.upsert(CORPUS[:3])
    folder = store.save(tmp_path / "s")
    pristine = (folder / "store.json").read_text()
    for change, message in [({"memory_dtype": "int4"}, "gives the memory dtype 'int4'"),
                            ({"format": "clara-memory-store/9"}, "its format: 'clara-memory-store/9'"),
                            ({"scale_shards": []}, "scale shards do not match the int8 memory shards")]:
        (folder / "store.json").write_text(json.dumps({**json.loads(pristine), **change}))
        with pytest.raises(StoreError, match=message):
            MemoryStore.load(tmp_path / "s", tiny_model)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_appended_documents_join_the_built_index_and_replaced_ones_rebuild_all_but_a_flat_one(tiny_model, index):
    store = grouped_store(tiny_model, index)
    count = len(store)
    store.search_by_key(query_near(tiny_model, 3), k=2)
    built = store._index
    extra = grouped_memories(tiny_model, seed=1)[:PER_GROUP]
    store.upsert([f"new {i}" for i in range(PER_GROUP)], ids=[f"n{i}" for i in range(PER_GROUP)], memories=extra)
    assert store._index is built and built.ntotal == count + PER_GROUP  # added to, not rebuilt
    query = ClaraKeys(tiny_model).memory_keys(extra[:1].numpy())[0]
    assert ids(store.search_by_key(query, k=1)) == ["n0"]
    store.upsert(["replaced"], ids=["n0"], memories=grouped_memories(tiny_model, seed=2)[:1])  # far from the group
    # a replaced row's old key is in an index: written over in a flat one (built again, one replaced
    # document took 35 s at a million), any other rebuilt at the next search
    assert store._index is (built if index == "flat" else None)
    assert ids(store.search_by_key(query, k=1))[0] in {f"n{i}" for i in range(1, PER_GROUP)}
    rebuilt = MemoryStore(tiny_model, index=index)  # the same documents, indexed from the start
    rebuilt.upsert([d.text for d in store.get(store.all_ids())], store.all_ids(),
                   memories=store.memories(store.all_ids()).half())
    for near in (query, query_near(tiny_model, 3), ClaraKeys(tiny_model).memory_keys(
            grouped_memories(tiny_model, seed=2)[:1].numpy())[0]):
        assert [(d.id, s) for d, s in store.search_by_key(near, k=5)] == \
            [(d.id, s) for d, s in rebuilt.search_by_key(near, k=5)]


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_deleted_documents_leave_a_flat_index_in_place(tiny_model, index):
    # every key was indexed again at the next search: 35 s for one deleted document at a million
    store = grouped_store(tiny_model, index)
    store.search_by_key(query_near(tiny_model, 3), k=2)
    built, count = store._index, len(store)
    gone = [str(row) for row in (0, 3 * PER_GROUP, 3 * PER_GROUP + 1, count - 1)]
    store.delete(gone)
    if index == "flat":
        assert store._index is built and built.ntotal == count - len(gone)
    else:  # a graph cannot lose a node; fast-scan codes keep a removed row's bytes for the next added
        assert store._index is None
    for group in (0, 3, GROUPS - 1):
        found = ids(store.search_by_key(query_near(tiny_model, group), k=PER_GROUP - 2))
        members = {str(row) for row in range(group * PER_GROUP, (group + 1) * PER_GROUP)}
        assert len(found) == PER_GROUP - 2 and set(found) <= members - set(gone)
    # and documents added after the delete are found by their own keys
    extra = grouped_memories(tiny_model, seed=1)[:PER_GROUP]
    store.upsert([f"new {i}" for i in range(PER_GROUP)], ids=[f"n{i}" for i in range(PER_GROUP)], memories=extra)
    for i in range(PER_GROUP):
        assert ids(store.search_by_key(ClaraKeys(tiny_model).memory_keys(extra[i:i + 1].numpy())[0], k=1)) == [f"n{i}"]
    exact = MemoryStore(tiny_model, memory_dtype="float16")
    kept = store.all_ids()
    exact.upsert([d.text for d in store.get(kept)], ids=kept, memories=store.memories(kept))
    query = query_near(tiny_model, 3)
    assert ids(store.search_by_key(query, k=5)) == ids(exact.search_by_key(query, k=5))


def test_a_small_ivfpq_store_that_outgrows_exact_search_gets_a_compact_index(tiny_model):
    store = MemoryStore(tiny_model, index="ivfpq")
    memories = grouped_memories(tiny_model)
    store.upsert([f"p{i}" for i in range(8)], ids=[str(i) for i in range(8)], memories=memories[:8])
    store.search_by_key(query_near(tiny_model, 0), k=1)
    assert store._index is not None and not isinstance(store._index, CompactIndex)  # exact below MIN_ROWS
    rest = range(8, len(memories))
    store.upsert([f"p{i}" for i in rest], ids=[str(i) for i in rest], memories=memories[8:])
    assert store._index is None
    store.search_by_key(query_near(tiny_model, 0), k=1)
    assert isinstance(store._index, CompactIndex)


def test_the_compact_index_learns_again_once_the_store_has_doubled(tiny_model, tmp_path):
    store = grouped_store(tiny_model, "ivfpq")
    first = len(store)
    store.save(tmp_path / "store")  # trains the index on the first group of a corpus indexed in order
    store = MemoryStore.load(tmp_path / "store", tiny_model)
    assert store._index.trained_over == first
    more = grouped_memories(tiny_model, seed=3)
    added = [f"m{i}" for i in range(len(more))]
    store.upsert(added[:8], ids=added[:8], memories=more[:8])
    assert store._index.trained_over == first and store._index.ntotal == first + 8  # extended, not retrained
    rest = range(8, (RETRAIN_GROWTH - 1) * first)
    store.upsert([added[i] for i in rest], ids=[added[i] for i in rest], memories=more[8:len(rest) + 8])
    assert store._index is None  # the store has doubled: the next search or save learns from all of it
    store.search_by_key(query_near(tiny_model, 0), k=1)
    assert store._index.trained_over == RETRAIN_GROWTH * first
    store.save(tmp_path / "store")
    assert MemoryStore.load(tmp_path / "store", tiny_model)._index.trained_over == RETRAIN_GROWTH * first


def test_a_compact_index_saved_before_it_recorded_its_rows_learns_again_at_the_next_upsert(tiny_model, tmp_path):
    grouped_store(tiny_model, "ivfpq").save(tmp_path / "store")
    header_path = generation(tmp_path / "store") / "store.json"
    header = json.loads(header_path.read_text())
    del header["index_trained_over"]  # as written before the field existed
    header_path.write_text(json.dumps(header))
    store = MemoryStore.load(tmp_path / "store", tiny_model)
    assert isinstance(store._index, CompactIndex)
    store.upsert(["one more"], ids=["m0"], memories=grouped_memories(tiny_model, seed=3)[:1])
    assert store._index is None  # what its codebooks learned from is unknown: they learn again


@pytest.mark.parametrize("blocks,width", [(7, 80), (600, 4)])
def test_any_number_of_blocks_gets_codes_of_at_most_the_promised_size(blocks, width):
    # 7 x 73 kept values: an odd count took a sub-quantiser per value, twice the bytes a key was
    # promised; past 512 blocks no coordinate was kept and faiss aborted
    keys = np.random.default_rng(0).standard_normal((MIN_ROWS, blocks * width)).astype(np.float32)
    index = CompactIndex.trained(keys, blocks, trained_over=len(keys))
    index.add(keys)
    assert index.codes.code_size <= max(128, (blocks + 1) // 2)
    assert len(index.candidates(keys[0], 10)) == 10


def test_a_rescore_factor_that_is_no_positive_integer_is_refused_when_set(tiny_model):
    store = MemoryStore(tiny_model, index="ivfpq")
    for bad in (0, 0.5, -1, True):  # failed inside faiss, at a search
        with pytest.raises(InvalidInputError, match="rescore_factor must be a positive integer"):
            store.rescore_factor = bad
    store.rescore_factor = np.int64(2)  # a SWIG TypeError at a search
    assert type(store.rescore_factor) is int


def test_keys_of_another_model_are_refused(tiny_model, tiny_config):
    other = ClaraModel(tiny_config, device="cpu")
    with pytest.raises(InvalidInputError, match="ClaraKeys of another model"):
        MemoryStore(tiny_model, ClaraKeys(other))


def test_memories_quantised_a_slice_at_a_time_are_those_quantised_whole(monkeypatch):
    # quantised whole, an upsert of 100,000 passages held float32 copies of all of them at once
    from clara_plugins import compact

    memories = np.random.default_rng(0).standard_normal((10, 3, 8)).astype(np.float16)
    memories[4] = 0  # an all-zero vector keeps a zero scale, and zero codes
    whole = np.asarray(memories, dtype=np.float32)
    scales = np.abs(whole).max(axis=-1) / 127.0
    codes = np.rint(whole / np.maximum(scales, np.finfo(np.float32).tiny)[..., None]).astype(np.int8)
    monkeypatch.setattr(compact, "QUANTIZE_ROWS", 3)
    sliced = compact.quantize(memories)
    assert np.array_equal(sliced[0], codes) and np.array_equal(sliced[1], scales)
    assert sliced[0].dtype == np.int8 and sliced[1].dtype == np.float32
