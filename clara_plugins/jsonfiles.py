"""JSON files on disk: one value or JSONL rows, read with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_file_atomically
from .errors import InvalidInputError


def read_json(path: Path, error: type[ValueError]) -> object:
    """A JSON file's value, or ``error`` naming a missing or corrupted file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as missing:
        raise error(f"{path} is missing") from missing
    except json.JSONDecodeError as corrupted:
        raise error(f"{path} is corrupted (not valid JSON): {corrupted}") from corrupted


def read_jsonl(path: str | Path, appended: bool = False) -> list[dict]:
    """One value per non-blank line; a line that is not JSON is an error naming the file and line.

    A file a run ``appended`` to may end in a line that a killed run left cut short: that last
    line alone is dropped, so that the run can resume.
    """
    lines = Path(path).read_text().splitlines()
    last = max((number for number, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if not (appended and number == last):
                raise InvalidInputError(f"{path} line {number + 1} is not JSON: {error}") from error
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One row per line, replacing ``path`` only once every row is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows))
