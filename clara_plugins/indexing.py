"""Indexing a corpus into a memory store: resumable, compressed in this process or on Ray.

``index_documents`` skips the ids a store already holds and upserts the rest in groups,
saving after each, so that a stopped run resumes from its last save. Each group is
compressed by the store's own model, or, given a ``RayCompression``, by one of a pool of Ray
actors that each load the same model once (one GPU each when the cluster has GPUs). An actor
compresses a whole group as ``upsert`` does (``compress_in_parts``), so the store
receives the same fp16 memories either way (through ``upsert(..., memories=...)``) on the
same device and dtype: a document's padding, and so the last bit of its memories, depends on
its batch.

Ray comes from the ``[ray]`` extra and is imported only when a corpus is compressed on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .base_store import BaseMemoryStore
from .checkpoint import check_compressor, compressor_signature
from .checks import check_positive_int
from .errors import InvalidInputError
from .model import ClaraModel, compress_in_parts, cuts_warned_once, report_cuts, tallied_cuts

_GROUP_TRIES = 3  # a group whose actor died this often stops the run (the groups saved before stay)


@dataclasses.dataclass(frozen=True)
class RayCompression:
    """Where and how a corpus is compressed on Ray.

    ``load_model`` runs once in every actor, so it must be picklable (a module-level function
    or a ``functools.partial`` of one) and find its checkpoint on every node. ``address`` is
    ``ray.init``'s: ``"local"`` starts a Ray instance on this machine for the run and stops
    it afterwards; ``"auto"`` or ``"ray://host:10001"`` reach a running cluster. A process
    already connected to Ray keeps its connection. ``workers`` is the number of actors
    (default: one per GPU, else one per CPU the cluster has), each taking one group of
    ``save_every`` documents at a time: a corpus of fewer groups leaves the others unstarted.
    ``use_gpus=False`` keeps them on CPUs even where GPUs are.
    """

    load_model: Callable[[], ClaraModel]
    address: str = "local"
    workers: int | None = None
    use_gpus: bool = True

    def __post_init__(self) -> None:
        if self.workers is not None:
            check_positive_int("workers", self.workers)


def index_documents(
    store: BaseMemoryStore,
    texts: Sequence[str],
    ids: Sequence[str],
    metadatas: Sequence[dict[str, Any]] | None = None,
    *,
    save: Callable[[], object] | None = None,
    save_every: int = 1024,
    on_ray: RayCompression | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Compress and upsert the documents whose ids the store lacks; returns those ids.

    Ids must be stable for a resumed run to skip what is stored (``clara index`` uses the
    texts' SHA-256); a repeated id is indexed once, with its first text. ``save`` runs after
    every ``save_every`` documents (``MemoryStore``: ``lambda: store.save(folder)``; a Milvus
    store keeps what it is given and needs none). Everything is validated before any
    compression starts.
    """
    check_positive_int("save_every", save_every)
    if ids is None:  # the store would draw fresh ids, and a resumed run store everything again
        raise InvalidInputError("index_documents needs the documents' ids, stable across runs "
                                "(clara index uses clara_plugins.corpora.document_id)")
    if isinstance(texts, (list, tuple)) and not texts:  # nothing new to index (`not texts` of a pandas Series failed)
        return []
    # every row checked before any compression; each group's metadata is copied as it is stored
    # (the checked copies, held for the run, cost about 400 bytes a document)
    texts, ids, _ = store._checked(texts, ids, metadatas)
    metadatas = None if metadatas is None else list(metadatas)
    first: dict[str, int] = {}  # each id once: its first row
    for row, doc_id in enumerate(ids):
        first.setdefault(doc_id, row)
    stored = store.stored_ids(list(first))
    todo = [row for doc_id, row in first.items() if doc_id not in stored]
    groups = [todo[start:start + save_every] for start in range(0, len(todo), save_every)]
    # Ray compresses each group as upsert does here (compress_in_parts): the same batches, the same memories
    compressed = ((group, None) for group in groups) if on_ray is None else _compressed_on_ray(
        store, texts, groups, on_ray)
    # closed on a failed save too: a traceback kept (as a notebook keeps it) held Ray and its actors running;
    # the cut documents of every group told once, after the bar
    with cuts_warned_once(store.model.config.doc_max_length, stacklevel=2), \
            tqdm(total=len(todo), desc="indexing", unit="doc", disable=not show_progress) as progress, \
            contextlib.closing(compressed):
        for rows, memories in compressed:
            # compressed here: a bar of its batches too, as a group of 1,024 takes minutes on a CPU
            store.upsert([texts[r] for r in rows], [ids[r] for r in rows],
                         None if metadatas is None else [metadatas[r] for r in rows],
                         memories=memories, show_progress=show_progress and memories is None)
            if save is not None:
                save()
            progress.update(len(rows))
    return [ids[r] for r in todo]


def _compressed_on_ray(
    store: BaseMemoryStore, texts: list[str], groups: list[list[int]], options: RayCompression,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, fp16 memories) of the groups of rows, each compressed by one actor in one call,
    in the groups' order: a group that finishes early waits for those before it, so that the
    store holds its rows in the order the in-process path upserts them (which fixes its
    relevance calibration, an ivfpq index's training rows, the order of tied scores)."""
    if not groups:
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, logging_level=logging.WARNING)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if options.use_gpus else 0
        available = gpus or max(1, int(resources.get("CPU", 1)))
        workers = options.workers or available
        if workers > available:
            raise InvalidInputError(f"{workers} workers need {workers} {'GPUs' if gpus else 'CPUs'}; the Ray "
                                    f"cluster has {available}")
        # a block a group: Ray's blocks (at least 200) held several groups each above 200, saved together
        dataset = ray.data.from_items([{"rows": group, "texts": [texts[r] for r in group]} for group in groups],
                                      override_num_blocks=len(groups))
        compressed = dataset.map_batches(
            _Compressor, batch_size=1, num_cpus=1, num_gpus=1 if gpus else 0,
            # Ray retries a group whose actor died forever: one that kills every actor hung the run
            max_task_retries=_GROUP_TRIES - 1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(groups))),  # no actor without a group
            fn_constructor_kwargs={"load_model": options.load_model, "batch_size": store.batch_size,
                                   "signature": compressor_signature(store.model)},
        )
        # this run's settings: the groups in their order, an actor's error not wrapped in UserCodeException
        compressed.context.execution_options.preserve_order = True
        compressed.context.raise_original_map_exception = True
        try:
            for batch in compressed.iter_batches(batch_size=None, batch_format="numpy"):  # blocks as they come
                report_cuts(batch["cut"].tolist(), store.model.config.doc_max_length, stacklevel=2)
                yield batch["row"].tolist(), torch.tensor(batch["memories"])  # a copy: Ray's arrays are read-only
        except ray.exceptions.RayTaskError as error:  # an actor's error, as the in-process path raises it
            if not isinstance(error.cause, Exception) or isinstance(error.cause, ray.exceptions.RayError):
                raise  # a Ray before raise_original_map_exception: its own
            # a screen of remote traceback in Ray's colours, below which Ray adds its retry advice
            error.cause.args = (str(error.cause).partition("\n")[0],)
            raise error.cause from None
    finally:
        if started:
            ray.shutdown()


_WORKER_REMEDY = ("a Ray worker's model compresses otherwise than this process's: every node must load the same "
                  "checkpoint files (an untrained --base-model signs otherwise in each dtype: save it first and name "
                  "--checkpoint DIR)")


class _Compressor:
    """A Ray actor's model, loaded once: it compresses group after group as the store's would.
    A model that fails to load, or is refused, fails the first group: Ray gives the error of a
    group back as raised, and that of an actor's start only as the text of its death."""

    def __init__(self, load_model: Callable[[], ClaraModel], batch_size: int, signature: dict) -> None:
        self.batch_size, self.problem = batch_size, None
        try:
            self.model = load_model()
            # memories from another compressor would sit in the store unnoticed: refuse them
            check_compressor(signature, compressor_signature(self.model), "the store", remedy=_WORKER_REMEDY)
        except Exception as error:
            self.problem = error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One group in (batch_size=1), one row per document out."""
        if self.problem is not None:
            raise self.problem
        (rows,), (texts,) = batch["rows"], batch["texts"]
        with tallied_cuts() as cut:  # told by the driver, once for the run (a warning a group in the actor's log)
            memories = compress_in_parts(self.model, texts.tolist(), self.batch_size)
        return {"row": rows, "memories": memories, "cut": np.asarray(cut, dtype=np.int64)}


def import_ray() -> Any:
    """Ray with Ray Data, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError('compressing on Ray needs Ray Data: pip install "clara-plugins[ray]"') from error
    return ray
