"""Finding stored documents in a prompt's text: a framework hands the generator a prompt with
the retrieved documents pasted in, and each stored text found there is read from its memory
tokens instead of as text."""

from __future__ import annotations

from collections.abc import Iterable

MIN_FOUND_CHARS = 32  # the shortest stored text looked for: a shorter one cannot be told from prose


def found_text(text: str) -> str:
    """A stored text as a prompt holds it: frameworks trim the whitespace around a document on
    its way into a prompt (LlamaIndex's synthesizers and chat engines do)."""
    return text.strip()


def found_prefix(text: str) -> str:
    """The first MIN_FOUND_CHARS characters of a text as a prompt holds it, under which
    ``TextLookup.find`` looks it up; "" for one too short to be looked for."""
    found = found_text(text)
    return found[:MIN_FOUND_CHARS] if len(found) >= MIN_FOUND_CHARS else ""


class TextLookup:
    """The id of each stored text, exactly and as a prompt holds it, kept as documents are
    written and deleted (a store of a million documents took 2.5 s to build it again after each
    write). Where several documents hold one text, one is found: of those built from rows, the
    last row's; of those written since, the one written last."""

    def __init__(self, rows: Iterable[tuple[str, str]] = ()) -> None:
        # each text's id, or its ids in the order they were written where several hold it
        self._ids_of_text: dict[str, _IdsHeld] = {}  # exact text ->
        self._ids_as_found: dict[str, _IdsHeld] = {}  # found_text ->
        # found_prefix -> the lengths of the found texts that begin so, and how many have each:
        # a prompt's piece of each length is looked up whole, longest first
        self._lengths: dict[str, dict[int, int]] = {}
        self.add(rows)

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """Documents (id, text) written, in their order (a replaced one's earlier text is removed first)."""
        for doc_id, text in rows:
            _add_id(self._ids_of_text, text, doc_id)
            found = found_text(text)
            if found not in self._ids_as_found and (prefix := found_prefix(found)):
                lengths = self._lengths.setdefault(prefix, {})
                lengths[len(found)] = lengths.get(len(found), 0) + 1
            _add_id(self._ids_as_found, found, doc_id)

    def remove(self, rows: Iterable[tuple[str, str]]) -> None:
        """Documents (id, text) deleted, or whose text another replaced."""
        for doc_id, text in rows:
            _remove_id(self._ids_of_text, text, doc_id)
            found = found_text(text)
            if _remove_id(self._ids_as_found, found, doc_id) and (prefix := found_prefix(found)):
                lengths = self._lengths[prefix]
                lengths[len(found)] -= 1
                if not lengths[len(found)]:
                    del lengths[len(found)]
                    if not lengths:
                        del self._lengths[prefix]

    def id_of(self, text: str) -> str | None:
        """The id of a stored text, exactly as given; None if none holds it."""
        return _latest(self._ids_of_text.get(text))

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, id) of the stored documents whose text occurs in ``text``, in order and
        without overlaps (the longest document wins at a position)."""
        found, start = [], 0
        while start <= len(text) - MIN_FOUND_CHARS:
            lengths = self._lengths.get(text[start:start + MIN_FOUND_CHARS])
            match = lengths and next((piece for length in sorted(lengths, reverse=True)
                                      if (piece := text[start:start + length]) in self._ids_as_found), None)
            if not match:
                start += 1
                continue
            found.append((start, start + len(match), _latest(self._ids_as_found[match])))
            start += len(match)
        return found


# one id, or where several documents hold a text, their ids in the order written (a dict:
# a list was scanned at every add, and 20,000 copies of one text took 3.7 s to look up)
_IdsHeld = str | dict[str, None]


def _add_id(ids_of: dict[str, _IdsHeld], key: str, doc_id: str) -> None:
    """Make ``doc_id`` the latest of the key's ids (a dict only where several hold the key: one
    a text cost a million texts 168 MiB more)."""
    held = ids_of.get(key)
    if held is None or held == doc_id:
        ids_of[key] = doc_id
    elif isinstance(held, str):
        ids_of[key] = {held: None, doc_id: None}
    else:
        held.pop(doc_id, None)
        held[doc_id] = None


def _remove_id(ids_of: dict[str, _IdsHeld], key: str, doc_id: str) -> bool:
    """Take ``doc_id`` from the key's ids; whether the key holds none any more."""
    held = ids_of[key]
    if isinstance(held, str):
        del ids_of[key]
        return True
    del held[doc_id]
    if len(held) == 1:
        ids_of[key] = next(iter(held))
    return False


def _latest(held: _IdsHeld | None) -> str | None:
    return next(reversed(held)) if isinstance(held, dict) else held
