"""Text and JSON files on disk: text, one JSON value or JSONL rows, read with errors that name
the file."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import write_file_atomically
from .errors import InvalidInputError


def read_text(path: str | Path, error: type[ValueError] = InvalidInputError) -> str:
    """A UTF-8 text file's contents, gzipped where its name ends in ``.gz`` (as data sets are
    published: NQ-open's ``nq-open-oracle.jsonl.gz``), or ``error`` naming a file of other
    bytes (a PDF, a binary)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8-sig") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad, PowerShell) is dropped
    except UnicodeDecodeError as decoding:
        raise error(_not_utf8(path, decoding.start)) from decoding
    except _BROKEN_GZIP as broken:
        raise error(_broken_gzip(path, broken)) from broken


def read_lines(path: str | Path, error: type[ValueError] = InvalidInputError) -> Iterator[str]:
    """A text file's lines, as ``read_text`` reads them (its newlines made "\\n"), one at a time:
    a corpus of millions of passages was held whole, as bytes, text and rows at once."""
    path = Path(path)
    offset = 0  # of the line in the file's (decompressed) bytes
    try:
        with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")) as handle:
            for raw in handle:
                try:
                    line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                except UnicodeDecodeError as decoding:
                    raise error(_not_utf8(path, offset + decoding.start)) from decoding
                offset += len(raw)
                if "\r" not in line:
                    yield line
                    continue
                *ended, last = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as universal newlines
                yield from (piece + "\n" for piece in ended)
                if last:
                    yield last
    except _BROKEN_GZIP as broken:
        raise error(_broken_gzip(path, broken)) from broken


_BROKEN_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)  # zlib's: a damaged stream


def _not_utf8(path: Path, byte: int) -> str:
    return f"{path} is not UTF-8 text: byte {byte} cannot be decoded"


def _broken_gzip(path: Path, broken: Exception) -> str:
    return f"{path} is not a whole gzip file: {broken}"


def data_suffix(path: str | Path) -> str:
    """A file's kind by its name, the ``.gz`` of a compressed one aside: ``.jsonl`` for ``dev.jsonl.gz``."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")


def read_json(path: Path, error: type[ValueError]) -> object:
    """A JSON file's value, or ``error`` naming a missing or corrupted file."""
    try:
        text = read_text(path, error)
    except FileNotFoundError as missing:
        raise error(f"{path} is missing") from missing
    try:
        return json.loads(text)
    except json.JSONDecodeError as corrupted:
        raise error(f"{path} is corrupted (not valid JSON): {corrupted}") from corrupted
    except RecursionError as deep:  # a bare RecursionError that named no file
        raise error(f"{path} nests its JSON deeper than Python can read") from deep
    except ValueError as long:  # an integer of more digits than Python converts, in a bare ValueError
        raise error(f"{path} is corrupted: {long}") from long


def read_jsonl(path: str | Path, appended: bool = False) -> list[dict]:
    """One value per non-blank line; a line that is not JSON is an error naming the file and line.

    A file a run ``appended`` to may end in a line that a killed run left cut short: that last
    line alone is dropped, so that the run can resume.
    """
    return list(jsonl_values(path, appended))


def jsonl_values(path: str | Path, appended: bool = False) -> Iterator[Any]:
    """``read_jsonl``'s values one at a time, as the lines are read."""
    cut = None  # a line that is not JSON: an error unless no other follows it
    # lines split at "\n" alone, not splitlines: JSON strings may hold U+2028 and other breaks unescaped
    for number, line in enumerate(read_lines(path)):
        if not line.strip():
            continue
        if cut is not None:
            raise cut
        try:
            value = json.loads(line)
        except RecursionError as error:
            raise InvalidInputError(f"{path} line {number + 1} nests its JSON deeper than Python can read") from error
        except json.JSONDecodeError as error:
            whole = " (a JSON document over several lines? this file takes one JSON value a line)" \
                if number == 0 and line.strip() in ("[", "{") else ""
            cut = InvalidInputError(f"{path} line {number + 1} is not JSON: {error}{whole}")
            cut.__cause__ = error
            if not appended:
                raise cut
            continue
        except ValueError as error:  # an integer of more digits than Python converts: a bare ValueError
            raise InvalidInputError(f"{path} line {number + 1} is corrupted: {error}") from error
        yield value


def write_json(path: Path, value: Any) -> None:
    """One JSON value, replacing ``path`` only once it is on disk."""
    write_file_atomically(path, lambda handle: json.dump(value, handle))


def write_jsonl(rows: list[dict], path: str | Path, follow_link: bool = True) -> None:
    """One row per line, replacing ``path`` only once every row is on disk (a link is followed
    unless ``follow_link`` is False: ``write_file_atomically``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows),
                          follow_link=follow_link)
