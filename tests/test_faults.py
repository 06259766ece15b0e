"""Fault injection: corrupted and hostile store files, racing writers, repeated kills during a
save, and metadata that would not survive JSON. Each case must end in a clear error or in the
last good state, never in a wrong answer."""

import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clara_plugins import InvalidInputError, MemoryStore, StoreError, store_folder
from conftest import CORPUS


@pytest.fixture
def saved(tiny_model, tmp_path) -> tuple[MemoryStore, Path]:
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:5], ids=[f"d{i}" for i in range(5)], metadatas=[{"i": i} for i in range(5)])
    store.save(tmp_path / "s")
    return store, tmp_path / "s"


def generation(folder: Path) -> Path:
    return folder / (folder / "CURRENT").read_text().strip()


def header_of(folder: Path) -> dict:
    return json.loads((generation(folder) / "store.json").read_text())


def rewrite_header(folder: Path, **changes) -> None:
    (generation(folder) / "store.json").write_text(json.dumps({**header_of(folder), **changes}))


def test_a_bit_flip_nan_or_reordering_in_a_shard_is_named(saved, tiny_model):
    _, folder = saved
    shard = generation(folder) / "memories-00000.npy"
    pristine = shard.read_bytes()
    flipped = bytearray(pristine)
    flipped[-3] ^= 0x01
    memories = np.load(shard)
    with_nan = memories.copy()
    with_nan[0, 0, 0] = np.nan
    reordered = memories[::-1].copy()
    for corrupt in (bytes(flipped), with_nan, reordered):
        if isinstance(corrupt, bytes):
            shard.write_bytes(corrupt)
        else:
            np.save(shard, corrupt)
        with pytest.raises(StoreError, match="memories-00000.npy is corrupted"):
            MemoryStore.load(folder, tiny_model)
    shard.write_bytes(pristine)
    assert MemoryStore.load(folder, tiny_model).all_ids() == [f"d{i}" for i in range(5)]


def test_swapped_records_or_a_foreign_index_are_named(tiny_model, tmp_path):
    for name in ("a", "b"):
        store = MemoryStore(tiny_model, index="hnsw")
        store.upsert(CORPUS[:4] if name == "a" else CORPUS[2:6], ids=[f"{name}{i}" for i in range(4)])
        store.save(tmp_path / name)
    records = generation(tmp_path / "a") / "records-00000.json"
    swapped = json.loads(records.read_text())
    swapped["ids"][0], swapped["ids"][1] = swapped["ids"][1], swapped["ids"][0]
    original = records.read_text()
    records.write_text(json.dumps(swapped))
    with pytest.raises(StoreError, match="records-00000.json is corrupted"):
        MemoryStore.load(tmp_path / "a", tiny_model)
    records.write_text(original)
    (generation(tmp_path / "a") / "index.faiss").write_bytes((generation(tmp_path / "b") / "index.faiss").read_bytes())
    with pytest.raises(StoreError, match="index.faiss is corrupted"):
        MemoryStore.load(tmp_path / "a", tiny_model)


def test_a_header_holding_a_number_too_long_to_read_is_named(tiny_model, tmp_path):
    # Python's limit on converting long digit strings raised a bare ValueError naming no file
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:2], ids=["a", "b"])
    store.save(tmp_path / "s")
    header = generation(tmp_path / "s") / "store.json"
    header.write_text(header.read_text().replace('"count": 2', '"count": 1' + "0" * 5000))
    with pytest.raises(StoreError, match="store.json is corrupted: Exceeds the limit"):
        MemoryStore.load(tmp_path / "s", tiny_model)


@pytest.mark.parametrize("pointer", ["../b/gen-000001", "/tmp/gen-000001", "gen-1", "gen-000001/../../b"])
def test_current_never_leads_outside_the_store(saved, tiny_model, pointer):
    _, folder = saved
    (folder / "CURRENT").write_text(pointer + "\n")
    with pytest.raises(StoreError, match="not a generation folder"):
        MemoryStore.load(folder, tiny_model)


@pytest.mark.parametrize("field", ["memory_shards", "record_shards"])
@pytest.mark.parametrize("entry", [{"file": "../memories-00000.npy"}, {"file": "/etc/passwd"}, {"file": 7},
                                   {"file": "sub/memories-00000.npy"}, {"file": "index.faiss"},
                                   {"file": "the other field's"}, {"rows": None}, {"rows": -1}, {"rows": True},
                                   "records-00000.json"])
def test_a_shard_entry_names_its_own_file_in_the_generation(saved, tiny_model, field, entry):
    """Shard entries must name the field's own numbered file: a path outside the generation, or
    another store file (whose checksum matches, so it would be read as this shard), is refused."""
    _, folder = saved
    shards = header_of(folder)[field]
    if entry == {"file": "the other field's"}:
        entry = {"file": header_of(folder)["record_shards" if field == "memory_shards" else "memory_shards"][0]["file"]}
    shards[0] = {**shards[0], **entry} if isinstance(entry, dict) else entry
    rewrite_header(folder, **{field: shards})
    with pytest.raises(StoreError, match=f"as shard 0 of {field}, which is not"):
        MemoryStore.load(folder, tiny_model)


def test_record_shards_split_unlike_the_memory_shards_are_refused(tiny_model, tmp_path, monkeypatch):
    """A save links record shards by the memory shards' rows; other splits would pair texts with
    the wrong memories after the next save."""
    monkeypatch.setattr("clara_plugins.store_folder.SHARD_ROWS", 2)
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:4], ids=[f"d{i}" for i in range(4)])
    folder = tmp_path / "s"
    store.save(folder)
    first, second = (json.loads((generation(folder) / f"records-0000{n}.json").read_text()) for n in (0, 1))
    merged = {field: first[field] + second[field][:1] for field in first}  # 3 rows, then 1
    (generation(folder) / "records-00000.json").write_text(json.dumps(merged))
    (generation(folder) / "records-00001.json").write_text(json.dumps({f: v[1:] for f, v in second.items()}))
    header = header_of(folder)
    header["record_shards"] = [{"file": "records-00000.json", "rows": 3}, {"file": "records-00001.json", "rows": 1}]
    for name in ("records-00000.json", "records-00001.json"):
        header["sha256"][name] = hashlib.sha256((generation(folder) / name).read_bytes()).hexdigest()
    rewrite_header(folder, **header)
    with pytest.raises(StoreError, match="record shards do not hold the memory shards' rows"):
        MemoryStore.load(folder, tiny_model)


MALFORMED = {"current-is-a-folder": "CURRENT", "records-not-a-dict": "does not hold ids, texts and metadatas",
             "header-not-a-dict": "is not a store header", "no-checksums": "lists no checksums",
             # a bare KeyError, and an unknown index named without its file
             "no-count": "store.json lacks count: not a whole store header",
             "unknown-index": "store.json gives the index 'annoy'",
             # a bare TypeError and KeyError: the header is the one file no checksum covers
             "compressor-not-a-dict": "compressor signature is not one this library writes",
             "fingerprint-without-norms": "base model fingerprint is malformed",
             "fingerprint-of-nulls": "base model fingerprint is malformed",  # a bare RuntimeError from torch
             # files whose checksums the header (written alike) vouches for: a bare RecursionError, a
             # TypeError at the load or a later search, an id a delete left stored, an AssertionError
             "header-nested-deep": "store.json nests its JSON deeper than Python can read",
             "records-of-other-types": "records-00000.json: record 1 is not an id and a text",
             "records-naming-an-id-twice": "the records name an id twice",
             "memories-of-another-shape": "memory shards hold rows of another shape than this model's"}


def replace_checked_file(folder: Path, name: str, data: bytes) -> None:
    """A generation's file rewritten with the checksum its header gives it."""
    (generation(folder) / name).write_bytes(data)
    header = header_of(folder)
    header["sha256"][name] = hashlib.sha256(data).hexdigest()
    rewrite_header(folder, sha256=header["sha256"])


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_malformed_files_give_a_store_error(saved, tiny_model, damage):
    _, folder = saved
    if damage == "current-is-a-folder":
        (folder / "CURRENT").unlink()
        (folder / "CURRENT").mkdir()
    elif damage == "records-not-a-dict":
        replace_checked_file(folder, "records-00000.json", b"[1, 2]")
    elif damage == "header-nested-deep":
        (generation(folder) / "store.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    elif damage in ("records-of-other-types", "records-naming-an-id-twice"):
        records = json.loads((generation(folder) / "records-00000.json").read_text())
        records["ids"][1] = ["d1"] if damage == "records-of-other-types" else "d0"
        replace_checked_file(folder, "records-00000.json", json.dumps(records).encode())
    elif damage == "memories-of-another-shape":
        memories = np.load(generation(folder) / "memories-00000.npy")
        with io.BytesIO() as written:
            np.save(written, np.concatenate([memories, memories[..., :1]], axis=-1))
            replace_checked_file(folder, "memories-00000.npy", written.getvalue())
    elif damage == "header-not-a-dict":
        (generation(folder) / "store.json").write_text('"a string"')
    elif damage == "no-count":
        header = header_of(folder)
        del header["count"]
        (generation(folder) / "store.json").write_text(json.dumps(header))
    elif damage == "unknown-index":
        rewrite_header(folder, index="annoy")
    elif damage == "compressor-not-a-dict":
        rewrite_header(folder, compressor="smollm2")
    elif damage in ("fingerprint-without-norms", "fingerprint-of-nulls"):
        compressor = header_of(folder)["compressor"]
        fingerprint = compressor["base_model_fingerprint"]
        if damage == "fingerprint-of-nulls":
            fingerprint["weight_norms"] = [None]
        else:
            del fingerprint["weight_norms"]
        rewrite_header(folder, compressor=compressor)
    else:
        header = header_of(folder)
        del header["sha256"]
        (generation(folder) / "store.json").write_text(json.dumps(header))
    with pytest.raises(StoreError, match=MALFORMED[damage]):
        MemoryStore.load(folder, tiny_model)


def test_files_claiming_more_than_memory_holds_give_a_store_error(saved, tmp_path, monkeypatch):
    # a header claiming 4 TiB of values (an .npy file's, a faiss index's): a bare MemoryError
    with io.BytesIO() as written:
        np.save(written, np.zeros(4, dtype=np.float32))
        (tmp_path / "index-centre.npy").write_bytes(written.getvalue().replace(b"(4,)", b"(1099511627776,)"))
    with pytest.raises(StoreError, match="index-centre.npy is missing or corrupted: Unable to allocate"):
        store_folder._read_array(tmp_path / "index-centre.npy", np.float32)

    def claims_too_much(path):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(store_folder.faiss, "read_index", claims_too_much)
    with pytest.raises(StoreError, match="index.faiss is corrupted: faiss could not read it"):
        store_folder.read_index(tmp_path, 5, None)


def test_a_save_waiting_its_turn_writes_what_the_store_holds_when_its_turn_comes(saved, tiny_model, monkeypatch):
    # the snapshot was taken before the wait: a write made meanwhile, and saved by another
    # writer, was undone by the waiting save's older snapshot
    store, folder = saved
    flock, asked = fcntl.flock, threading.Event()

    def flock_of_the_save(handle, operation):
        if threading.current_thread() is not threading.main_thread():
            asked.set()  # the save asks for its turn now, and waits
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock_of_the_save)
    with open(folder / ".lock", "a") as lock:
        flock(lock, fcntl.LOCK_EX)  # another writer's turn
        waiting = threading.Thread(target=store.save, args=(folder,))
        waiting.start()
        assert asked.wait(timeout=60)
        store.upsert(["A passage written while the save waited."], ids=["late"])
        flock(lock, fcntl.LOCK_UN)
    waiting.join()
    assert "late" in MemoryStore.load(folder, tiny_model).all_ids()


def test_two_threads_saving_one_store_at_once_both_succeed(saved, tiny_model):
    store, folder = saved
    errors = []

    def save_many():
        try:
            for _ in range(5):
                store.save(folder)
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    writers = [threading.Thread(target=save_many) for _ in range(2)]
    for writer in writers:
        writer.start()
    loads = 0
    while any(writer.is_alive() for writer in writers):
        assert MemoryStore.load(folder, tiny_model).all_ids() == store.all_ids()
        loads += 1
    for writer in writers:
        writer.join()
    assert not errors and loads > 0
    assert not list(folder.glob(".staging-*"))


def test_repeated_kills_during_saves_always_leave_a_loadable_store(saved, tiny_model, tmp_path):
    store, folder = saved
    tiny_model.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        from clara_plugins import ClaraModel, MemoryStore
        model = ClaraModel.from_pretrained({str(tmp_path / 'ckpt')!r}, device="cpu")
        store = MemoryStore.load({str(folder)!r}, model)
        round = 0
        while True:  # each save changes a document: a torn one would pair a text with another's memory
            round += 1
            store.upsert([f"round {{round}}"], ids=["extra"])
            store.save({str(folder)!r})
            print("saved", flush=True)
    """)
    for delay in (0.0, 0.02, 0.1):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "saved"  # the kill falls among saves
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        survivor = MemoryStore.load(folder, tiny_model)
        assert survivor.all_ids() == store.all_ids() + ["extra"]
        assert np.array_equal(survivor.memories(["d3"]).numpy(), store.memories(["d3"]).numpy())
        [extra] = survivor.get(["extra"])
        fresh = MemoryStore(tiny_model)
        fresh.upsert([extra.text], ids=["extra"])
        assert np.array_equal(survivor.memories(["extra"]).numpy(), fresh.memories(["extra"]).numpy())


@pytest.mark.parametrize("metadata", [{"pair": (1, 2)}, {1: "int key"}, {"x": float("nan")}, {"x": float("inf")},
                                      {"x": {1, 2}}])
def test_metadata_that_json_would_change_is_refused_at_insert(saved, metadata):
    store, _ = saved
    before = store.all_ids()
    with pytest.raises(InvalidInputError, match="metadata of 'new'"):
        store.upsert(["A new text."], ids=["new"], metadatas=[metadata])
    assert store.all_ids() == before


def test_metadata_round_trips_exactly(saved, tiny_model):
    store, folder = saved
    metadata = {"title": "Ünïcode", "year": 1889, "score": 0.5, "tags": ["a", "b"], "nested": {"k": [1, None]}}
    store.upsert(["A new text."], ids=["new"], metadatas=[metadata])
    store.save(folder)
    reloaded = MemoryStore.load(folder, tiny_model)
    assert reloaded.get(["new"])[0].metadata == metadata
    assert [d.id for d in reloaded.get(reloaded.all_ids()) if d.metadata.get("year") == 1889] == ["new"]


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damage", ["adapter-missing", "adapter-empty", "adapter-nan", "config-string-rate"])
def test_incomplete_or_damaged_checkpoints_are_refused(tiny_model, tmp_path, damage):
    import torch
    from safetensors.torch import load_file, save_file

    from clara_plugins import CheckpointError, ClaraModel

    folder = tmp_path / "ckpt"
    tiny_model.save_pretrained(folder)
    adapter = folder / "adapter_decoder_adapter.safetensors"
    if damage == "adapter-missing":
        adapter.unlink()
    elif damage == "adapter-empty":
        save_file({}, str(adapter))
    elif damage == "adapter-nan":
        state = load_file(str(adapter))
        first = sorted(state)[0]
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(adapter))
    else:
        header = json.loads((folder / "clara_config.json").read_text())
        header["config"]["compression_rate"] = "16"
        (folder / "clara_config.json").write_text(json.dumps(header))
    message = {"adapter-missing": "is missing", "adapter-empty": "is empty", "adapter-nan": "NaN",
               "config-string-rate": "compression_rate must be an int"}[damage]
    with pytest.raises(CheckpointError, match=message):
        ClaraModel.from_pretrained(folder, device="cpu")


def test_an_apple_checkpoint_without_adapters_is_refused(tiny_tokens_model, tiny_base, tmp_path):
    import torch

    from clara_plugins import CheckpointError
    from clara_plugins.apple import load_apple_checkpoint
    from test_apple import write_apple_checkpoint

    write_apple_checkpoint(tiny_tokens_model, tmp_path / "apple")
    torch.save({}, tmp_path / "apple" / "adapters.pth")
    with pytest.raises(CheckpointError, match="holds no adapter"):
        load_apple_checkpoint(tmp_path / "apple", base_model=str(tiny_base), device="cpu")


# ------------------------------------------------------------------------------- bad types


@pytest.mark.parametrize("k", ["2", None, True, 1.5, 0])
def test_a_bad_k_is_named(saved, k):
    store, _ = saved
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        store.search("Where is Paris?", k=k)


def test_bad_texts_keys_and_filters_are_named(saved):
    store, _ = saved
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        store.upsert(["half a pair \ud800 here"])
    with pytest.raises(InvalidInputError, match="the search key has 3 values"):
        store.search_by_key(np.ones(3), k=2)
    deep: dict = {"i": 1}
    for _ in range(3000):
        deep = {"$and": [deep]}
    with pytest.raises(ValueError, match="at most 32 levels"):
        store.search("Where is Paris?", k=2, where=deep)
    assert store.all_ids() == [f"d{i}" for i in range(5)]


def test_a_save_that_fails_midway_leaves_no_half_written_copy(saved, tiny_model, monkeypatch):
    # a disk full mid-save left its staging folder, gigabytes for a large index, until the next save
    store, folder = saved
    store.upsert(["Vienna lies on the Danube."], ids=["new"])

    def disk_full(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_folder, "_write_array", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save(folder)
    assert not list(folder.glob(".staging-*")) and len(MemoryStore.load(folder, tiny_model)) == len(store) - 1


def test_a_load_outrun_by_saves_stops_with_a_clear_error(saved, tiny_model, monkeypatch):
    # it started over for as long as a writer kept saving (clara index with a small --save-every)
    _, folder = saved
    names = iter(f"gen-{n:06d}" for n in range(100, 200))
    monkeypatch.setattr(store_folder, "current_generation", lambda folder: next(names))
    monkeypatch.setattr(MemoryStore, "_open_generation", classmethod(lambda *a: (_ for _ in ()).throw(
        FileNotFoundError("removed by a save"))))
    with pytest.raises(StoreError, match="was saved 5 times over while it was read"):
        MemoryStore.load(folder, tiny_model)


def test_a_save_elsewhere_meanwhile_never_makes_a_later_save_link_stale_shards(tiny_model, tmp_path, monkeypatch):
    # a save to B while a save to A wrote, with a change between, numbered the store's rows anew
    # (read from B's files); A's save then recorded the old numbering, and A's next save linked
    # the shard of the old d0 in place of the new one
    monkeypatch.setattr(store_folder, "SHARD_ROWS", 2)
    store = MemoryStore(tiny_model)
    store.upsert(CORPUS[:4], ids=[f"d{i}" for i in range(4)])
    store.save(tmp_path / "a")
    write = store_folder.write_generation

    def meanwhile(folder, *args):
        if folder == tmp_path / "a" and not (tmp_path / "b").exists():
            store.upsert(["Vienna lies on the Danube."], ids=["d0"])
            store.save(tmp_path / "b")
        return write(folder, *args)

    monkeypatch.setattr(store_folder, "write_generation", meanwhile)
    store.save(tmp_path / "a")
    store.save(tmp_path / "a")
    loaded = MemoryStore.load(tmp_path / "a", tiny_model)
    assert loaded.get(["d0"])[0].text == "Vienna lies on the Danube."
    assert torch.equal(loaded.memories(loaded.all_ids()), store.memories(loaded.all_ids()))


def test_a_store_saved_to_a_second_folder_keeps_reading_its_own(saved, tmp_path):
    # a backup's folder became the files the store read: removing the backup held its disk space
    store, folder = saved
    store.save(tmp_path / "backup")
    assert all(Path(chunk.filename).is_relative_to(folder) for chunk in store._memory_chunks)


def test_a_store_whose_saved_files_cannot_be_mapped_keeps_its_rows_in_ram(tiny_model, tmp_path, monkeypatch):
    # the memories were mapped before the scales and keys were read: a failure between left rows
    # numbered for the files, read from RAM
    store = MemoryStore(tiny_model, memory_dtype="int8")
    store.upsert(CORPUS[:3], ids=["d0", "d1", "d2"])
    before = store.memories(["d0", "d1", "d2"])
    read = store_folder.read_shards
    calls = iter(range(100))
    monkeypatch.setattr(store_folder, "read_shards", lambda *a: read(*a) if next(calls) != 1 else (_ for _ in ()).throw(
        OSError(12, "Cannot allocate memory")))
    store.save(tmp_path / "s")
    assert torch.equal(store.memories(["d0", "d1", "d2"]), before)
    assert not any(isinstance(chunk, np.memmap) for chunk in store._memory_chunks)
    assert len(MemoryStore.load(tmp_path / "s", tiny_model)) == 3
