"""Finding stored documents in a prompt's text: a framework hands the generator a prompt with
the retrieved documents pasted in, and each stored text found there is read from its memory
tokens instead of as text."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

MIN_FOUND_CHARS = 32  # the shortest stored text looked for: a shorter one cannot be told from prose


def found_text(text: str) -> str:
    """A stored text as a prompt holds it: frameworks trim the whitespace around a document on
    its way into a prompt (LlamaIndex's synthesizers and chat engines do)."""
    return text.strip()


def found_prefix(text: str) -> str:
    """The first MIN_FOUND_CHARS characters of a text as a prompt holds it, under which
    ``find_documents`` looks it up; "" for one too short to be looked for."""
    found = found_text(text)
    return found[:MIN_FOUND_CHARS] if len(found) >= MIN_FOUND_CHARS else ""


class TextLookup:
    """The id of each stored text, exactly and as a prompt holds it, from rows in their order:
    where several rows hold one text, the last one's. Rows appended later extend it (a store
    of a million documents took 2.5 s to build it again after each write)."""

    def __init__(self, rows: Iterable[tuple[str, str]] = ()) -> None:
        self.ids_by_text: dict[str, str] = {}  # exact text -> id
        self._ids_as_found: dict[str, str] = {}  # found_text -> id
        self._by_prefix: dict[str, list[str]] = {}  # found_prefix -> found texts, longest first
        self.add(rows)

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """Rows (id, text) that come after those looked up so far."""
        for doc_id, text in rows:
            self.ids_by_text[text] = doc_id
            found = found_text(text)
            if found not in self._ids_as_found and (prefix := found_prefix(found)):
                bisect.insort(self._by_prefix.setdefault(prefix, []), found, key=lambda t: -len(t))
            self._ids_as_found[found] = doc_id

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text``, in order and
        without overlaps (the longest document wins at a position)."""
        found, start = [], 0
        while start <= len(text) - MIN_FOUND_CHARS:
            candidates = self._by_prefix.get(text[start:start + MIN_FOUND_CHARS], ())
            match = next((doc for doc in candidates if text.startswith(doc, start)), None)
            if match is None:
                start += 1
                continue
            found.append((start, start + len(match), self._ids_as_found[match]))
            start += len(match)
        return found
