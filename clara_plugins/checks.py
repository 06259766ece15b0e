"""Checks of the texts given to public entry points, and of the numbers given on the command
line, so that bad input fails early and by name."""

import argparse
import numbers
import os
import re
import tempfile
from pathlib import Path

from .atomic import read_only
from .errors import InvalidInputError


def check_texts(texts: object, what: str, blanks: bool = False) -> list[str]:
    """A non-empty list of non-empty strings (``blanks``: a list of any strings, maybe none: a
    framework embedding gives a blank page a key), or InvalidInputError naming the first bad item."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidInputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not texts and not blanks:
        raise InvalidInputError(f"{what} is empty: pass at least one")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"{what}[{index}] is a {type(text).__name__}, not a string")
        if not text.strip() and not blanks:
            raise InvalidInputError(f"{what}[{index}] is empty or only whitespace")
        problem = unicode_problem(text)
        if problem:
            raise InvalidInputError(f"{what}[{index}] is not valid Unicode text ({problem})")
    return list(texts)


def unicode_problem(text: str) -> str | None:
    """Why a string is no valid Unicode, as UTF-8 (a file, Milvus) needs it: a lone surrogate; None if it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"{error.reason} at character {error.start}"
    return None


def check_output_path(output: str | Path, *inputs: str | Path | None) -> None:
    """Refuse, before a run's long work, an output file that is a folder or cannot be written
    (found at the write, the result was lost) or one of the run's inputs (writing it would
    replace them)."""
    if Path(output).is_dir():
        raise IsADirectoryError(f"{output} is a folder: name the file to write")
    if Path(output).suffix.lower() == ".gz":  # written plain, then read back as gzip by its name, and refused
        raise InvalidInputError(f"{output}: outputs are written as plain text; name it without .gz")
    for source in inputs:  # the same file under another name too: a hard link, a bind mount, another case
        if source is not None and (Path(output).resolve() == Path(source).resolve() or (
                Path(output).exists() and Path(source).exists() and os.path.samefile(output, source))):
            raise InvalidInputError(f"{output} is an input of this run too: name another output, or it would be "
                                    "replaced")
    check_writable(output)


def check_writable(path: str | Path) -> None:
    """Refuse, before long work, a file or folder that cannot be written where it is to go: its
    nearest existing folder must take a file (probed with a nameless one; nothing is made), and
    an existing file (a link's target, as the write follows it) must not be read-only: the
    rename over it needs only the folder's permission, and replaced a file the user protected.
    The library's own files (a store's CURRENT) are written again whatever their mode."""
    folder = Path(path).absolute()
    if folder.is_file():  # a file written again: replaced by a sibling renamed over it
        if read_only(folder.resolve()):
            raise PermissionError(f"{folder.resolve()} is read-only: make it writable, or write another file")
        folder = folder.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{path} cannot be written: {folder} is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"{path} cannot be written: {error.strerror or error}") from error


def check_positive_int(name: str, value: object) -> None:
    """Refuse a count below one (a batch size of -1 runs no batch) or not an integer, by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def check_fraction(name: str, value: object) -> float:
    """Refuse a weight that is no number from 0 to 1, by name; returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name} must be a number from 0 to 1, got {value!r}")
    return value


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def text_argument(value: str) -> str:
    """A command-line text that holds more than whitespace (a blank question was answered, then
    refused once every passage had been compressed)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must hold text, got {value!r}")
    return value


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return number


def device_name(value: str) -> str:
    """A device the command line may name: auto, cpu, mps, or cuda with an optional index."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N, mps or auto, got {value!r}")
    return value
