"""The folder a MemoryStore saves to: generations of shards, written aside and made current
with one rename.

A store folder holds generations. ``CURRENT`` names the live one; each generation holds
``store.json`` (format, memory dtype, compressor signature, shard lists), ``records-*.json``
shards (ids, texts, metadata), ``memories-*.npy`` shards (memory-mappable; with ``scales-*.npy``
for int8) and, for approximate indexes, faiss's own ``index.faiss`` (with the compact index's
``index-centre.npy`` and ``index-projection.npy``). Stores of format 2 (one ``records.json``)
still load; format 1's (before int8 memories) signed their compressor as no version since
does, and are refused by name. A save writes a new generation aside and then flips
``CURRENT`` with one atomic rename, so a crash mid-save leaves the previous generation
loadable, and readers of the previous generation keep working while a writer saves. Shards
whose rows are unchanged since the store's last save or load are hard-linked from that
generation, not written again: files in a generation are never changed once written. Writers
take turns (a lock file); ``store.json`` holds the SHA-256 of every other file, checked at load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
from numpy.typing import DTypeLike
from tqdm.auto import tqdm

from .atomic import hold_lock, sync_entry, sync_tree, write_text_atomically
from .compact import CompactIndex
from .config import INDEX_KINDS, MEMORY_DTYPES
from .errors import StoreError
from .jsonfiles import read_json, write_json

FORMAT = "clara-memory-store/3"
FORMAT_2 = "clara-memory-store/2"  # every record in one records.json, written again at each save
FORMAT_1 = "clara-memory-store/1"  # its compressor signature hashed fp32 weights: refused
SHARD_ROWS = 4096  # rows per file on disk, and per batch when keys are computed
PROGRESS_ROWS = 50_000  # a store of this many rows shows progress as it builds its index or saves
_GENERATION_NAME = r"gen-(\d{6}|[1-9]\d{6,})"  # six digits, more from the millionth save on
_GENERATION = re.compile(f"^{_GENERATION_NAME}$")
_STORE_ENTRY = re.compile(rf"^({_GENERATION_NAME}|\.staging-[0-9a-f]{{32}}|\.lock|\.CURRENT(\.[0-9a-f]{{16}})?\.(tmp|new))$")  # besides CURRENT
_STORE_FILE = re.compile(r"^(records(-\d{5})?\.json|index\.faiss|index-(centre|projection)\.npy|"
                         r"(memories|scales|keys)-\d{5}\.npy)$")
# header field: the names of its shard files
_SHARD_FILES = {"memory_shards": "memories-{:05d}.npy", "scale_shards": "scales-{:05d}.npy",
                "key_shards": "keys-{:05d}.npy", "record_shards": "records-{:05d}.json"}



@contextlib.contextmanager
def writer_turn(folder: Path) -> Iterator[None]:
    """Writers of one store folder take turns: the lock file ``.lock`` in it."""
    with hold_lock(folder / ".lock"):
        yield


def write_generation(folder: Path, snapshot: Snapshot, previous: SavedGeneration | None, index: SavedIndex | None,
                     settings: dict) -> tuple[Path, dict]:
    """Write ``snapshot`` as the folder's next generation and make it current; returns it and
    its header. ``settings`` (index kind, compressor and key signatures, memory dtype) go into
    the header as given. The caller holds the folder's lock (``writer_turn``)."""
    for leftover in folder.glob(".staging-*"):  # a crashed writer's; no other writer holds the lock
        if _STORE_ENTRY.match(leftover.name):  # only the store's own names, never a file beside it
            shutil.rmtree(leftover, ignore_errors=True)
    if (folder / ".CURRENT.tmp").is_file():  # versions before staging locks wrote CURRENT through it
        (folder / ".CURRENT.tmp").unlink()
    # generations before the current one go first: nothing is left to do once CURRENT names the
    # new one, so a save interrupted there has saved (the store interrupted there does not record
    # it, and refuses its next save as another writer's: load the folder again)
    generations = _generations(folder)  # numbered on from the last, removed or not
    readers_on = current_generation(folder) if (folder / "CURRENT").exists() else None
    for old in (f"gen-{number:06d}" for number in generations):
        # the generation CURRENT names stays for readers still on it, and one holding files a save
        # does not write (a user's notes in it) is the user's
        if old != readers_on and _left_by_a_save(folder / old):
            shutil.rmtree(folder / old, ignore_errors=True)
    staging = folder / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        return _write_staged(folder, staging, snapshot, previous, index, settings, generations)
    except BaseException:  # a disk full mid-way: the half-written copy goes now, not at the next save
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_staged(folder: Path, staging: Path, snapshot: Snapshot, previous: SavedGeneration | None,
                  index: SavedIndex | None, settings: dict, generations: list[int]) -> tuple[Path, dict]:
    """The generation's files written into ``staging``, which is then renamed and made current."""
    checksums: dict[str, str] = {}
    unchanged = previous.unchanged_shards(folder, snapshot.where) if previous is not None else set()
    count = len(snapshot.where)
    fields = {field: count if chunks else 0 for field, chunks in snapshot.chunks.items()}
    with tqdm(total=sum(fields.values()) + count, unit="row", desc="saving the store", leave=None,
              disable=count < PROGRESS_ROWS) as progress:  # about a minute at a million
        header = {
            "format": FORMAT,
            "count": len(snapshot.records["ids"]),
            **settings,
            **{field: _write_shards(staging, field, fields[field], _array_writer(chunks, snapshot.where),
                                    previous, unchanged, checksums, progress)
               for field, chunks in snapshot.chunks.items()},
            "record_shards": _write_shards(staging, "record_shards", count, _records_writer(snapshot.records),
                                           previous, unchanged, checksums, progress),
        }
    if index is not None:
        index.write(staging)
        if index.trained_over is not None:
            header["index_trained_over"] = index.trained_over
    for path in sorted(staging.iterdir()):
        if path.name not in checksums:
            checksums[path.name] = _sha256(path)
    header["sha256"] = dict(sorted(checksums.items()))
    write_json(staging / "store.json", header)
    name = f"gen-{(generations[-1] + 1) if generations else 1:06d}"
    sync_tree(staging)  # its hard links and entries too: CURRENT must never name a generation not on disk
    os.replace(staging, folder / name)
    sync_entry(folder)
    # the folder's own pointer, even where it is a link (a "cp -rs" copy): followed, a save of the
    # copy pointed the original at a generation the original does not hold
    write_text_atomically(folder / "CURRENT", name + "\n", follow_link=False)
    return folder / name, header


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a save writes, taken under the store's lock: each row's (chunk, offset) [rows, 2],
    the chunk lists by header field, and the records."""

    where: np.ndarray
    chunks: dict[str, list[np.ndarray]]
    records: dict[str, list]


@dataclasses.dataclass(frozen=True)
class SavedGeneration:
    """A generation this store wrote or read, and where each of its rows came from then: a
    shard whose rows still come from the same places holds the same bytes."""

    folder: Path
    where: np.ndarray
    shard_rows: list[int]
    checksums: dict[str, str]

    @classmethod
    def of(cls, folder: Path, where: np.ndarray, header: dict) -> "SavedGeneration":
        return cls(folder.resolve(), where, [shard["rows"] for shard in header["memory_shards"]],
                   dict(header["sha256"]))

    def unchanged_shards(self, store_folder: Path, where: np.ndarray) -> set[int]:
        """The full shards of a save of ``where`` into ``store_folder`` that this generation
        already holds."""
        if self.folder.parent != store_folder.resolve():
            return set()
        try:  # the generation may have been removed, and another store's saved under its name
            header = read_json(self.folder / "store.json", StoreError)
        except StoreError:
            return set()
        if not isinstance(header, dict) or header.get("sha256") != self.checksums:
            return set()
        return {number for number, rows in enumerate(self.shard_rows)
                if rows == SHARD_ROWS and (number + 1) * SHARD_ROWS <= len(where)
                and np.array_equal(where[number * SHARD_ROWS:(number + 1) * SHARD_ROWS],
                                   self.where[number * SHARD_ROWS:(number + 1) * SHARD_ROWS])}

    def link(self, name: str, target: Path) -> bool:
        """Hard-link one of this generation's files; False where it is gone (another writer
        removed the generation) or the file system has no hard links."""
        try:
            os.link(self.folder / name, target)
        except OSError:
            return False
        return True


def gather(chunks: list[np.ndarray], where: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Rows of chunked arrays, each given as (chunk, offset in chunk), in the order given."""
    where = np.asarray(where, dtype=np.int64).reshape(-1, 2)
    first = chunks[where[0, 0]]
    out = np.empty((len(where), *first.shape[1:]), dtype=first.dtype)
    for chunk in np.unique(where[:, 0]):
        selected = where[:, 0] == chunk
        out[selected] = chunks[chunk][where[selected, 1]]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class SavedIndex:
    """The index as a save writes it, taken under the store's lock while upserts may go on
    adding rows to the store's own: faiss's serialized bytes (the file itself, where a second
    index object built from them held the same rows again), and a compact index's centre,
    projection and training size, which are never changed in place."""

    data: np.ndarray  # uint8, the index.faiss file
    centre: np.ndarray | None = None  # these three for a compact index only
    projection: np.ndarray | None = None
    trained_over: int | None = None

    @classmethod
    def of(cls, index: faiss.Index | CompactIndex) -> "SavedIndex":
        if isinstance(index, CompactIndex):
            return cls(faiss.serialize_index(index.codes), index.centre, index.projection, index.trained_over)
        return cls(faiss.serialize_index(index))

    def write(self, folder: Path) -> None:
        if self.trained_over is not None:
            _write_array(folder / "index-centre.npy", self.centre)
            _write_array(folder / "index-projection.npy", self.projection)
        with open(folder / "index.faiss", "wb") as handle:
            self.data.tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())


def read_index(generation: Path, count: int, trained_over: int | None) -> faiss.Index | CompactIndex:
    """The saved index; a compact one (``trained_over``: the rows its keys were drawn from) with
    its centre and projection."""
    path = generation / "index.faiss"
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as error:  # a header claiming vectors past memory: a bare MemoryError
        raise StoreError(f"{path} is corrupted: faiss could not read it ({error})") from error
    if index.ntotal != count:
        raise StoreError(f"{path} indexes {index.ntotal} documents, expected {count}")
    if trained_over is None:
        return index
    centre = _read_array(generation / "index-centre.npy", np.float32)
    projection = _read_array(generation / "index-projection.npy", np.float32)
    try:
        return CompactIndex(centre, projection, index, trained_over)
    except ValueError as error:
        raise StoreError(f"{generation}: the compact index's files do not fit together: {error}") from error


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
        handle.flush()
        os.fsync(handle.fileno())


def _read_array(path: Path, dtype: DTypeLike, mmap_mode: str | None = None) -> np.ndarray:
    try:
        try:
            array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except OSError as error:
            if error.errno != errno.EMFILE or not _more_open_files():
                raise
            array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except OSError as error:
        if error.errno == errno.EMFILE:
            raise StoreError(f"{path}: too many open files; each memory-mapped shard holds one (two for int8), "
                             f"so raise the limit (ulimit -n)") from error
        raise StoreError(f"{path} is missing or corrupted: {error}") from error
    except (ValueError, MemoryError) as error:  # a header claiming a shape past memory: a bare MemoryError
        raise StoreError(f"{path} is missing or corrupted: {error}") from error
    if array.dtype != dtype:
        raise StoreError(f"{path} holds {array.dtype}, expected {np.dtype(dtype)}")
    return array


def _more_open_files() -> bool:
    """Raise this process's open-file limit to its hard limit; whether it rose. A mapped shard
    keeps a file open, and a million int8 passages map 490 of them."""
    try:
        import resource  # POSIX only
    except ImportError:
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit is macOS's, where a soft one past OPEN_MAX (10,240) is refused
    for wanted in (hard, 10240) if hard != resource.RLIM_INFINITY else (10240,):
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                return True
            except (OSError, ValueError):
                continue
    return False


def _write_shards(staging: Path, field: str, count: int, write: Callable[[Path, slice], None],
                  previous: SavedGeneration | None, unchanged: set[int], checksums: dict[str, str],
                  progress: tqdm) -> list[dict]:
    """The header ``field``'s shards of SHARD_ROWS of the ``count`` rows: those numbered in
    ``unchanged`` are linked from the previous generation (with their checksums) where the file
    system allows it, the others written with ``write(path, rows)``."""
    shards = []
    for number, start in enumerate(range(0, count, SHARD_ROWS)):
        file, rows = _SHARD_FILES[field].format(number), slice(start, min(start + SHARD_ROWS, count))
        if number in unchanged and previous.link(file, staging / file):
            checksums[file] = previous.checksums[file]
        else:
            write(staging / file, rows)
        shards.append({"file": file, "rows": rows.stop - rows.start})
        progress.update(rows.stop - rows.start)
    return shards


def _array_writer(chunks: list[np.ndarray], where: np.ndarray) -> Callable[[Path, slice], None]:
    """Writes the rows of chunked arrays (memories, scales or keys) as one .npy shard."""
    return lambda path, rows: _write_array(path, gather(chunks, where[rows]))


def _records_writer(records: dict[str, list]) -> Callable[[Path, slice], None]:
    """Writes the ids, texts and metadata of the rows as one JSON shard: a shard whose rows kept
    their places holds the same records, since a changed record is a replaced row."""
    return lambda path, rows: write_json(path, {field: values[rows] for field, values in records.items()})


def read_records(generation: Path, shards: list[dict]) -> dict[str, list]:
    """The ids, texts and metadata of every row, from the record shards in order."""
    records: dict[str, list] = {"ids": [], "texts": [], "metadatas": []}
    for shard in shards:
        part = read_json(generation / shard["file"], StoreError)
        if not isinstance(part, dict) or not records.keys() <= part.keys():
            raise StoreError(f"{generation / shard['file']} does not hold ids, texts and metadatas")
        if not all(isinstance(part[field], list) and len(part[field]) == shard["rows"] for field in records):
            raise StoreError(f"{generation / shard['file']} does not hold {shard['rows']} documents")
        odd = next((row for row, record in enumerate(zip(part["ids"], part["texts"], part["metadatas"]))
                    if tuple(map(type, record)) != (str, str, dict)), None)
        if odd is not None:  # a bare TypeError at the load, or at a later search
            raise StoreError(f"{generation / shard['file']}: record {odd} is not an id and a text (strings) and "
                             "metadata (a dict)")
        for field, values in records.items():
            values.extend(part[field])
    if len(set(records["ids"])) != len(records["ids"]):  # a delete removed one copy, and the other stayed
        raise StoreError(f"{generation}: the records name an id twice")
    return records


def read_shards(folder: Path, shards: list[dict], dtype: DTypeLike) -> list[np.ndarray]:
    arrays = []
    for shard in shards:
        array = _read_array(folder / shard["file"], dtype, mmap_mode="r")
        if len(array) != shard["rows"]:
            raise StoreError(f"{folder / shard['file']} holds {len(array)} rows, expected {shard['rows']}")
        arrays.append(array)
    return arrays


def check_store_folder(folder: Path) -> None:
    """Refuse a folder a store cannot be saved to without harm to files it did not write: a save
    replaces ``CURRENT`` and removes older ``gen-*`` folders of store files. A folder holding
    only what a save killed before its first ``CURRENT`` left (``.lock``, ``.staging-*``,
    ``gen-*`` folders of store files, ``.CURRENT.*.tmp``) is the store's; one whose ``CURRENT``
    names a missing generation (a partial copy) is not saved over: the save removed the
    generations it held."""
    if (folder / "CURRENT").exists():
        name = current_generation(folder)  # names a generation of a store, or the error says what it names
        if not (folder / name).is_dir():
            raise StoreError(f"{folder / 'CURRENT'} names {name}, which is missing: the store is damaged; restore "
                             "it from a copy, or choose an empty or new folder")
    elif folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if not _left_by_a_save(p))
        if others:
            raise StoreError(f"{folder} holds files but no CLaRa memory store ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): choose an empty or new folder")
    elif folder.exists():
        raise StoreError(f"{folder} is a file, not a folder for a CLaRa memory store")


def _left_by_a_save(entry: Path) -> bool:
    """Whether a folder entry holds only what a save writes (before its first ``CURRENT``, and
    in a generation a later save removes); a generation's name alone does not make it one (a
    user's copy, its notes inside, was removed)."""
    if not _STORE_ENTRY.match(entry.name):
        return False
    if not _GENERATION.match(entry.name):
        return True
    return entry.is_dir() and all(f.name == "store.json" or _STORE_FILE.match(f.name) for f in entry.iterdir())


def store_settings(folder: Path) -> dict[str, str]:
    """The index kind and memory dtype a saved store was made with, read without a model."""
    header, memory_dtype = read_store_header(folder / current_generation(folder))
    return {"index": header["index"], "memory_dtype": memory_dtype}


def read_store_header(generation: Path) -> tuple[dict, str]:
    """A generation's ``store.json``, checked for its format, and the memory dtype it gives."""
    header = read_json(generation / "store.json", StoreError)
    found = header.get("format") if isinstance(header, dict) else None
    if found == FORMAT_1:  # any model, its own checkpoint too, would be refused as "another compressor"
        raise StoreError(f"{generation}/store.json is of format {FORMAT_1!r}, whose compressor signature no "
                         "version since can check: index its documents again into a new folder")
    if found not in (FORMAT, FORMAT_2):
        raise StoreError(f"{generation}/store.json is not a store header of format {FORMAT!r} or {FORMAT_2!r} "
                         f"(its format: {str(found)[:80]!r})")
    memory_dtype = header.get("memory_dtype")
    if memory_dtype not in MEMORY_DTYPES:
        raise StoreError(f"{generation}/store.json gives the memory dtype {str(memory_dtype)[:80]!r}, "
                         f"not one of {MEMORY_DTYPES}")
    missing = [name for name in _HEADER_FIELDS if name not in header]  # its one file no checksum covers
    if missing:
        raise StoreError(f"{generation}/store.json lacks {', '.join(missing)}: not a whole store header")
    if header["index"] not in INDEX_KINDS:
        raise StoreError(f"{generation}/store.json gives the index {str(header['index'])[:80]!r}, "
                         f"not one of {INDEX_KINDS}")
    return header, memory_dtype


_HEADER_FIELDS = ("index", "compressor", "keys", "count", "memory_shards", "key_shards")


def current_generation(folder: Path) -> str:
    """The generation folder ``CURRENT`` names; never a path outside the store."""
    pointer = folder / "CURRENT"
    if not pointer.is_file():
        raise StoreError(f"{folder} is not a CLaRa memory store: CURRENT is missing or not a file")
    name = pointer.read_text().strip()
    if not _GENERATION.match(name):
        raise StoreError(f"{pointer} names {name[:80]!r}, not a generation folder of this store")
    return name


def stamp(generation: Path) -> tuple[str, str]:
    """What tells a generation from another of the same name: the name and its header's SHA-256
    (the header holds every other file's)."""
    return generation.name, _sha256(generation / "store.json")


def _sha256(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def verify_files(generation: Path, header: dict) -> None:
    """Every file the header lists must be a plain name in the generation and match its
    checksum; every shard must be listed."""
    checksums = header.get("sha256")
    if not isinstance(checksums, dict):
        raise StoreError(f"{generation}/store.json lists no checksums")
    shards = []
    for field, names in _SHARD_FILES.items():
        listed = header.get(field, [])
        for number, shard in enumerate(listed if isinstance(listed, list) else [None]):
            name = names.format(number)
            rows = shard.get("rows") if isinstance(shard, dict) else None
            if not isinstance(shard, dict) or shard.get("file") != name or type(rows) is not int or rows < 0:
                raise StoreError(f"{generation}/store.json lists {str(shard)[:80]!r} as shard {number} of {field}, "
                                 f"which is not {name} with its row count")
            shards.append(name)
    if header.get("format") != FORMAT:
        shards.append("records.json")  # the records of format 2, in one file
    for name in checksums:
        if not isinstance(name, str) or not _STORE_FILE.match(name):
            raise StoreError(f"{generation}/store.json names the file {str(name)[:80]!r}, which is not a store file")
    unlisted = [name for name in shards if name not in checksums]
    if unlisted:
        raise StoreError(f"{generation}/store.json has no checksum for {unlisted[0]}")
    missing = [generation / name for name in checksums if not (generation / name).is_file()]
    if missing:
        raise StoreError(f"{missing[0]} is missing")
    size = sum((generation / name).stat().st_size for name in checksums)
    with tqdm(total=size, unit="B", unit_scale=True, desc="checking the store's files",
              disable=size < 1 << 30) as progress:  # shown for stores of a GiB or more
        for name, expected in checksums.items():
            if _sha256(generation / name, progress) != expected:
                raise StoreError(f"{generation / name} is corrupted: its checksum does not match the one "
                                 "written with it")


def _generations(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _GENERATION.match(p.name)))
