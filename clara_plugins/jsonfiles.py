"""JSON files on disk: one value read with an error that names the file, and JSONL row files."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_file_atomically


def read_json(path: Path, error: type[ValueError]) -> object:
    """A JSON file's value, or ``error`` naming a missing or corrupted file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as missing:
        raise error(f"{path} is missing") from missing
    except json.JSONDecodeError as corrupted:
        raise error(f"{path} is corrupted (not valid JSON): {corrupted}") from corrupted


def read_jsonl(path: str | Path) -> list[dict]:
    """One value per non-blank line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One row per line, replacing ``path`` only once every row is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows))
