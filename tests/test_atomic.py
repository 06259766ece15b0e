"""Crash-safe writes: what a kill mid-write leaves, and that the store's JSON files and the
default model's cache are written through the one implementation in ``atomic.py``."""

import os
import stat
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara_plugins import MemoryStore, atomic, backbone, jsonfiles
from clara_plugins.atomic import write_file_atomically, write_folder_atomically, write_text_atomically
from conftest import CORPUS


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "CURRENT"
    path.write_text("old\n")

    def dies_halfway(handle):
        handle.write("half of the new")
        handle.flush()
        os._exit(1)

    child = os.fork()
    if child == 0:
        try:
            write_file_atomically(path, dies_halfway)
        finally:
            os._exit(1)
    os.waitpid(child, 0)
    assert path.read_text() == "old\n"
    assert len(list(tmp_path.glob(".CURRENT." + "[0-9a-f]" * 16 + ".tmp"))) == 1  # what the kill left
    (tmp_path / ".CURRENT.tmp").write_text("a user's, or a version's from before locks (it removed a user's)")
    (tmp_path / ".CURRENT.notes").write_text("a user's")
    write_file_atomically(path, lambda handle: handle.write("new\n"))  # the next write is not hindered
    assert path.read_text() == "new\n"
    # and removes what the library left, and no name it does not make
    assert sorted(os.listdir(tmp_path)) == [".CURRENT.notes", ".CURRENT.tmp", "CURRENT"]


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    # the new file came with the umask's: a user's 0600 rows became readable by all
    path = tmp_path / "rows.jsonl"
    path.write_text("old")
    path.chmod(0o604)  # no umask gives it
    write_text_atomically(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o604
    folder = tmp_path / "ckpt"  # and a folder written again (a checkpoint saved over)
    write_folder_atomically(folder, lambda staging: (staging / "done").write_text("1"), "done")
    folder.chmod(0o705)
    write_folder_atomically(folder, lambda staging: (staging / "done").write_text("2"), "done")
    assert (folder / "done").read_text() == "2" and stat.S_IMODE(folder.stat().st_mode) == 0o705


def test_a_read_only_output_is_refused_and_a_stores_read_only_files_are_saved_as_before(tiny_model, tmp_path):
    # os.replace needs only the folder's permission: a file the user protected was replaced
    from clara_plugins.checks import check_output_path

    path = tmp_path / "answers.jsonl"
    path.write_text("mine")
    path.chmod(0o444)
    (tmp_path / "link.jsonl").symlink_to(path)
    for output in (path, tmp_path / "link.jsonl"):
        with pytest.raises(PermissionError, match="answers.jsonl is read-only: make it writable, or write another"):
            check_output_path(output)
    # a store copied with its files' modes (cp -r of a protected one): its CURRENT is the library's own
    store = MemoryStore(tiny_model)
    store.upsert(["A passage."], ids=["a"])
    store.save(tmp_path / "store")
    for file in (tmp_path / "store").rglob("*"):
        if file.is_file():
            file.chmod(0o444)
    store.upsert(["Another passage."], ids=["b"])
    store.save(tmp_path / "store")
    assert len(MemoryStore.load(tmp_path / "store", tiny_model)) == 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("old")

    def fails(handle):
        handle.write("new")
        raise TypeError("not serialisable")

    with pytest.raises(TypeError, match="not serialisable"):
        write_file_atomically(path, fails)
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["records.json"]


def test_the_new_file_is_on_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
    steps = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        steps.append("fsync")
        real_fsync(fd)

    def replace(source, destination):
        steps.append("replace")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_file_atomically(tmp_path / "f", lambda handle: handle.write("x"))
    assert steps == ["replace", "fsync", "replace", "fsync"]  # the temporary file claimed, written, renamed, the rename


def test_a_new_folder_is_on_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
    def write(staging):
        (staging / "weights.safetensors").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "state.pt").write_text("new")

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "marker").write_text("old")
    steps = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda source, target: steps.append(("replace", str(target)))
                        or real_replace(source, target))
    atomic.write_folder_atomically(tmp_path / "ckpt", write, marker="marker")
    first_replace = next(i for i, (kind, target) in enumerate(steps)
                         if kind == "replace" and Path(target).name in ("ckpt", ".ckpt.old"))
    synced_before = {Path(path).name for kind, path in steps[:first_replace] if kind == "fsync"}
    assert {"weights.safetensors", "state.pt", "sub"} <= synced_before  # and the staging folder
    assert steps[-1] == ("fsync", str(tmp_path))  # the renames
    assert (tmp_path / "ckpt" / "sub" / "state.pt").read_text() == "new"


def test_a_folder_or_file_named_by_a_symbolic_link_is_replaced_behind_the_link(tmp_path):
    # the swap renamed the link itself: the target stayed stale and every later save failed
    target, link = tmp_path / "disk" / "checkpoint", tmp_path / "checkpoint"
    target.mkdir(parents=True)
    link.symlink_to(target)
    for version in ("1", "2", "3"):
        write_folder_atomically(link, lambda staging: (staging / "config.json").write_text(version), "config.json")
        assert link.is_symlink() and (target / "config.json").read_text() == version
    file_target, file_link = tmp_path / "disk" / "store.json", tmp_path / "store.json"
    file_target.write_text("old")
    file_link.symlink_to(file_target)
    write_file_atomically(file_link, lambda handle: handle.write("new"))
    assert file_link.is_symlink() and file_target.read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "disk", "store.json"]


def test_a_swap_cut_short_behind_a_link_is_recovered_and_a_link_left_at_the_old_name_is_cleared(tmp_path):
    from clara_plugins.atomic import recover_folder

    target, link = tmp_path / "disk" / "checkpoint", tmp_path / "checkpoint"
    target.mkdir(parents=True)
    (target / "config.json").write_text("last save")
    link.symlink_to(target)
    os.replace(target, tmp_path / "disk" / ".checkpoint.old")  # killed between the two renames
    recover_folder(link, "config.json")  # looked for .checkpoint.old beside the link, found none: a run restarted at step 0
    assert (link / "config.json").read_text() == "last save"
    # saves before links were followed renamed the link to .NAME.old; each later save then failed
    plain = tmp_path / "plain"
    write_folder_atomically(plain, lambda staging: (staging / "config.json").write_text("1"), "config.json")
    (tmp_path / ".plain.old").symlink_to(target)
    write_folder_atomically(plain, lambda staging: (staging / "config.json").write_text("2"), "config.json")
    assert (plain / "config.json").read_text() == "2" and (target / "config.json").read_text() == "last save"


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    # each kill of a training run mid-save left a checkpoint's worth of files beside it, forever
    folder = tmp_path / "checkpoint"

    def dies_halfway(staging):
        (staging / "config.json").write_text("half")
        os._exit(1)

    child = os.fork()
    if child == 0:
        try:
            write_folder_atomically(folder, dies_halfway, "config.json")
        finally:
            os._exit(1)
    os.waitpid(child, 0)
    abandoned = [path.name for path in tmp_path.iterdir()]
    assert len(abandoned) == 1 and abandoned[0].startswith(".checkpoint.")
    writing, done = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:  # a writer still at work on the next folder
        def waits(staging):
            os.write(writing[1], b"x")
            os.read(done[0], 1)
        try:
            write_folder_atomically(tmp_path / "other", waits, "config.json")
        finally:
            os._exit(0)
    os.read(writing[0], 1)
    live = next(path for path in tmp_path.iterdir() if path.name.startswith(".other."))
    mine = tmp_path / ".other.notes"  # a user's folder of a name like the staging ones
    mine.mkdir()
    write_folder_atomically(folder, lambda staging: (staging / "config.json").write_text("1"), "config.json")
    write_folder_atomically(tmp_path / "other", lambda staging: (staging / "config.json").write_text("2"),
                            "config.json")
    assert live.is_dir() and mine.is_dir()
    os.write(done[1], b"x")
    os.waitpid(child, 0)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.notes", "checkpoint", "other"]


def test_two_writers_of_one_file_at_once_leave_one_whole_file(tmp_path):
    # both wrote through one fixed temporary name: the second truncated the file the first was
    # about to rename into place, and a mix of the two stood at the final name
    path = tmp_path / "result.json"
    started, finish = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:
        def slow(handle):
            handle.write("a" * 1000)
            handle.flush()
            os.write(started[1], b"x")
            os.read(finish[0], 1)
            handle.write("a" * 1000)
        try:
            write_file_atomically(path, slow)
        finally:
            os._exit(0)
    os.read(started[0], 1)
    write_file_atomically(path, lambda handle: handle.write("b" * 10))  # the live writer's file is kept
    os.write(finish[1], b"x")
    os.waitpid(child, 0)
    assert path.read_text() == "a" * 2000 and sorted(os.listdir(tmp_path)) == ["result.json"]


def test_writes_go_on_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    # NFS without its lock daemon (ENOLCK), Lustre without flock (ENOSYS): every write failed
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / ".result.json.0123456789abcdef.tmp").write_text("a killed writer's, or a live one's: kept")
    write_file_atomically(tmp_path / "result.json", lambda handle: handle.write("new"))
    write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("1"), "config.json")
    assert (tmp_path / "result.json").read_text() == "new" and (tmp_path / "ckpt" / "config.json").read_text() == "1"
    assert (tmp_path / ".result.json.0123456789abcdef.tmp").exists()


def test_a_new_folder_has_the_permissions_of_any_folder_made_here(tmp_path):
    # the staging folder was owner-only (0700): checkpoints were unreadable to the user's group
    umask = os.umask(0o022)
    try:
        write_folder_atomically(tmp_path / "made", lambda staging: (staging / "a.txt").write_text("a"),
                                marker="a.txt")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(umask)
    assert (tmp_path / "made").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_threads_take_turns_at_a_lock_the_file_system_grants_every_thread(tmp_path, monkeypatch):
    # flock on NFS is emulated per process: two threads saving one store both held its lock, and
    # the older snapshot's save became current
    import threading
    import time

    monkeypatch.setattr(atomic, "_lock", lambda descriptor, wait: True)
    inside, most = [], []

    def hold() -> None:
        with atomic.hold_lock(tmp_path / ".lock"):
            inside.append(1)
            most.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == [1, 1, 1, 1]
    with atomic.hold_lock(tmp_path / ".lock"):  # and without waiting, another thread is refused
        refused = []
        waiter = threading.Thread(target=lambda: refused.append(_refused(tmp_path / ".lock")))
        waiter.start()
        waiter.join()
    assert refused == [True]


def _refused(path: Path) -> bool:
    try:
        with atomic.hold_lock(path, wait=False):
            return False
    except BlockingIOError:
        return True


def test_a_second_thread_is_refused_its_output_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    # the second thread was refused by flock alone: on NFS (per-process locks) two runs of one
    # process wrote one output
    from clara_plugins.errors import InvalidInputError
    from conftest import written_by_another_thread

    monkeypatch.setattr(atomic, "_lock", lambda descriptor, wait: None)
    with written_by_another_thread(tmp_path / "out", "run"):
        with pytest.raises(InvalidInputError, match="another run is writing"):
            with atomic.sole_writer(tmp_path / "out", "run"):
                pass
    with atomic.sole_writer(tmp_path / "out", "run"):  # free once the first is done, and kept in its thread
        with atomic.sole_writer(tmp_path / "out", "run"):
            pass
    assert atomic._SOLE_WRITERS == {}


def test_a_read_only_folder_is_refused_and_left_as_it_was(tmp_path):
    # swapped anyway, the new folder took its mode: the old copy could not be emptied, and a
    # hidden copy of the whole checkpoint was left beside it at every save
    folder = tmp_path / "ck"
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("old"), marker="a.txt")
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="ck is read-only: make it writable, or save to another folder"):
            write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("new"), marker="a.txt")
    finally:
        folder.chmod(0o755)
    assert (folder / "a.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ck"]


def test_a_reader_leaves_a_swap_a_writer_is_in_the_middle_of(tmp_path):
    # a reader between a save's two renames put the old copy back, and the writer's second
    # rename then failed: the save was lost
    import fcntl

    (tmp_path / ".ckpt.old").mkdir()
    (tmp_path / ".ckpt.old" / "marker").write_text("old")
    staging = tmp_path / ".ckpt.0123456789abcdef"
    staging.mkdir()
    held = os.open(staging, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # the writer's lock on its staging folder
    try:
        atomic.recover_folder(tmp_path / "ckpt", "marker")
        assert not (tmp_path / "ckpt").exists() and (tmp_path / ".ckpt.old").is_dir()
    finally:
        os.close(held)
    atomic.recover_folder(tmp_path / "ckpt", "marker")  # the writer died: its staging folder is a leftover
    assert (tmp_path / "ckpt" / "marker").read_text() == "old"


def test_the_store_writes_its_json_files_atomically(tiny_model, tmp_path, monkeypatch):
    written = []

    def recording(path, write):
        written.append(path.name)
        atomic.write_file_atomically(path, write)

    monkeypatch.setattr(jsonfiles, "write_file_atomically", recording)
    memories = MemoryStore(tiny_model)
    memories.upsert(CORPUS[:2], ids=["a", "b"])
    memories.save(tmp_path / "s")
    assert sorted(written) == ["records-00000.json", "store.json"]
    assert MemoryStore.load(tmp_path / "s", tiny_model).all_ids() == ["a", "b"]


@pytest.fixture
def fake_default_model(tiny_base, tmp_path, monkeypatch):
    """The default model's cache under a fresh CLARA_HOME, dequantised from the tiny model."""
    monkeypatch.setenv("CLARA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(backbone, "_find_default_gguf", lambda: tiny_base / "tiny.gguf")
    monkeypatch.setattr(backbone, "_dequantise", lambda gguf: (AutoModelForCausalLM.from_pretrained(tiny_base),
                                                                AutoTokenizer.from_pretrained(tiny_base)))
    return tmp_path / "home" / "models"


def test_the_default_model_cache_is_written_aside_then_renamed(fake_default_model):
    folder = backbone.default_model_folder()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert sorted(os.listdir(fake_default_model)) == [f".{folder.name}.lock", folder.name]  # no staging folder


def test_processes_meeting_the_first_use_at_once_dequantise_the_default_model_once(fake_default_model,
                                                                                  tmp_path, monkeypatch):
    # each dequantised and swapped the folder in, moving it away under a process loading from it
    import time

    made = tmp_path / "made"
    real = backbone._dequantise
    monkeypatch.setattr(backbone, "_dequantise",
                        lambda gguf: (made.open("a").write("x\n"), time.sleep(0.5), real(gguf))[2])
    children = []
    for _ in range(2):
        child = os.fork()
        if child == 0:
            code = 1
            try:
                code = 0 if (backbone.default_model_folder() / "config.json").is_file() else 2
            finally:
                os._exit(code)
        children.append(child)
    assert [os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) for child in children] == [0, 0]
    assert made.read_text() == "x\n" and (backbone.default_model_folder() / "config.json").is_file()


def test_the_default_model_cache_is_readable_as_the_umask_allows_and_a_damaged_one_is_named(fake_default_model,
                                                                                             monkeypatch):
    # safetensors wrote its weights 0600: a cache warmed by root (a Docker image) failed for its
    # users; a copy cut short failed on a bare SafetensorError, naming neither file nor remedy
    import stat

    from clara_plugins.config import DEFAULT_BASE_MODEL

    old = os.umask(0o022)
    try:
        folder = backbone.default_model_folder()
    finally:
        os.umask(old)
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir() if path.is_file()} == {0o644}
    # only read bits are added: FAT refuses a chmod that takes its 0755 files' x bits away
    taken = []
    real = Path.chmod
    monkeypatch.setattr(Path, "chmod", lambda path, mode: taken.append(path.stat().st_mode & ~mode & 0o111)
                        or real(path, mode))

    def write(staging):
        (staging / "marker").write_text("x")
        (staging / "tool").write_text("x")
        (staging / "tool").chmod(0o755)

    write_folder_atomically(folder.parent / "other", write, marker="marker")
    assert not any(taken) and stat.S_IMODE((folder.parent / "other" / "tool").stat().st_mode) == 0o755
    for damaged in ("model.safetensors", "tokenizer.json"):  # the tokenizer's was a bare JSONDecodeError
        (folder / damaged).write_bytes((folder / damaged).read_bytes()[:1000])
        with pytest.raises(OSError, match=f"the default model's copy in {folder} cannot be read.*delete that folder"):
            backbone.load_base_model(DEFAULT_BASE_MODEL)


def test_a_cache_home_that_cannot_be_written_is_named_with_its_remedy(fake_default_model, tmp_path, monkeypatch):
    # a bare "[Errno 13] Permission denied: '/ro/clara/models'" named neither the first use nor CLARA_HOME
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CLARA_HOME", str(tmp_path / "file" / "home"))
    with pytest.raises(OSError, match=r"the default model is copied into .* at its first use, .* set CLARA_HOME"):
        backbone.default_model_folder()


def test_the_cache_home_is_absolute_and_expanded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLARA_HOME", "~/clara-cache")
    assert backbone.clara_home() == Path.home() / "clara-cache"
    monkeypatch.setenv("CLARA_HOME", "relative")  # a cache in every working folder
    with pytest.raises(ValueError, match="CLARA_HOME='relative' is relative"):
        backbone.clara_home()
    monkeypatch.delenv("CLARA_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")  # relative: ignored, as its specification asks
    assert backbone.clara_home() == Path.home() / ".cache" / "clara"


def test_the_default_model_cache_never_replaces_a_folder_it_did_not_write(fake_default_model):
    foreign = fake_default_model / "smollm2-135m-instruct"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        backbone.default_model_folder()
    assert os.listdir(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"


def test_a_store_generation_is_on_disk_before_current_names_it(tiny_model, tmp_path, monkeypatch):
    # its files were flushed, but not the staging folder's entries (hard links among them), nor
    # the rename into place: after a power loss CURRENT could name a generation not on disk
    memories = MemoryStore(tiny_model)
    memories.upsert(CORPUS[:2], ids=["a", "b"])
    memories.save(tmp_path / "s")
    steps = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: steps.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda source, target: steps.append(("replace", Path(target)))
                        or real_replace(source, target))
    memories.save(tmp_path / "s")  # the records shard linked from the first generation
    renamed = steps.index(("replace", tmp_path / "s" / "gen-000002"))
    synced_before = {path.name for kind, path in steps[:renamed] if kind == "fsync"}
    assert {"records-00000.json", "memories-00000.npy", "store.json"} <= synced_before
    assert any(kind == "fsync" and path.name.startswith(".staging-") for kind, path in steps[:renamed])
    current = steps.index(("replace", tmp_path / "s" / "CURRENT"))
    assert ("fsync", tmp_path / "s") in steps[renamed:current] and steps[-1] == ("fsync", tmp_path / "s")


def test_a_writer_killed_before_its_lock_leaves_nothing_the_next_write_keeps(tmp_path):
    # a kill between making the staging name and locking it left `.NAME.<hex>.new` for good
    (tmp_path / ".result.json.0123456789abcdef.new").write_text("")
    (tmp_path / ".ckpt.0123456789abcdef.new").mkdir()
    write_file_atomically(tmp_path / "result.json", lambda handle: handle.write("new"))
    write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("1"), "config.json")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "result.json"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_staging_name_removed_before_its_lock_is_made_again(tmp_path, monkeypatch, folder):
    # another writer's cleanup may remove a `.new` name in the moment before its maker locks it
    lock = atomic._lock
    removed = []

    def cleanup_first(descriptor, wait):
        if not removed:
            [unlocked] = tmp_path.glob("*.new")
            unlocked.rmdir() if folder else unlocked.unlink()
            removed.append(unlocked)
        return lock(descriptor, wait)

    monkeypatch.setattr(atomic, "_lock", cleanup_first)
    if folder:
        write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("1"),
                                "config.json")
    else:
        write_file_atomically(tmp_path / "ckpt", lambda handle: handle.write("1"))
    assert removed and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_the_working_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    # "." failed once its work was done ("empty name"); written, it was moved from under the process
    from clara_plugins.atomic import check_replaceable_folder

    (tmp_path / "here" / "below").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here" / "below")
    for folder in (Path("."), Path(".."), tmp_path / "here"):
        with pytest.raises(ValueError, match="is this process's working directory, or holds it"):
            check_replaceable_folder(folder, "config.json")
    write_folder_atomically(Path("../sibling"), lambda staging: (staging / "config.json").write_text("1"), "config.json")
    assert (tmp_path / "here" / "sibling" / "config.json").read_text() == "1"


def test_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch):
    # a save wrote every file beside it, then failed on a bare "Device or resource busy" at the swap
    from clara_plugins.atomic import check_replaceable_folder

    # the mount table names it, a bind mount within one file system too (its device is its parent's);
    # a name's spaces are escaped there, its other blanks not
    for name in ("volume", "my runs", "my\u3000runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "my").mkdir()
    table = tmp_path / "mountinfo"
    table.write_bytes(b"".join(b"36 35 98:0 /data " + os.fsencode(tmp_path / name).replace(b" ", b"\\040")
                               + b" rw shared:1 - ext4 /dev/root rw\n" for name in ("volume", "my runs", "my\u3000runs")))
    monkeypatch.setattr(atomic, "MOUNT_TABLE", table)
    with pytest.raises(ValueError, match="volume is a mount point, which a save cannot replace"):
        write_folder_atomically(tmp_path / "volume", lambda staging: (staging / "config.json").write_text("1"),
                                "config.json")
    assert sorted(tmp_path.iterdir()) == sorted(tmp_path / name for name in ("volume", "my runs", "my\u3000runs", "my",
                                                                              "mountinfo"))
    for name in ("my runs", "my\u3000runs"):
        with pytest.raises(ValueError, match="is a mount point"):
            check_replaceable_folder(tmp_path / name, "config.json")
    check_replaceable_folder(tmp_path / "volume" / "checkpoint", "config.json")  # a folder inside it is saved
    check_replaceable_folder(tmp_path / "my", "config.json")  # a folder listed nowhere
    # a device of its own, listed nowhere (a btrfs subvolume): it can be renamed, and is saved
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == tmp_path / "my")
    check_replaceable_folder(tmp_path / "my", "config.json")
    monkeypatch.setattr(atomic, "MOUNT_TABLE", tmp_path / "missing")  # no table (macOS): the device check alone
    with pytest.raises(ValueError, match="my is a mount point"):
        check_replaceable_folder(tmp_path / "my", "config.json")


def test_a_write_into_a_missing_folder_fails(tmp_path):
    # a retry for a staging name removed in the moment before its lock tried again forever
    with pytest.raises(FileNotFoundError):
        write_file_atomically(tmp_path / "missing" / "result.json", lambda handle: handle.write("x"))


def test_a_users_folder_named_as_a_swaps_old_copy_is_neither_restored_nor_removed(tmp_path):
    # .NAME.old was taken for the library's own: restored in place of a missing folder, or removed by the next swap
    from clara_plugins.atomic import recover_folder

    theirs = tmp_path / ".ckpt.old"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    recover_folder(tmp_path / "ckpt", "config.json")
    assert not (tmp_path / "ckpt").exists()
    write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("1"), "config.json")
    with pytest.raises(FileExistsError, match="holds no config.json: it is not this library's copy"):
        write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("2"),
                                "config.json")
    assert (theirs / "notes.txt").read_text() == "mine" and (tmp_path / "ckpt" / "config.json").read_text() == "1"


def test_an_old_copy_whose_removal_was_cut_short_does_not_block_later_saves(tmp_path, monkeypatch):
    # a kill (or a file an NFS reader holds open) mid-removal left .NAME.old without its marker,
    # which every later save then refused as a user's folder
    import shutil

    folder = tmp_path / "ckpt"

    def write(text: str) -> None:
        write_folder_atomically(folder, lambda staging: [(staging / name).write_text(text)
                                                         for name in ("config.json", "weights")], "config.json")

    write("1")
    real = shutil.rmtree

    def cut_short(path, ignore_errors=False):
        path = Path(path)
        if path != folder and (path / "config.json").is_file() and (path / "weights").is_file():
            (path / "config.json").unlink()  # the marker went first
            raise KeyboardInterrupt
        return real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(atomic.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        write("2")
    monkeypatch.undo()
    assert (folder / "config.json").read_text() == "2"  # the swap was done
    write("3")
    assert (folder / "config.json").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_users_file_or_link_named_as_a_swaps_old_copy_is_left_alone(tmp_path, kind):
    # a folder of that name was refused, but a file was renamed aside and removed by the next
    # save, and a link was unlinked at once
    theirs, elsewhere = tmp_path / ".ckpt.old", tmp_path / "notes.txt"
    elsewhere.write_text("mine")
    write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("1"), "config.json")
    theirs.write_text("mine") if kind == "file" else theirs.symlink_to(elsewhere)
    for _ in range(2):
        with pytest.raises(FileExistsError, match="it is not this library's copy"):
            write_folder_atomically(tmp_path / "ckpt", lambda staging: (staging / "config.json").write_text("2"),
                                    "config.json")
    assert theirs.read_text() == "mine" and theirs.is_symlink() == (kind == "link")
