"""Finding stored documents in a prompt's text: a framework hands the generator a prompt with
the retrieved documents pasted in, and each stored text found there is read from its memory
tokens instead of as text."""

from __future__ import annotations

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


def found_lookup(ids_by_text: dict[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What ``find_documents`` looks for: the id of each stored text as a prompt holds it,
    and those texts, longest first, under their ``found_prefix``."""
    ids = {found_text(text): doc_id for text, doc_id in ids_by_text.items()}
    by_prefix: dict[str, list[str]] = {}
    for text in sorted(ids, key=len, reverse=True):
        if prefix := found_prefix(text):
            by_prefix.setdefault(prefix, []).append(text)
    return ids, by_prefix


def find_documents(text: str, ids_by_text: dict[str, str],
                   texts_by_prefix: dict[str, list[str]]) -> list[tuple[int, int, str]]:
    """(start, end, id) of the stored documents whose text occurs in ``text``, in order and
    without overlaps (the longest document wins at a position); the two maps come from
    ``found_lookup``."""
    found, start = [], 0
    while start <= len(text) - MIN_FOUND_CHARS:
        candidates = texts_by_prefix.get(text[start:start + MIN_FOUND_CHARS], ())
        match = next((doc for doc in candidates if text.startswith(doc, start)), None)
        if match is None:
            start += 1
            continue
        found.append((start, start + len(match), ids_by_text[match]))
        start += len(match)
    return found
