"""Corpus compression on Ray: the in-process path's memories, resumable, from the command line."""

import functools
import logging
import sys
import threading
import time

import pytest
import ray  # the [ray] extra, in [dev]: a broken install fails here, it does not skip
import torch
from conftest import CORPUS, randomize_adapters

from clara_plugins import ClaraModel, InvalidInputError, MemoryStore, StoreError
from clara_plugins.cli import main
from clara_plugins.corpora import document_id
from clara_plugins.indexing import RayCompression, index_documents

# Documents of different lengths: batches need padding, on which the last bits of memories depend
TEXTS = [f"{CORPUS[i % len(CORPUS)]} Note {i}." + " More words." * (i % 9) for i in range(40)]
IDS = [document_id(text) for text in TEXTS]


@pytest.fixture(scope="module")
def local_ray():
    """One 2-CPU Ray instance for the tests that reuse a running Ray."""
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture
def on_ray(tiny_model, tmp_path):
    """Ray settings whose actors load the tiny model from a checkpoint."""
    tiny_model.save_pretrained(tmp_path / "ckpt")
    load = functools.partial(ClaraModel.from_pretrained, tmp_path / "ckpt", device="cpu")
    return functools.partial(RayCompression, load)


def test_clara_index_on_ray_leaves_ray_as_it_found_it(tiny_model, tmp_path, capsys):
    # run first in this file, Ray is not running: the command starts its own instance and stops it;
    # after the tests that share a running Ray, it uses that one and leaves it running
    was_running = ray.is_initialized()
    tiny_model.save_pretrained(tmp_path / "ckpt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS[:6]))
    arguments = ["index", str(corpus), "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--save-every", "4"]
    main([*arguments, "--store", str(tmp_path / "here")])
    main([*arguments, "--store", str(tmp_path / "there"), "--ray"])
    assert ray.is_initialized() == was_running
    assert capsys.readouterr().out.count("6 documents (6 compressed now, 0 already stored)") == 2
    here, there = (MemoryStore.load(tmp_path / name, tiny_model) for name in ("here", "there"))
    assert torch.equal(there.memories(IDS[:6]), here.memories(IDS[:6]))
    main([*arguments, "--store", str(tmp_path / "there"), "--ray"])  # all stored: Ray does not even start
    assert "6 documents (0 compressed now, 6 already stored)" in capsys.readouterr().out


def test_a_failed_save_stops_the_ray_the_run_started_at_once(tiny_model, on_ray):
    # a traceback kept (as a notebook keeps the last one) held the run's generator, and Ray ran on
    assert not ray.is_initialized()  # the run starts its own

    def save():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as caught:
        index_documents(MemoryStore(tiny_model), TEXTS[:4], IDS[:4], save=save, on_ray=on_ray(workers=1))
    assert caught.value is not None and not ray.is_initialized()


def test_ray_gives_the_memories_of_the_in_process_path(local_ray, tiny_model, tmp_path):
    # rows were stored in the order the actors finished their groups: another calibration of
    # relevance scores, other ivfpq training rows, other ties than the in-process path's
    tiny_model.save_pretrained(tmp_path / "ckpt")

    def first_group_last():  # an actor's model, slow on the first group
        model = ClaraModel.from_pretrained(tmp_path / "ckpt", device="cpu")
        compress = model.compress
        model.compress = lambda texts, *a, **k: time.sleep(TEXTS[0] in texts and 3) or compress(texts, *a, **k)
        return model

    here, there = MemoryStore(tiny_model), MemoryStore(tiny_model)
    metadatas = [{"position": i} for i in range(len(TEXTS))]
    assert index_documents(here, TEXTS, IDS, metadatas, save_every=7) == IDS
    saved = []
    assert index_documents(there, TEXTS, IDS, metadatas, save=lambda: saved.append(there.all_ids()), save_every=7,
                           on_ray=RayCompression(first_group_last, workers=2)) == IDS
    assert ray.is_initialized()  # a Ray the caller started stays running
    assert there.all_ids() == IDS and there.get(IDS) == here.get(IDS)
    assert saved[0] == IDS[:7]  # each save holds the groups before it
    assert torch.equal(there.memories(IDS), here.memories(IDS))


def test_the_documents_ray_cut_are_warned_of_once_by_the_run(local_ray, tiny_model, on_ray):
    # each actor warned of its group's in its own log, which Ray printed over the progress bar
    import warnings

    long = " ".join(CORPUS * 3)
    texts = [f"{long} {i}" if i % 2 else CORPUS[i] for i in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index_documents(MemoryStore(tiny_model), texts, [document_id(t) for t in texts], save_every=2,
                        on_ray=on_ray(workers=1))
    cut = [str(w.message).split(";")[0] for w in caught if "doc_max_length" in str(w.message)]
    assert cut == ["3 of 6 documents exceed doc_max_length=64 tokens"]


def test_a_resumed_run_compresses_only_what_is_not_stored(local_ray, tiny_model, on_ray):
    store = MemoryStore(tiny_model)
    store.upsert(TEXTS[:30], IDS[:30])
    saves = []
    texts, ids = TEXTS + TEXTS[35:], IDS + IDS[35:]  # repeated documents are indexed once
    new = index_documents(store, texts, ids, save=lambda: saves.append(len(store)), save_every=4,
                          on_ray=on_ray(workers=1))
    assert sorted(new) == sorted(IDS[30:]) and len(store) == len(TEXTS)
    assert saves == [34, 38, 40]  # groups of 4, 4 and 2


def test_each_group_is_saved_as_it_comes_however_many_groups_there_are(local_ray, tiny_model, on_ray, monkeypatch):
    # past Ray's least number of blocks (200) a block held several groups, upserted and saved together
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "read_op_min_num_blocks", 2)
    saves = []
    index_documents(MemoryStore(tiny_model), TEXTS, IDS, save=lambda: saves.append(1), save_every=4,
                    on_ray=on_ray(workers=1))
    assert len(saves) == len(TEXTS) // 4


def test_workers_of_another_compressor_are_refused(local_ray, tiny_config, tiny_model, tmp_path):
    other = ClaraModel(tiny_config, device="cpu")
    randomize_adapters(other, seed=1)
    other.save_pretrained(tmp_path / "other")
    load = functools.partial(ClaraModel.from_pretrained, tmp_path / "other", device="cpu")
    with pytest.raises(StoreError) as caught:  # as raised in the actor, not a screen of Ray's traceback
        index_documents(MemoryStore(tiny_model), TEXTS[:4], IDS[:4], on_ray=RayCompression(load, workers=1))
    assert str(caught.value).startswith("the store was written by another compressor") and "\n" not in str(caught.value)
    assert "a Ray worker's model compresses otherwise than this process's" in str(caught.value)


def test_bad_ray_settings_are_refused_before_any_work(local_ray, tiny_model, on_ray, tmp_path, monkeypatch):
    store = MemoryStore(tiny_model)
    with pytest.raises(InvalidInputError, match="3 workers need 3 CPUs; the Ray cluster has 2"):
        index_documents(store, TEXTS[:4], IDS[:4], on_ray=on_ray(workers=3))
    with pytest.raises(InvalidInputError, match="workers must be a positive integer"):
        on_ray(workers=0)
    with pytest.raises(InvalidInputError, match="save_every must be a positive integer"):
        index_documents(store, TEXTS[:4], IDS[:4], save_every=0)
    with pytest.raises(InvalidInputError, match="metadata of"):
        index_documents(store, TEXTS[:2], IDS[:2], [{"pair": (1, 2)}, {}], on_ray=on_ray())
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    with pytest.raises(ImportError, match=r"clara-plugins\[ray\]"):
        index_documents(store, TEXTS[:4], IDS[:4], on_ray=on_ray())
    assert len(store) == 0


def test_workers_without_ray_is_a_usage_error(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS[0])
    with pytest.raises(InvalidInputError, match="give --ray too"):
        main(["--debug", "index", str(tmp_path / "corpus.txt"), "--store", str(tmp_path / "store"), "--workers", "2"])


def test_ray_workers_load_the_checkpoint_by_its_absolute_path_on_their_own_device(tiny_model, tmp_path, monkeypatch):
    # they got the relative path (a worker starts in another folder) and cuda:1 (a worker sees its GPU as cuda:0)
    from clara_plugins import cli

    tiny_model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    args = cli._build_parser("index").parse_args(["index", "corpus.txt", "--store", "s", "--checkpoint", "ckpt",
                                          "--device", "cuda:1", "--ray"])
    load = cli._load_on_workers(args)
    assert load.args == (str(tmp_path / "ckpt"),) and load.keywords["device"] == "cuda"


def test_a_group_that_kills_its_actor_stops_the_run_after_a_few_tries(local_ray, tiny_model, tmp_path):
    # Ray restarted a dead actor and retried its group without end: the run hung
    tiny_model.save_pretrained(tmp_path / "ckpt")
    checkpoint = str(tmp_path / "ckpt")

    def load():  # an actor that dies, as out of memory, on the group holding "POISON"
        import os

        model = ClaraModel.from_pretrained(checkpoint, device="cpu")
        compress = model.compress
        model.compress = lambda texts, *a, **k: os._exit(1) if any("POISON" in t for t in texts) else compress(
            texts, *a, **k)
        return model

    store, saves, raised = MemoryStore(tiny_model), [], []
    texts = TEXTS[:8] + ["POISON " + TEXTS[8]]
    ids = [document_id(text) for text in texts]

    def run():
        try:
            index_documents(store, texts, ids, save=lambda: saves.append(len(store)), save_every=4,
                            on_ray=RayCompression(load, workers=1))
        except ray.exceptions.RayError as error:
            raised.append(error)

    running = threading.Thread(target=run, daemon=True)  # without the fix it never returns: fail, not hang
    running.start()
    running.join(timeout=300)
    assert not running.is_alive() and raised
    assert saves and saves[-1] == len(store) and set(store.all_ids()) <= set(ids[:8])  # what was saved stays

