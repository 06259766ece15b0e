"""Errors that name what is wrong with the user's input or files."""

import json
from pathlib import Path


class InvalidInputError(ValueError):
    """Documents or questions that cannot be compressed or answered (empty, not strings...)."""


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, incomplete, or made for another base model."""


def check_texts(texts: object, what: str) -> list[str]:
    """A non-empty list of non-empty strings, or InvalidInputError naming the first bad item."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidInputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidInputError(f"{what} is empty: pass at least one")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"{what}[{index}] is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InvalidInputError(f"{what}[{index}] is empty or only whitespace")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidInputError(f"{what}[{index}] is not valid Unicode text ({error.reason} at "
                                    f"character {error.start})") from error
    return list(texts)


class StoreError(ValueError):
    """A memory store that is corrupted, or was written by another model or compressor."""


def read_json(path: Path, error: type[ValueError]) -> object:
    """A JSON file's value, or ``error`` naming a missing or corrupted file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as missing:
        raise error(f"{path} is missing") from missing
    except json.JSONDecodeError as corrupted:
        raise error(f"{path} is corrupted (not valid JSON): {corrupted}") from corrupted
