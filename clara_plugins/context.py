"""Prompts of any layout whose documents the generator reads as memory tokens.

A framework hands ChatClara or ClaraLLM chat messages of plain text, built by whatever
template the user chose. ``read_messages`` turns them into the prompt the generator runs on:

- the exact text of a stored document, wherever it occurs in a message (it must be at least
  ``MIN_FOUND_CHARS`` long; the whitespace around it may be trimmed, as frameworks do), is
  replaced in place by the document's stored memory tokens;
- documents passed explicitly (texts, or store ids) are read as memory tokens too: in place
  where their text occurs (and is that long), otherwise in a ``Background:`` block before the last user message,
  the layout the generator was trained on (at the start of that message's own block, where it has
  one). Texts the store lacks are compressed on the spot;
- all other text (instructions, the question, chat history) is read as text, except blank
  separators between two documents: documents listed one after another read as one block.

The query reasoner ranks the memory documents by how well they match the last user message
(its documents left out; of the trained layout, its question alone); with more than k, only
the top k stay in the prompt. Documents in
place keep their place; the ``Background:`` block lists its documents best first, as the
generator reads its first document most.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch

from .base_store import BaseMemoryStore
from .checks import check_positive_int, check_texts, unicode_problem
from .config import ANSWER_TEMPLATE, SYSTEM_PROMPT
from .errors import InvalidInputError
from .model import ClaraModel, refuse_control_tokens, refuse_text_reader
from .prompts import prompt_positions, render_messages
from .retrieval import top_k
from .found import MIN_FOUND_CHARS, found_text

ROLES = ("system", "user", "assistant")
# the frameworks' other role names; any role not named here (a tool's, a function's) reads as user text
_ROLE_NAMES = {"system": "system", "developer": "system", "assistant": "assistant", "ai": "assistant",
               "model": "assistant", "chatbot": "assistant"}


def chat_role(name: str) -> str:
    """A framework message's role as one of ROLES, alike in both adapters."""
    return _ROLE_NAMES.get(name, "user")


@dataclasses.dataclass
class _Document:
    text: str
    stored_id: str | None  # None: compressed on the spot


@dataclasses.dataclass
class Reading:
    """The prompt the generator runs on, and what it reads."""

    prompt: str  # the rendered chat text; each memory document is one placeholder
    memories: torch.Tensor  # [n_documents, n_mem, hidden], in the order of the placeholders
    stored_ids: list[str]  # the documents read from the store's memory tokens
    compressed: int  # documents compressed on the spot
    positions: int  # input positions the generator reads

    def summary(self) -> dict[str, int]:
        """What a response's metadata reports."""
        return {"memory_documents": len(self.memories), "stored_documents": len(self.stored_ids),
                "compressed_documents": self.compressed, "input_positions": self.positions}


@dataclasses.dataclass
class ReadingStats:
    """Running totals over an adapter's calls: shows that a pipeline reads memory tokens."""

    calls: int = 0
    memory_documents: int = 0
    stored_documents: int = 0
    compressed_documents: int = 0
    input_positions: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # no field: dataclasses.asdict(stats) deep-copied it, and failed

    # a copy (copy.deepcopy, pickle) gets a lock of its own: the lock itself cannot be copied
    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, reading: Reading) -> None:
        with self._lock:
            self.calls += 1
            for name, value in reading.summary().items():
                setattr(self, name, getattr(self, name) + value)


class Reader:
    """What ChatClara and ClaraLLM share: a reading per call, counted in ``stats`` once its
    answer is under way, and one warning when a pipeline has passed them no memory tokens at
    all so far."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.stats = ReadingStats()
        self._warned = False

    def count(self, reading: Reading) -> None:
        """Count a reading whose answer the generator took (a refused call read nothing)."""
        self.stats.add(reading)
        if not self.stats.memory_documents and not self._warned:  # a rewriting step beside reading ones is fine
            self._warned = True
            warnings.warn(f"{self.owner} read no memory tokens: the prompt holds no text of the store's documents "
                          "and no documents were passed, so the generator reads text alone", stacklevel=5)


def passed_documents(documents: object) -> list:
    """The documents a call passed (texts, or a framework's document objects) as a list: any
    collection or iterator but a lone string, whose letters would each be read as a document, a
    dict (its keys), or one document object (a Document iterated as its fields)."""
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, (Collection, Iterator)):
        raise InvalidInputError(f"documents must be a list, got {type(documents).__name__} {documents!r:.60}")
    return list(documents)


def read_messages(
    model: ClaraModel,
    messages: Sequence[tuple[str, str]],
    store: BaseMemoryStore | None = None,
    documents: Sequence[str] = (),
    ids: Sequence[str] = (),
    k: int | None = None,
) -> Reading:
    """Build the generator's prompt from (role, text) messages; roles are system, user, assistant.

    ``documents`` are texts and ``ids`` store ids of documents to read as memory tokens
    besides those the messages contain, each once. ``k`` defaults to ``config.generation_top_k``.
    """
    if not messages or not any(role == "user" for role, _ in messages):
        raise ValueError("the messages need a user message: the question to answer")
    for number, (_, text) in enumerate(messages):  # a lone surrogate failed in the tokenizer, after compressing
        if (problem := unicode_problem(text)) is not None:
            raise InvalidInputError(f"message {number} is not valid Unicode text: {problem}")
        if _MARKER.search(text):  # read as a document's place: memories out of order, or a slot too many
            raise InvalidInputError(f"message {number} holds U+E000, digits, U+E001: the marks of a document's place "
                                    "while the chat template runs")
    unknown = {role for role, _ in messages} - set(ROLES)
    if unknown:
        raise ValueError(f"unknown message roles {sorted(unknown)}; use {ROLES}")
    if ids and store is None:
        raise ValueError("document_ids need a store to read them from")
    if documents:
        check_texts(list(documents), "documents")
    if k is not None:
        check_positive_int("k", k)
    # a template that refuses these turns (roles that must alternate) does so before any compression
    render_messages(model.tokenizer, _with_system([{"role": role, "content": text} for role, text in messages]))
    explicit = [_Document(d.text, d.id) for d in (store.get(ids) if ids else [])]
    missing = set(ids) - {d.stored_id for d in explicit}
    if missing:
        raise ValueError(f"unknown document ids: {sorted(missing)[:5]}")
    stored = store.ids_for_texts(documents) if store is not None and documents else [None] * len(documents)
    explicit += [_Document(text, doc_id) for text, doc_id in zip(documents, stored)]
    once: dict[str, _Document] = {}  # a document passed twice (by id and by text, or in two messages) is read once
    for document in explicit:
        once.setdefault(found_text(document.text), document)
    explicit = list(once.values())

    # Each message becomes pieces: text, or a document read in place.
    pieces = [_split(text, store, explicit) for _, text in messages]
    # the messages' own text (a line between two of its pieces: no token spans documents)
    refuse_control_tokens(model, ["\n".join(p for p in message if isinstance(p, str)) for message in pieces], "message")
    # a document a message holds is read there: cut out, or (overlapping a document cut out there:
    # chunks cut with overlap, a chunk inside a stored passage) as text or inside the other
    placed = {found_text(d.text) for d in explicit if any(_places(text, d) for _, text in messages)}
    background = [d for d in explicit if found_text(d.text) not in placed]
    last_user = max(i for i, (role, _) in enumerate(messages) if role == "user")
    everyone = [d for i, message in enumerate(pieces)  # in the order the prompt will place them
                for d in (background if i == last_user else []) + message if isinstance(d, _Document)]
    if everyone:  # refused by the CLI (ask --docs) and a store; documents= passed it to memory tokens
        refuse_text_reader(model, "its generator reads documents as text: put them in the prompt, not in documents= "
                                  "or document_ids=")
    memories, from_store = _memories(model, store, everyone)
    keep = _kept(model, memories, [found_text(d.text) for d in everyone], pieces[last_user],
                 model.config.generation_top_k if k is None else k, ordered=bool(background))

    rendered, read, order = [], [], iter(range(len(everyone)))
    for i, ((role, _), message) in enumerate(zip(messages, pieces)):
        content = ""
        if i == last_user and background:
            kept = sorted((j for j in (next(order) for _ in background) if j in keep), key=keep.get)
            read += kept
            markers = "".join(map(_marker, kept))
            if kept and message and isinstance(message[0], str) and message[0].startswith(_BACKGROUND):
                # the message has the trained layout (CLARA_PROMPT's): its block takes them first
                message = [_BACKGROUND + markers + message[0][len(_BACKGROUND):], *message[1:]]
            elif kept:  # the top k may keep none of them: then no empty Background block
                content = ANSWER_TEMPLATE.format(documents=markers, question="")
        for piece in message:
            if isinstance(piece, str):
                content += piece
            elif (j := next(order)) in keep:
                read.append(j)
                content += _marker(j)
        rendered.append({"role": role, "content": content})
    # and as they are read: the text around a document left out joins ("</" + it + "s>" made "</s>")
    refuse_control_tokens(model, [message["content"] for message in rendered], "message")
    prompt, read = _placed(render_messages(model.tokenizer, _with_system(rendered)), read, model.document_placeholder)
    return Reading(
        prompt=prompt,
        memories=memories[read] if read else memories[:0],
        stored_ids=[everyone[j].stored_id for j in read if from_store[j]],
        compressed=sum(not from_store[j] for j in read),
        positions=prompt_positions(model.tokenizer, prompt),
    )


def _with_system(rendered: list[dict]) -> list[dict]:
    """The messages, led by one system turn: their own system texts where they bring any
    (joined, in their order), else the trained system prompt. One after the first turn (below a
    history) was read beside the trained one, and a template such as SmolLM2's writes its own
    default system turn before messages that a system turn does not lead."""
    system = [message["content"] for message in rendered if message["role"] == "system"]
    rest = [message for message in rendered if message["role"] != "system"]
    return [{"role": "system", "content": "\n".join(system) if system else SYSTEM_PROMPT}, *rest]


def _marker(document: int) -> str:
    """A document's place in a message until the chat template has laid the messages out."""
    return f"\ue000{document}\ue001"  # private-use characters: no template writes them, and messages may not


_MARKER = re.compile("\ue000[0-9]+\ue001")  # any _marker


def _placed(text: str, read: list[int], placeholder: str) -> tuple[str, list[int]]:
    """The rendered prompt with each document's marker replaced by its memory placeholder, and
    the documents in the order the prompt holds them: memories fill the placeholders in order,
    and a template may move a message (Mistral's puts the system text in the last user turn;
    a template without a system role gets it in the first user turn)."""
    found = {j: text.find(_marker(j)) for j in read}
    lost = [j for j, at in found.items() if at < 0]
    if lost:
        raise InvalidInputError(f"the tokenizer's chat template left out {len(lost)} of the messages' documents "
                                "(a template that drops the system message?): put them in a user message")
    for j in read:
        text = text.replace(_marker(j), placeholder)
    return text, sorted(read, key=found.get)


def _places(text: str, document: _Document) -> bool:
    """Whether ``text`` holds a passed document where it is read in place (a short one, such as
    a name, would be cut out of the question)."""
    found = found_text(document.text)
    return len(found) >= MIN_FOUND_CHARS and found in text


def _split(text: str, store: BaseMemoryStore | None, explicit: list[_Document]) -> list[str | _Document]:
    """A message's text cut into plain text and the documents it contains verbatim."""
    spans = [(start, end, _Document(text[start:end], doc_id))
             for start, end, doc_id in (store.documents_in(text) if store is not None else [])]
    for document in explicit:  # at every place, as a stored one is found
        found = found_text(document.text)
        start = text.find(found) if _places(text, document) else -1
        while start >= 0:
            spans.append((start, start + len(found), document))
            start = text.find(found, start + len(found))
    pieces: list[str | _Document] = []
    position = 0
    for start, end, document in sorted(spans, key=lambda span: (span[0], -span[1])):
        if start < position:
            continue  # overlaps a document already cut out
        between = text[position:start]
        if between and not (between.isspace() and pieces and isinstance(pieces[-1], _Document)):
            pieces.append(between)  # blank separators between two documents carry nothing
        pieces.append(document)
        position = end
    if position < len(text):
        pieces.append(text[position:])
    return pieces


def _memories(model: ClaraModel, store: BaseMemoryStore | None,
              documents: list[_Document]) -> tuple[torch.Tensor, list[bool]]:
    """[len(documents), n_mem, hidden]: stored memory tokens, or fresh ones for other texts
    (and for a stored document a writer deleted or rewrote since it was found); and whether
    each came from the store."""
    empty = torch.zeros(0, model.config.n_mem_tokens, model.hidden_size)
    if not documents:
        return empty, []
    found = [(d.stored_id, found_text(d.text)) for d in documents]
    stored = store.memories_as_found([key for key in found if key[0] is not None]) if store is not None else {}
    fresh_texts = list(dict.fromkeys(d.text for d, key in zip(documents, found) if key not in stored))
    fresh = dict(zip(fresh_texts, model.compress_documents(fresh_texts).cpu())) if fresh_texts else {}
    memories = torch.stack([stored[key] if key in stored else fresh[d.text] for d, key in zip(documents, found)])
    return memories.float(), [key in stored for key in found]


_QUESTION_LABEL = ANSWER_TEMPLATE.split("{question}")[0].rsplit("\n", 1)[-1]  # "Question:"
_BACKGROUND = ANSWER_TEMPLATE.split("{documents}")[0]  # "Background:\n"
# the question's label in the trained layout and in LlamaIndex's question-answering and refine
# prompts ("Query: {query_str}\nAnswer: "), and the lines that may follow it there
_QUERY_LABELS = (_QUESTION_LABEL, "Query:")
_AFTER_QUERY = re.compile(r"\n\s*(?:Original |New )?(?:Answer|Context):")


def _query(text: str) -> str:
    """What the query reasoner reads of the last user message's text: of the trained layout
    (``ANSWER_TEMPLATE``, which CLARA_PROMPT writes) or of LlamaIndex's templates, the question
    alone, as it was trained on and as a store search reads it; "Background:" around it moved
    the mean key elsewhere, and LlamaIndex's instructions ranked a query engine's nodes anew."""
    text = text.strip()
    label = max(_QUERY_LABELS, key=text.rfind)  # the last one the text holds
    if label not in text:
        return text
    return _AFTER_QUERY.split(text.rsplit(label, 1)[1], maxsplit=1)[0].strip()


def _kept(model: ClaraModel, memories: torch.Tensor, texts: list[str], pieces: list[str | _Document], k: int,
          ordered: bool) -> dict[int, int]:
    """The memories the generator reads, each with its rank: the query reasoner's top k of the
    distinct documents (``texts``). A document the prompt holds twice (a chat that repeated its
    passages) counts once and is read at each place: its copies took two of the k. The ranks
    order the Background block (``ordered``); without one, k or fewer documents are all read in
    their places, and the query reasoner has nothing to decide."""
    first: dict[str, int] = {}
    for j, text in enumerate(texts):
        first.setdefault(text, j)
    distinct = list(first.values())
    if len(distinct) <= 1 or (len(distinct) <= k and not ordered):
        return {j: 0 for j in range(len(memories))}
    query = _query("".join(p for p in pieces if isinstance(p, str)))  # not the documents, ranked by themselves
    if not query:
        if len(distinct) <= k and any(isinstance(p, _Document) for p in pieces):  # documents alone: read as given
            order = {text: rank for rank, text in enumerate(first)}
            return {j: order[text] for j, text in enumerate(texts)}
        raise InvalidInputError(f"the last user message holds no text to rank its {len(distinct)} documents by: "
                                "ask the question there")
    # the memories are gathered on the CPU (the store keeps them there); the query is on the model's device
    picked = top_k(model.encode_queries([query]).cpu(), memories[distinct], k, model.config.retrieval_key)[1][0]
    rank_of = {texts[distinct[i]]: rank for rank, i in enumerate(picked.tolist())}
    return {j: rank_of[text] for j, text in enumerate(texts) if text in rank_of}
