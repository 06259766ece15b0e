"""Crash-safe writes: a file or a whole folder is built aside, then renamed into place."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO

from .errors import InvalidInputError

try:
    import fcntl
except ImportError:  # no flock: writes go on unlocked, as on a file system without locks
    fcntl = None


def write_file_atomically(path: Path, write: Callable[[IO], None], binary: bool = False,
                          follow_link: bool = True) -> None:
    """Call ``write(handle)`` on a temporary sibling of ``path`` (opened for text, or bytes),
    flush it to disk, then rename it over ``path``: a crash leaves the old file or the new one,
    never a part of either, and two writers at once leave one's whole file. A symbolic link is
    followed (its target is replaced, not the link) unless ``follow_link`` is False; a replaced
    file keeps its permissions (a replaced link, the file's own: a read-only target's made the
    file that replaced it read-only)."""
    path = _followed(path) if follow_link else path
    _remove_abandoned(path)
    temporary, held = _claimed_sibling(path, folder=False)
    try:
        with open(temporary, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if not path.is_symlink():
            _keep_mode(path, temporary)
        os.replace(temporary, path)
        sync_entry(path.parent)  # the rename itself
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(held)


def write_text_atomically(path: Path, text: str, follow_link: bool = True) -> None:
    """Replace a small text file crash-safely (see ``write_file_atomically``)."""
    write_file_atomically(path, lambda handle: handle.write(text), follow_link=follow_link)


def write_folder_atomically(folder: Path, write: Callable[[Path], None], marker: str,
                            owned: Collection[str] = ()) -> None:
    """Call ``write(staging)`` on an empty sibling folder, then swap it in for ``folder``.

    A crash inside ``write`` leaves ``folder`` as it was. The swap itself is two renames; an
    old copy is kept at ``.NAME.old`` until the new one is in place, and ``recover_folder``
    puts it back if a crash fell between them. The writer holds a lock on its staging folder,
    so the next write removes a killed writer's staging folder and never a live one's. A
    non-empty ``folder`` without the file ``marker`` was not written by this library: it is
    refused, never replaced (and so is a ``.NAME.old`` without it, in the swap's way), as is a
    read-only one (no write permission, for this process or anyone). Files that
    ``write`` does not make again (a user's notes or results kept beside the library's files)
    are copied into the new folder, not lost with the old one; the ``owned`` names are this
    writer's own, and an old one that ``write`` does not make again is left out. A symbolic
    link is followed: the folder it names is swapped, and the link stays.
    """
    folder = _followed(folder)
    recover_folder(folder, marker)
    check_replaceable_folder(folder, marker)
    if folder.is_dir() and read_only(folder):
        # swapped anyway, its mode copied to the new folder left a copy behind that no cleanup could empty
        raise PermissionError(f"{folder} is read-only: make it writable, or save to another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    staging, held = _claimed_sibling(folder, folder=True)
    try:
        write(staging)
        _keep_mode(folder, staging)  # a user's 0700 checkpoint folder came back 0755
        # readable as the folder lets files be (made under the umask, or kept as its user set it):
        # safetensors writes its own 0600, which another user of a shared cache or checkpoint could
        # not read. Read bits are only added (FAT refuses a change to the others)
        readable = staging.stat().st_mode & 0o444
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                mode = path.stat().st_mode
                if mode & readable != readable:
                    path.chmod((mode | readable) & 0o7777)
        if folder.exists():
            _copy_missing(folder, staging, skip=set(owned))
        sync_tree(staging)  # the swap below removes the old copy: the new one must be on disk first
        if folder.exists():
            old = _old_copy(folder)
            if old.is_symlink():  # left by a swap that renamed a link (saves before links were followed)
                old.unlink()
            _remove_aside(old, folder)  # a copy a kill left whole (check_replaceable_folder)
            os.replace(folder, old)
            os.replace(staging, folder)
            _remove_aside(old, folder)
        else:
            os.replace(staging, folder)
        sync_entry(folder.parent)  # the renames themselves
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(held)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT, a notebook's interrupt) until the block ends, then raise it: a
    store's lists, maps and index change together, and a KeyboardInterrupt between two of them
    left ids naming other rows' texts, and a save that did not load. Where Python's own handler
    is not the one set (another's, or a thread that cannot set one), the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def read_only(path: Path) -> bool:
    """Whether ``path`` (a file, or a folder to write in) is read-only: no write permission for
    this process, or for anyone (root may write anything, yet a mode without a write bit is
    a user's wish that it stays as it is)."""
    access = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
    return not os.access(path, access) or not path.stat().st_mode & 0o222


def _keep_mode(old: Path, new: Path) -> None:
    """Give what replaces ``old`` its permissions (a user's 0600 rows came back readable by
    all); only a change is asked for (a FAT file refuses one)."""
    kept = stat.S_IMODE(old.stat().st_mode) if old.exists() else None
    if kept is not None and kept != stat.S_IMODE(new.stat().st_mode):
        new.chmod(kept)


# the lock files hold_lock holds, by resolved path: this process' threads take turns there
# first, whatever the file lock says (flock on NFS is emulated per process, and granted to a
# second thread at once, so two saves of one store wrote over each other)
_TURNS: weakref.WeakValueDictionary[Path, threading.Lock] = weakref.WeakValueDictionary()
_TURNS_LOCK = threading.Lock()


@contextlib.contextmanager
def hold_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (made if missing) for the ``with`` block: writers
    of one thing take turns across threads and processes (without ``wait``, BlockingIOError
    while another holds it)."""
    with _TURNS_LOCK:
        turn = _TURNS.setdefault(path.resolve(), threading.Lock())
    if not turn.acquire(blocking=wait):
        raise BlockingIOError(f"{path} is locked by another thread")
    try:
        with open(path, "a") as lock:
            if _lock(lock.fileno(), wait) is False:
                raise BlockingIOError(f"{path} is locked by another process")
            yield
    finally:
        turn.release()


# the outputs whose sole_writer lock this process holds, and the thread holding each: another
# thread is refused at once, as another process is (it wrote the same output beside the first,
# unsaid), where no lock file can be made too, and the holding thread may take it again
_SOLE_WRITERS: dict[Path, int] = {}
_SOLE_WRITERS_LOCK = threading.Lock()


@contextlib.contextmanager
def sole_writer(output: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of a run's output (``.NAME.lock`` beside it) for the ``with`` block: a
    second run writing the same output rewrote files the first was appending to, whose records
    were then lost, and is refused (``what`` names the run), from this process or another. Taken
    again in its thread (the CLI holds it around its checks and the run), it is kept. Where no
    lock file can be made (a read-only folder), another thread of this process is still refused,
    and another process is not: its writes say why they fail."""
    path, thread = Path(output).resolve(), threading.get_ident()
    refused = f"another {what} is writing {output}: wait for it, or name another output"
    with _SOLE_WRITERS_LOCK:
        holder = _SOLE_WRITERS.get(path)
        if holder is None:
            _SOLE_WRITERS[path] = thread
    if holder == thread:  # taken again in its thread
        yield
        return
    if holder is not None:
        raise InvalidInputError(refused)
    try:
        with contextlib.ExitStack() as held:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(hold_lock(path.with_name(f".{path.name}.lock"), wait=False))
            except BlockingIOError:
                raise InvalidInputError(refused) from None
            except OSError:  # a read-only folder, a path through a file
                pass
            yield
    finally:
        with _SOLE_WRITERS_LOCK:
            del _SOLE_WRITERS[path]


def _claimed_sibling(path: Path, folder: bool) -> tuple[Path, int]:
    """A new empty folder or file beside ``path`` (``.NAME.<16 hex>``, a file's with ``.tmp``)
    and the descriptor whose lock marks it as in use until closed. It is made under another
    name (``.new``) and renamed once locked, so another writer's cleanup never meets it
    unlocked under its final name. A cleanup may remove a ``.new`` one before its lock (as it
    must: a kill there leaves one behind); its maker then tries again under a new name. Made
    with the umask's permissions (tempfile.mkdtemp's are owner-only, and the swap would keep
    them)."""
    while True:
        token = secrets.token_hex(8)
        unlocked = path.with_name(f".{path.name}.{token}.new")
        if folder:
            unlocked.mkdir()  # a missing parent folder raises here, as below
            try:
                held = os.open(unlocked, os.O_RDONLY)
            except FileNotFoundError:  # the new folder was removed before it was opened
                continue
        else:
            held = os.open(unlocked, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _lock(held, wait=True)
            if os.fstat(held).st_ino != _inode(unlocked):  # removed before the lock: another name
                os.close(held)
                continue
            claimed = path.with_name(f".{path.name}.{token}{'' if folder else '.tmp'}")
            os.replace(unlocked, claimed)
        except BaseException:
            os.close(held)
            if folder:
                shutil.rmtree(unlocked, ignore_errors=True)
            else:
                unlocked.unlink(missing_ok=True)
            raise
        return claimed, held


def _staging_siblings(path: Path, every_form: bool) -> Iterator[Path]:
    """The siblings of ``path`` named as ``_claimed_sibling`` names them once claimed
    (``.NAME.<16 hex>``); with ``every_form`` also a file's (``.tmp``) and an unclaimed one
    (``.new``). Links are not ours."""
    name = re.escape(path.name)
    own_name = re.compile(rf"\.{name}\.[0-9a-f]{{16}}" + (r"(\.tmp|\.new)?" if every_form else ""))
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if own_name.fullmatch(sibling.name) and not sibling.is_symlink():
            yield sibling


def _remove_aside(old: Path, folder: Path) -> None:
    """Remove a swap's old copy under a staging name of ``folder``: a removal cut short (a kill, a
    file an NFS reader holds open) leaves an abandoned sibling the next write takes back, not a
    marker-less ``.NAME.old`` that every later swap would refuse."""
    trash = old.with_name(f".{folder.name}.{secrets.token_hex(8)}")
    try:
        os.replace(old, trash)
    except FileNotFoundError:  # none, or another writer's swap took it meanwhile
        return
    shutil.rmtree(trash, ignore_errors=True)


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _remove_abandoned(path: Path) -> None:
    """Remove what writers of ``path`` that died mid-write left beside it (a killed training run
    left a checkpoint's worth of files at each kill). Only names ``_claimed_sibling`` makes
    are looked at; one whose lock is held belongs to a writer still at work."""
    for leftover in _staging_siblings(path, every_form=True):
        try:  # a file opened for writing: NFS locks no file opened read-only
            held = os.open(leftover, os.O_RDONLY if leftover.is_dir() else os.O_RDWR)
        except OSError:  # its writer finished meanwhile (or it is not writable: not ours to remove)
            continue
        try:
            # a held lock is a writer at work; a file system without locks cannot tell: left alone
            if not _lock(held, wait=False) or os.fstat(held).st_ino != os.lstat(leftover).st_ino:
                continue  # (or it was renamed into place meanwhile)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(held)


def _lock(descriptor: int, wait: bool) -> bool | None:
    """Lock ``descriptor`` exclusively: True once held; False when another holds it (without
    ``wait``); None where the file system has no locks (some NFS and Lustre mounts),
    where writes go on unlocked rather than not at all."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
            return None
        raise
    return True


MOUNT_TABLE = Path("/proc/self/mountinfo")  # Linux's list of this process's mount points


def _mount_point(folder: Path) -> bool:
    """Whether something is mounted at a folder, by the mount table: a bind mount within one
    file system has its parent's device, and a btrfs subvolume a device of its own though
    nothing is mounted there (it can be renamed). Without a table (macOS), by the device."""
    try:
        table = MOUNT_TABLE.read_bytes().split(b"\n")  # a line break in a name is escaped, a \r not
    except OSError:
        return os.path.ismount(folder)
    target = os.fsencode(folder.resolve())
    for line in table:
        fields = line.split(b" ")  # single spaces: a name's own are escaped, its other blanks not
        # the fifth field is the mount point, its spaces, tabs, line breaks and backslashes octal-escaped
        if len(fields) > 4 and re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4]) == target:
            return True
    return False


def check_replaceable_folder(folder: Path, marker: str, saved_again: bool = False) -> None:
    """Refuse (FileExistsError) a path ``write_folder_atomically`` would not replace: a file, a
    non-empty folder without ``marker``, or an existing folder beside a ``.NAME.old`` that is
    not the library's (in the swap's way: a non-empty folder without ``marker``, a file, or a
    link to anything but a folder with it; ``saved_again``: a folder written more than once, such as
    a training run's checkpoint, meets it at its second write); and (ValueError) the working
    folder or one above it, or a mount point, which the swap cannot move. A caller with long
    work before the write checks first."""
    folder = _followed(folder)
    if folder.resolve() in (Path.cwd(), *Path.cwd().parents):  # the swap would take it from under this process
        raise ValueError(f"{folder} is this process's working directory, or holds it: name a folder outside it")
    if _mount_point(folder):  # renamed aside at the swap: EBUSY once every file was written beside it
        raise ValueError(f"{folder} is a mount point, which a save cannot replace (it writes a new folder beside "
                         "it and swaps the two): name a folder inside it")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise FileExistsError(f"{folder} is a non-empty folder that this library did not write (no {marker}); "
                              "choose a new or empty folder")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    old = _old_copy(folder)  # used by a swap over an existing folder
    if not (folder.exists() or saved_again):
        return
    if old.is_symlink():  # a swap that renamed a link (before links were followed) left one to a folder of ours
        foreign = not (old / marker).is_file()
    elif old.is_dir():
        foreign = any(old.iterdir()) and not (old / marker).is_file()
    else:  # a file, which a swap renamed aside and then removed
        foreign = old.exists()
    if foreign:
        raise FileExistsError(f"{old} is in the way of a save's swap and holds no {marker}: it is not this "
                              "library's copy, so it is left alone; move it")


def _followed(path: Path) -> Path:
    """The path a symbolic link names, or the path itself ("." and ".." made absolute: they name
    no sibling to build beside): renaming a link over its target's new copy would leave the
    target stale and the link's old name behind."""
    if path.is_symlink():
        return path.resolve()
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder``, and ``folder`` itself, to disk: what a
    rename then publishes is whole after a power loss."""
    for path in [*folder.rglob("*"), folder]:
        if not path.is_symlink():
            sync_entry(path)


def sync_entry(path: Path) -> None:
    """Flush one file or folder (a folder: its entries, so a rename in it) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _copy_missing(source: Path, target: Path, skip: set[str]) -> None:
    """Copy the entries of ``source`` that ``target`` lacks, but those named in ``skip`` (hard
    links where the file system allows)."""
    for entry in source.iterdir():
        if entry.name in skip or (target / entry.name).exists() or (target / entry.name).is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target / entry.name)


def _link_or_copy(source: Path | str, target: Path | str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def recover_folder(folder: Path, marker: str) -> None:
    """Finish a swap that a crash interrupted: when ``folder`` is gone but its old copy (holding
    ``marker``: a folder of that name without it is not the library's) is there, the old copy
    is the last complete one; unless a writer is between the swap's two renames (its staging
    folder is locked), whose next rename would then fail and lose its save."""
    folder = _followed(folder)
    old = _old_copy(folder)
    if not folder.exists() and (old / marker).is_file() and not writer_at_work(folder):
        os.replace(old, folder)


def writer_at_work(path: Path) -> bool:
    """Whether a writer holds the lock of a staging sibling of ``path`` (``_claimed_sibling``);
    where the file system has no locks, a leftover cannot be told from a live one: no. Behind a
    link, beside the folder it names, where saves stage."""
    path = _followed(path)
    for sibling in _staging_siblings(path, every_form=False):
        if not sibling.is_dir():
            continue
        try:
            held = os.open(sibling, os.O_RDONLY)
        except OSError:  # renamed into place meanwhile
            continue
        try:
            if _lock(held, wait=False) is False:  # held by its writer
                return True
        finally:
            os.close(held)  # closing drops the lock this probe may have taken
    return False


def _old_copy(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")
