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
    """The id of each stored text, exactly and as a prompt holds it, kept as documents are
    written and deleted (a store of a million documents took 2.5 s to build it again after each
    write). Where several documents hold one text, the one written last is found."""

    def __init__(self, rows: Iterable[tuple[str, str]] = ()) -> None:
        # each text's id, or its ids in the order they were written where several hold it
        self._ids_of_text: dict[str, str | list[str]] = {}  # exact text ->
        self._ids_as_found: dict[str, str | list[str]] = {}  # found_text ->
        self._by_prefix: dict[str, list[str]] = {}  # found_prefix -> found texts, longest first
        self.add(rows)

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """Documents (id, text) written, in their order; an id's earlier text is removed first."""
        for doc_id, text in rows:
            _add_id(self._ids_of_text, text, doc_id)
            found = found_text(text)
            if found not in self._ids_as_found and (prefix := found_prefix(found)):
                bisect.insort(self._by_prefix.setdefault(prefix, []), found, key=lambda t: -len(t))
            _add_id(self._ids_as_found, found, doc_id)

    def remove(self, rows: Iterable[tuple[str, str]]) -> None:
        """Documents (id, text) deleted, or whose text another replaced."""
        for doc_id, text in rows:
            _remove_id(self._ids_of_text, text, doc_id)
            found = found_text(text)
            if _remove_id(self._ids_as_found, found, doc_id) and (prefix := found_prefix(found)):
                self._by_prefix[prefix].remove(found)
                if not self._by_prefix[prefix]:
                    del self._by_prefix[prefix]

    def id_of(self, text: str) -> str | None:
        """The id of a stored text, exactly as given; None if none holds it."""
        return _latest(self._ids_of_text.get(text))

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
            found.append((start, start + len(match), _latest(self._ids_as_found[match])))
            start += len(match)
        return found


def _add_id(ids_of: dict[str, str | list[str]], key: str, doc_id: str) -> None:
    """Make ``doc_id`` the latest of the key's ids (a list only where several hold the key: a
    list a text cost a million texts 168 MiB more)."""
    held = ids_of.get(key)
    if held is None or held == doc_id:
        ids_of[key] = doc_id
    elif isinstance(held, str):
        ids_of[key] = [held, doc_id]
    else:
        if doc_id in held:
            held.remove(doc_id)
        held.append(doc_id)


def _remove_id(ids_of: dict[str, str | list[str]], key: str, doc_id: str) -> bool:
    """Take ``doc_id`` from the key's ids; whether the key holds none any more."""
    held = ids_of[key]
    if isinstance(held, str):
        del ids_of[key]
        return True
    held.remove(doc_id)
    if len(held) == 1:
        ids_of[key] = held[0]
    return False


def _latest(held: str | list[str] | None) -> str | None:
    return held[-1] if isinstance(held, list) else held
