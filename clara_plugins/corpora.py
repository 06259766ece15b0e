"""The official QA benchmark files and passage corpora, read into one shape.

Readers take the files as their authors publish them: HotpotQA and 2WikiMultihopQA
(``context`` = [[title, [sentences]]], gold paragraphs named by ``supporting_facts``),
MuSiQue (``paragraphs`` with ``is_supporting``) and NQ-open with passages
(``ctxs`` with ``isgold``, or DPR's ``has_answer``; DPR's ``positive_ctxs`` and negatives),
gzipped too. 2WikiMultihopQA's answer aliases come in a file of their own
(``id_aliases.json``), which is not read: its answers are scored against the one ``answer``.
``read_documents`` reads passage corpora and plain text files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Generator, Iterable
from pathlib import Path

from .checks import unicode_problem
from .errors import InvalidInputError
from .jsonfiles import data_suffix, jsonl_values, read_json, read_jsonl, read_lines, read_text
from .metrics import normalize_answer


@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    passages: list[str]  # "title\ntext"
    gold: list[int]  # indices of the gold passages
    missing_titles: tuple[str, ...] = ()  # of supporting paragraphs the pool lacks (HotpotQA's dev sample lacks some)

    @property
    def gold_missing(self) -> int:
        return len(self.missing_titles)

    @property
    def gold_complete(self) -> bool:
        return not self.missing_titles


class NotQuestionsError(InvalidInputError):
    """A file of records that are not questions of a known format: a passage file, most often."""


def read_examples(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Read HotpotQA, 2WikiMultihopQA, MuSiQue or NQ (format detected from the rows), at most
    ``limit`` examples.

    MuSiQue-full's questions marked ``"answerable": false`` (their evidence removed from the
    paragraphs) are left out, with a warning: no answer could be read from their passages."""
    path = _existing_file(path)
    try:
        rows = read_json(path, InvalidInputError) if data_suffix(path) == ".json" else read_jsonl(path)
    except InvalidInputError as error:
        if data_suffix(path) in (".json", ".jsonl"):
            raise
        raise NotQuestionsError(str(error)) from error  # a text file, not JSON lines of questions
    if not isinstance(rows, list):
        raise NotQuestionsError(f"{path} holds a JSON {type(rows).__name__}, not a list of questions")
    examples = []
    unanswerable = 0
    for number, row in enumerate(rows):
        if len(examples) == limit:  # examples, as convert-data --skip counts them
            break
        if isinstance(row, dict) and row.get("answerable") is False:
            unanswerable += 1
            continue
        try:
            examples.append(_checked(_example(row, number)))
        except NotQuestionsError as error:
            raise NotQuestionsError(f"{path}, row {number}: {error}") from error
        except (KeyError, TypeError, ValueError) as error:  # a field missing or of the wrong shape
            problem = f"has no field {error}" if isinstance(error, KeyError) else str(error)
            raise InvalidInputError(f"{path}, row {number}: {problem}") from error
    if unanswerable:
        warnings.warn(f"{path}: left out {unanswerable} questions marked unanswerable", stacklevel=2)
    if not examples:
        raise InvalidInputError(f"{path} holds no examples")
    if not any(e.gold for e in examples):  # a format whose gold marks this reader does not know, most often
        warnings.warn(f"{path}: no example marks a gold passage: no recall, Oracle or SCP rows can come from it",
                      stacklevel=2)
    return examples


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Documents from passage files.

    A ``.json`` file holds a list of records and a ``.jsonl`` file one record per line, each
    record's ``text`` or ``contents`` (with its ``title`` in front when present); a ``.tsv``
    file one record per row under a header naming its columns (DPR's ``psgs_w100.tsv``: id,
    text, title); any other file gives one document per blank-line-separated paragraph. A path that is not a file is
    an error: it is never read as the text of a document. So is a record without a text
    (a misspelt field would otherwise index its title alone).
    """
    if isinstance(paths, (str, os.PathLike)):  # a string was read a letter at a time ("d: no such file")
        raise InvalidInputError(f"read_documents takes a list of files, got the one path {os.fspath(paths)!r}: "
                                "pass [path]")
    documents: list[str] = []
    for source in paths:
        path = _existing_file(source)
        if data_suffix(path) in (".json", ".jsonl"):  # PASSAGES.JSONL too: as text it was one document of JSON
            with contextlib.closing(_records(source, path)) as records:  # not left open by a bad record's error
                documents.extend(_record_text(record, f"{source}, record {number}")
                                 for number, record in enumerate(records))
        elif data_suffix(path) == ".tsv":  # as paragraphs it was one document of every row
            documents.extend(_tsv_documents(source, path))
        else:
            # a blank line may hold spaces or a tab: it still ends a paragraph
            documents.extend(p.strip() for p in re.split(r"\n\s*\n", read_text(path)) if p.strip())
    return documents


def _records(source: str | Path, path: Path) -> Generator[object, None, None]:
    """A JSON file's list of records, or a JSONL file's, a line at a time (held whole, a corpus's
    records took 2.6 times the memory of the documents made of them)."""
    if data_suffix(path) == ".jsonl":
        yield from jsonl_values(path)
        return
    records = read_json(path, InvalidInputError)
    if not isinstance(records, list):
        raise InvalidInputError(f"{source} holds a JSON {type(records).__name__}, not a list of records")
    yield from records


def _tsv_documents(source: str | Path, path: Path) -> list[str]:
    """A tab-separated file's rows as documents, its fields read as csv quotes them (DPR's
    passages double the quotes inside a quoted text). A field that opens with a quote and goes
    on past the one closing it is refused by row (read leniently, it lost both quotes, unsaid),
    and a text may be of any length (past csv's 131,072 characters, a well-formed row was refused)."""
    documents: list[str] = []
    lines = read_lines(path)
    rows = csv.DictReader(lines, delimiter="\t", strict=True)
    limit = csv.field_size_limit(2**31 - 1)  # a C long's most on every platform
    try:
        for number, record in enumerate(rows, start=1):
            if None in record:  # a stray tab: its text and title would be misaligned
                raise InvalidInputError(f"{source}, row {number} has {len(rows.fieldnames) + len(record[None])} "
                                        f"fields, more than its header's {len(rows.fieldnames)}")
            if None in record.values():  # read without its title (and another id)
                raise InvalidInputError(f"{source}, row {number} lacks the fields "
                                        f"{', '.join(k for k, v in record.items() if v is None)} of its header")
            if any("\t" in value and "\n" in value for value in record.values() if isinstance(value, str)):
                # a text opening with a quote it never closes ran on over the next rows, read as one
                raise InvalidInputError(f"{source}, row {number} (to line {rows.line_num}): a field runs over tabs "
                                        "and lines, as after a quote left open; quote whole fields, or none")
            documents.append(_record_text(record, f"{source}, row {number}"))
    except csv.Error as error:  # a quote closed inside a field, or one left open at the file's end
        raise InvalidInputError(f"{source}, row {len(documents) + 1}: not a tab-separated row ({error}); a field "
                                "that opens with a quote is read as quoted: quote it whole, doubling the quotes "
                                "inside") from error
    finally:
        csv.field_size_limit(limit)
        lines.close()  # not left open by the error a notebook keeps
    return documents


def _existing_file(source: str | Path) -> Path:
    """The path of a file to read; a missing one is a FileNotFoundError (an OSError, as for any
    file the CLI cannot find), and a folder is never read as a file."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file" if not path.exists() else f"{source} is not a file")
    return path


def _record_text(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where} is a JSON {type(record).__name__}, not a record with a text or contents")
    text = next((value for value in (record.get("text"), record.get("contents"))
                 if isinstance(value, str) and value.strip()), None)
    if text is None:
        kinds = [f"its {field} is a {type(record[field]).__name__}" for field in ("text", "contents")
                 if field in record and not isinstance(record[field], str)]
        raise InvalidInputError(f"{where} has no text or contents to index "
                                f"({', '.join(kinds) or 'its fields: ' + ', '.join(sorted(record))})")
    for field, value in (("title", record.get("title")), ("text", text)):
        # JSON may escape half of a character pair ("\\ud83d"): the id and the tokenizer need whole ones
        problem = unicode_problem(str(value))
        if problem:
            raise InvalidInputError(f"{where}: its {field} is not valid Unicode text ({problem})")
    return f"{record['title']}\n{text}" if record.get("title") else text


def official_format(row: object) -> str | None:
    """The official QA format a record is of, by its fields (None: none this reader knows)."""
    if not isinstance(row, dict):
        return None
    if "context" in row and "supporting_facts" in row:
        return "HotpotQA or 2WikiMultihopQA"
    if "paragraphs" in row:
        return "MuSiQue"
    if "ctxs" in row or "positive_ctxs" in row:  # NQ-open with passages; DPR's retriever output and training files
        return "NQ or DPR"
    return None


def _example(row: dict, number: int) -> QAExample:
    if not isinstance(row, dict):
        raise NotQuestionsError(f"a JSON {type(row).__name__}, not a question record")
    kind = official_format(row)
    if kind == "HotpotQA or 2WikiMultihopQA":
        for title, sentences in row["context"]:  # a paragraph as one string would be read letter by letter
            if not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
                raise TypeError(f"the paragraph {title!r} is {sentences!r:.60}, not a list of sentences")
        titles = {title for title, _ in row["supporting_facts"]}
        spaced = any(s[:1].isspace() for _, sentences in row["context"] for s in sentences[1:])
        passages = [f"{title}\n{_joined(sentences, spaced)}" for title, sentences in row["context"]]
        present = {title for title, _ in row["context"]}
        gold = [i for i, (title, _) in enumerate(row["context"]) if title in titles]
        return QAExample(str(row["_id"]), row["question"], [row["answer"]], *_distinct(passages, gold),
                         tuple(sorted(titles - present)))
    if kind == "MuSiQue":
        passages = [f"{p['title']}\n{p['paragraph_text']}" for p in row["paragraphs"]]
        gold = [i for i, p in enumerate(row["paragraphs"]) if p["is_supporting"]]
        return QAExample(str(row["id"]), row["question"], [row["answer"], *row.get("answer_aliases", [])],
                         *_distinct(passages, gold))
    if kind == "NQ or DPR":
        contexts = row["ctxs"] if "ctxs" in row else [*row["positive_ctxs"], *row.get("hard_negative_ctxs", []),
                                                      *row.get("negative_ctxs", [])]
        passages = [f"{c['title']}\n{c['text']}" for c in contexts]
        if "positive_ctxs" in row:
            gold = list(range(len(row["positive_ctxs"])))
        else:  # the oracle file marks its gold passage; DPR's retriever output, those that hold an answer
            mark = next((key for key in ("isgold", "has_answer", "hasanswer") if any(key in c for c in contexts)), None)
            gold = [i for i, c in enumerate(contexts) if mark and c.get(mark)]
        answers = row["answers"]
        if not (isinstance(answers, list) and answers):
            raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
        return QAExample(f"nq-{number}", row["question"], answers, passages, gold)
    raise NotQuestionsError(f"no known format (HotpotQA, 2WikiMultihopQA, MuSiQue, NQ); its fields: "
                            f"{sorted(row)[:8]}")


def _checked(example: QAExample) -> QAExample:
    """Refuse an example no row can be trained or scored on, as the passage files' records are
    refused: a blank question or answer (a null answer failed in the held-out check, a blank
    one at training) or text that is no valid Unicode (it failed in the tokenizer at training,
    and again at each resume)."""
    if not isinstance(example.question, str) or not example.question.strip():
        raise ValueError(f"its question is {example.question!r:.60}, not a question's text")
    for answer in example.answers:
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"an answer is {answer!r:.60}, not an answer's text")
    for field, text in (("question", example.question), *(("an answer", a) for a in example.answers),
                        *(("a passage", p) for p in example.passages)):
        if (problem := unicode_problem(text)) is not None:
            raise ValueError(f"{field} is not valid Unicode text ({problem})")
    return example


def _joined(sentences: list[str], spaced: bool) -> str:
    """A paragraph from its sentences. 2WikiMultihopQA's carry no space: one goes between each
    two. HotpotQA's (``spaced``) carry the space before them, mostly: not all ("(Jessore
    Road).It is"), so one goes before a word that follows a sentence without it, but for one
    whose opening quote ends the sentence before it ('five times. "' + 'Somebody Said a Prayer"')."""
    if not spaced:
        return " ".join(sentences).strip()
    text = ""
    for sentence in sentences:
        quote_opens = text[-1:] == '"' and not text[-2:-1].strip()
        text += " " + sentence if text[-1:].strip() and sentence[:1].isalnum() and not quote_opens else sentence
    return text.strip()


def _distinct(passages: list[str], gold: list[int]) -> tuple[list[str], list[int]]:
    """The passages with each text once (2WikiMultihopQA repeats a paragraph within a question,
    which would fill two of a reader's k places), and the gold as positions among them."""
    first = {}
    for i, passage in enumerate(passages):
        first.setdefault(passage, len(first))
    return list(first), sorted({first[passages[i]] for i in gold})


def spaced_alike(text: str) -> str:
    """A passage with its whitespace runs as single spaces: one paragraph that two examples
    space differently (NQ writes ".  The" and ". The") is one piece of evidence."""
    return " ".join(text.split())


def after_held_out(held_out: list, rest: list) -> list:
    """``rest`` (examples or passages) without what repeats the held-out ones' (examples, passages,
    or both: another file's) evidence or questions: a gold passage that is a held-out one, or
    shares a quarter or more of the shorter one's word 8-grams with one (NQ gives one paragraph
    in several revisions, windows and spacings); an example that asks a held-out question in
    other words (a gold passage of the same title, an answer in common: NQ dev 21 and 951 both
    ask who sang "From Russia with Love"); and, in the examples kept, a distractor that is a
    held-out gold passage."""
    if not held_out or not rest:
        return rest
    passages = [passage for item in held_out
                for passage in ([item] if isinstance(item, str) else [item.passages[i] for i in item.gold])]
    seen = {spaced_alike(p) for p in passages}
    held_grams = [word_grams(p) for p in passages]
    holders: dict[tuple[str, ...], list[int]] = {}  # each 8-gram: the held-out passages that hold it
    for number, grams in enumerate(held_grams):
        for gram in grams:
            holders.setdefault(gram, []).append(number)

    def repeated(passage: str) -> bool:
        """The passage is a held-out one, or shares a quarter of the shorter one's 8-grams with one."""
        own = word_grams(passage)
        shared = Counter(number for gram in own for number in holders.get(gram, ()))
        return spaced_alike(passage) in seen or any(_quarter_shared(count, len(own), len(held_grams[number]))
                                                    for number, count in shared.items())

    if isinstance(rest[0], str):
        return [passage for passage in rest if not repeated(passage)]
    asked = set().union(*(_facts(e) for e in held_out if not isinstance(e, str)))
    kept = []
    for example in rest:
        if _facts(example) & asked or any(repeated(example.passages[i]) for i in example.gold):
            continue
        # a held-out gold passage among its distractors: the reader trained on it, the retriever to rank it down
        own = [i for i, passage in enumerate(example.passages) if i in example.gold or not repeated(passage)]
        if len(own) < len(example.passages):
            example = dataclasses.replace(example, passages=[example.passages[i] for i in own],
                                          gold=[own.index(i) for i in example.gold])
        kept.append(example)
    return kept


def _facts(example: QAExample) -> set[tuple[str, str]]:
    """(title, answer) for each titled gold passage and answer: what a question asks, in any wording."""
    return {(title, normalize_answer(answer)) for i in example.gold if (title := passage_title(example.passages[i]))
            for answer in example.answers}


def same_evidence(passage: str, grams: set[tuple[str, ...]]) -> bool:
    """The passage shares a quarter or more of the shorter one's word 8-grams with a passage of
    those ``grams``: one paragraph in another revision, window or spacing (``after_held_out``)."""
    own = word_grams(passage)
    return _quarter_shared(len(own & grams), len(own), len(grams))


def _quarter_shared(common: int, grams: int, other_grams: int) -> bool:
    """Two passages of ``grams`` and ``other_grams`` word 8-grams with ``common`` in common are
    one piece of evidence: a quarter or more of the shorter one's."""
    return common > 0 and common >= min(grams, other_grams) / 4


def word_grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def passage_title(passage: str) -> str | None:
    """A "title\ntext" passage's title (None for an untitled one: it names no article)."""
    return passage.partition("\n")[0] if "\n" in passage else None


def document_id(text: str) -> str:
    """A document's id in a store built by ``clara index`` and in ``clara synth``'s rows: its
    text's hash, so that running over the same corpus again skips what is done."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]
