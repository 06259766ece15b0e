"""SCP data synthesis: a teacher LLM turns each document into QA pairs and a paraphrase.

Per document the teacher writes simple QA pairs (one fact each), complex QA pairs (several
facts combined) and a paraphrase; it then lists the document's facts that no question covers,
writes QA pairs for those and checks again, for at most ``max_rounds`` rounds (0: the first
check alone). QA whose answer is not in the
document, and QA sets whose coverage still fails, are dropped; so is a paraphrase of the wrong
length. Rows have the shape the ``scp`` training stage reads:
``{"data_type": "qa", "question": [...], "answers": [...], "docs": [document]}`` and
``{"data_type": "paraphrase", "answers": [text], "docs": [document]}``, each with the
``doc_id`` of its document (what a resume skips by).

The teacher is any callable from prompt to text: ``as_teacher`` wraps a LangChain chat model
or a LlamaIndex LLM, and ``HuggingFaceTeacher`` runs a local Hugging Face chat model. Output
is appended one document at a time with a ``.done`` ledger beside it, so a crash loses at
most the document in progress.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import sole_writer
from .checks import check_output_path, check_texts
from .config import recorded_model_name
from .errors import InvalidInputError
from .jsonfiles import read_jsonl, write_jsonl
from .metrics import normalize_answer

Teacher = Callable[[str], str]

SIMPLE_QA = ("Read the document and write {n} simple questions, each answered by one short fact "
             "copied from the document.\nWrite each pair as two lines:\nQuestion: ...\nAnswer: ...\n\n"
             "Document:\n{document}")
COMPLEX_QA = ("Read the document and write {n} questions that each need two or more of its facts "
              "together, with short answers.\nWrite each pair as two lines:\nQuestion: ...\nAnswer: ...\n\n"
              "Document:\n{document}")
PARAPHRASE = ("Rewrite the document below in your own words, keeping every fact. Reply with the rewritten text "
              "only.\n\nDocument:\n{document}")
COVERAGE = ("Document:\n{document}\n\nQuestions already asked:\n{questions}\n\nList the facts of the document "
            "that none of these questions asks about, one per line. If every fact is covered, write NONE.")
MISSING_QA = ("Write one simple question-answer pair for each fact below, using the document.\nWrite each "
              "pair as two lines:\nQuestion: ...\nAnswer: ...\n\nFacts:\n{facts}\n\nDocument:\n{document}")

# A line that opens a question or an answer, in the ways chat models write them: "Question:",
# "Q:", "Question 2:", "2. Question:", "- Q:", "• Q:", "**Question:**", "**Answer 1:**"; the
# rest of the line is the text. One-line pairs ("Question: ...? Answer: ...") are split at "Answer:".
_LABEL = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:[-*#•>]\s*)*[*_]*\s*(question|q|answer|a)\s*\d*\s*[*_]*\s*:\s*(.*)$",
                    re.I)
_INLINE_ANSWER = re.compile(r"\s+[*_]*answer\s*\d*\s*[*_]*\s*:", re.I)


@dataclasses.dataclass
class SynthesisReport:
    documents: int = 0
    qa_rows: int = 0
    paraphrase_rows: int = 0
    dropped_qa_pairs: int = 0
    dropped_documents_qa: int = 0
    dropped_paraphrases: int = 0
    skipped_done: int = 0
    too_long: int = 0  # documents whose prompts leave the teacher no room to reply: marked done without rows


class PromptTooLongError(InvalidInputError):
    """A prompt that takes all of the teacher's positions: its document is too long for it."""


class CutReply(str):
    """A reply the teacher's token limit ended, its unfinished last line dropped: a cut answer is
    a prefix of the document's words, so it passed as supported, and a cut paraphrase lacks facts
    (never kept). A callable teacher may return one too."""


# what a framework's reply says when its token limit ended it (OpenAI's, Anthropic's, Ollama's, Gemini's,
# Bedrock's), under the keys they say it with; OpenAI's Responses API says it in incomplete_details
_CUT_REASONS = {"length", "max_tokens", "MAX_TOKENS", "max_output_tokens"}
_CUT_KEYS = ("finish_reason", "stop_reason", "done_reason", "stopReason")


def cut_reply(text: str, cut: bool) -> str:
    """The reply to read: stripped, and where its token limit ended it, a ``CutReply`` without
    its last line unless that line ended."""
    if not cut:
        return text.strip()
    return CutReply((text if text.endswith("\n") else text.rpartition("\n")[0]).strip())


def _says_cut(*fields: object) -> bool:
    """Whether a framework's reply fields (dicts, or objects with attributes) name a token-limit stop."""
    for field in fields:
        values = _fields_of(field)
        if any(values.get(key) in _CUT_REASONS for key in _CUT_KEYS) or \
                _fields_of(values.get("incomplete_details")).get("reason") in _CUT_REASONS:
            return True
    return False


def _fields_of(field: object) -> Mapping:
    return field if isinstance(field, Mapping) else getattr(field, "__dict__", {})


def as_teacher(model: object) -> Teacher:
    """A callable teacher from a callable, a LangChain chat model or a LlamaIndex LLM; a reply
    their token limit ended is read as a ``CutReply``. A reply that is a plain string (a
    LangChain completion LLM, a chain ending in a string parser) cannot say so: give such a
    teacher room enough (its max_tokens)."""
    if hasattr(model, "invoke") and hasattr(model, "bind"):  # a LangChain chat model, LLM or chain
        def invoke(prompt: str) -> str:
            reply = model.invoke(prompt)  # a message (its .text joins content blocks), or a string
            if isinstance(reply, str):
                return reply
            return cut_reply(reply.text, _says_cut(getattr(reply, "response_metadata", None)))
        return invoke
    if hasattr(model, "complete"):  # LlamaIndex LLM
        def complete(prompt: str) -> str:
            response = model.complete(prompt)
            raw = _fields_of(response.raw)
            choices = raw.get("choices") or [None]  # OpenAI's: the reason is its first choice's
            return cut_reply(response.text, _says_cut(raw, choices[0], response.additional_kwargs))
        return complete
    if callable(model):
        return model
    raise TypeError(f"cannot use {type(model).__name__} as a teacher")


class HuggingFaceTeacher:
    """A local Hugging Face chat model as teacher (default: the offline SmolLM2 instruct model),
    on ``device`` ("auto": a GPU where there is one) in ``dtype`` ("auto": as ``resolve_dtype``).

    The name, device and dtype are checked at once (the default name: that its package is
    installed) and the weights load at the first prompt, so that a mistyped one is refused
    before anything is written.
    A reply is at most ``max_new_tokens`` long; None: twice the prompt's tokens, at least 256
    (a paraphrase restates the document the prompt holds: a fixed 256 cut the paraphrase of a
    long passage mid-sentence, and the cut one was kept). A reply cut at that limit loses its
    unfinished last line: a cut answer, a prefix of the document's, passed as supported."""

    def __init__(self, name_or_path: str = "smollm2-135m-instruct", max_new_tokens: int | None = None,
                 device: str = "auto", dtype: str = "auto") -> None:
        from .backbone import check_base_model, resolve_device, resolve_dtype

        # as the ledger keeps it: a folder named by a relative path as itself (run from elsewhere, the
        # same "./model" named another teacher, whose rows were mixed with the first's), "~/model" expanded
        self.name_or_path = recorded_model_name(name_or_path)
        check_base_model(self.name_or_path)  # "~/model" as given was no folder to transformers
        self.device = resolve_device(device)  # refused before anything is written, as the name is
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.model = self.tokenizer = None

    def __call__(self, prompt: str) -> str:
        import torch

        from .backbone import context_window, end_of_sequence_ids  # transformers: loaded with the teacher
        from .prompts import render_messages, turn_end_token

        if self.model is None:
            from .backbone import load_base_model

            self.model, self.tokenizer = load_base_model(self.name_or_path, self.dtype)
            self.model.to(self.device).eval()
        # a model without a chat template reads the plain layout the generator gives it
        text = render_messages(self.tokenizer, [{"role": "user", "content": prompt}])
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
        limit = self.max_new_tokens or max(256, 2 * ids.size(1))
        positions = context_window(self.model)
        if positions:  # a reply past the model's positions reads positions it never learned, or fails
            limit = min(limit, positions - ids.size(1))
        if limit < 1:
            raise PromptTooLongError(f"the teacher's prompt takes {ids.size(1)} tokens, all of its {positions} "
                                     "positions: no room for a reply")
        # the template's turn end too, where it is not the end of sequence (Llama 3's <|eot_id|>:
        # replies ran on into made-up turns up to the limit)
        stops = end_of_sequence_ids(self.model, self.tokenizer) | {turn_end_token(self.tokenizer)} - {None}
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            reply = self.model.generate(ids, max_new_tokens=limit, do_sample=False, eos_token_id=sorted(stops),
                                        pad_token_id=min(stops) if pad is None else pad)[0, ids.size(1):]
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        return cut_reply(text, cut=len(reply) == limit and int(reply[-1]) not in stops)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a teacher's reply. A question may wrap over lines; its
    answer is the rest of the answer line, or the next line when that is empty. "Q:" pairs
    with "A:" and "Question:" with "Answer:", so that a multiple-choice option "A: ..." under
    a "Question:" stays part of the question."""
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None  # the lines of the open question
    short = False  # the open question's label was "Q"
    awaiting = False  # an empty answer line: the answer is on the next line
    for line in text.splitlines():
        label = _LABEL.match(line)
        word = label.group(1).lower() if label else ""
        if awaiting and line.strip():
            if not word.startswith("q"):
                pairs.append(("\n".join(question), _clean(line)))
            question, awaiting = None, False
            if not word.startswith("q"):
                continue
        if word.startswith("q"):
            question, short = [], word == "q"
            asked, *answered = _INLINE_ANSWER.split(label.group(2), maxsplit=1)
            if answered and _clean(answered[0]):
                pairs.append((_clean(asked), _clean(answered[0])))
                question = None
            else:
                question.append(_clean(label.group(2)))
        elif word and question is not None and (word == "a") == short:
            if _clean(label.group(2)):
                pairs.append(("\n".join(question), _clean(label.group(2))))
                question = None
            else:
                awaiting = True
        elif question is not None and line.strip():
            question.append(_clean(line))
    return [(q.strip(), a) for q, a in pairs if q.strip() and a]


def _clean(text: str) -> str:
    """A label's text without the markdown emphasis around it ("**Answer:** *Warsaw*")."""
    return text.strip().strip("*_").strip()


def _supported(answer: str, document: str) -> bool:
    """Every normalised answer token appears in the document, its punctuation dropped or read
    as a space (dropped alone, "Poland" was not in "Poland's", nor "lay-abbot" in "lay- abbot")."""
    words = set(normalize_answer(document).split()) | set(normalize_answer(_spaced(document)).split())
    forms = (normalize_answer(answer).split(), normalize_answer(_spaced(answer)).split())
    return any(tokens and all(t in words for t in tokens) for tokens in forms)


def _restates(question: str, answer: str) -> bool:
    """The question writes its answer ("Is Warsaw the capital of Poland?" "Warsaw"), and offers
    no choice ("... Marie or Pierre Curie?" may): such a pair teaches a reader to restate."""
    question, answer = f" {normalize_answer(question)} ", f" {normalize_answer(answer)} "
    return answer in question and f"{answer}or " not in question and f" or{answer}" not in question


def _says_none(line: str) -> bool:
    """A coverage reply's line that says no fact is missing ("NONE", "None.", "NONE!")."""
    return re.fullmatch(r"none\W*", line, re.IGNORECASE) is not None


def _spaced(text: str) -> str:
    return re.sub(r"[^\w\s]", " ", text)


def synthesize_document(document: str, teacher: Teacher, simple: int = 3, complex_: int = 2,
                        max_rounds: int = 3) -> tuple[dict | None, dict | None, dict]:
    """QA row (or None when dropped), paraphrase row (or None) and counts for one document."""
    pairs = parse_pairs(teacher(SIMPLE_QA.format(n=simple, document=document)))
    pairs += parse_pairs(teacher(COMPLEX_QA.format(n=complex_, document=document)))
    covered = False
    for round_ in range(max_rounds + 1):  # a coverage check, then each round's new pairs checked again
        # the pairs the row would keep: one whose answer the document lacks covers nothing, and a
        # question asked again keeps its first answer (two answers to one question taught both)
        first: dict[str, str] = {}
        for question, answer in pairs:
            if _supported(answer, document) and not _restates(question, answer):
                first.setdefault(question, answer)
        kept = list(first.items())
        questions = "\n".join(q for q, _ in kept) or "(none)"
        try:
            coverage = teacher(COVERAGE.format(document=document, questions=questions))
        except PromptTooLongError:  # the document fits, with its questions not: unchecked, the QA is not kept
            break
        reply = [line.strip("-* ").strip() for line in coverage.splitlines()]
        missing = [m for m in reply if m and not _says_none(m)]
        if not any(reply):  # an empty reply (a teacher stopping at once) checked nothing: not covered
            break
        # "NONE", maybe followed by why ("NONE\nEvery fact is covered."): its reasons are no facts
        if not missing or _says_none(next(m for m in reply if m)):
            covered = True
            break
        if round_ == max_rounds:  # no check would follow: pairs asked for now could never be kept
            break
        try:
            pairs += parse_pairs(teacher(MISSING_QA.format(facts="\n".join(missing), document=document)))
        except PromptTooLongError:  # the facts made it too long: the document stays unchecked
            break
    counts = {"dropped_pairs": len(pairs) - len(kept)}  # every round ends in a break, after kept was made
    qa = None
    if covered and kept:
        qa = {"data_type": "qa", "question": [q for q, _ in kept], "answers": [a for _, a in kept],
              "docs": [document]}
    reply = teacher(PARAPHRASE.format(document=document))
    paraphrase_text = _without_preamble(reply.strip(), document)
    ratio = len(paraphrase_text) / max(1, len(document))
    paraphrase = None
    if not isinstance(reply, CutReply) and 0.3 <= ratio <= 2.0 and \
            normalize_answer(paraphrase_text) != normalize_answer(document):
        paraphrase = {"data_type": "paraphrase", "answers": [paraphrase_text], "docs": [document]}
    return qa, paraphrase, counts


def _without_preamble(text: str, document: str) -> str:
    """A rewrite without the line a chat model opens it with ("Here is the rewritten document:",
    "**Sure! Here's a paraphrase:**"), which its rows would teach the reader to write; a first
    line whose words the document holds ("OK Computer track listing:") is its own, and stays."""
    first, _, rest = text.partition("\n")
    line = first.strip("*#_ \t")  # markdown's bold or heading marks around it
    opener = _PREAMBLE.match(line) and line.endswith(":") and \
        normalize_answer(line) not in normalize_answer(document)
    return rest.strip() if opener and rest.strip() else text


_PREAMBLE = re.compile(r"(here|sure|certainly|of course|below|okay|ok)\b|(the )?(rewritten|paraphrased?)\b", re.I)


def synthesize(documents: Iterable[tuple[str, str]], teacher: Teacher, output: str | Path,
               simple: int = 3, complex_: int = 2, max_rounds: int = 3) -> SynthesisReport:
    """Write SCP rows for (doc_id, text) pairs to ``output`` (JSONL), resuming where it stopped
    (with the same teacher: a ``HuggingFaceTeacher``'s name is kept in the ledger). One run at a
    time writes an output: a second, from another process or thread, is refused while the first
    holds ``.NAME.lock`` beside it."""
    if max_rounds < 0:  # no coverage check would run, and the ledger would mark every document done
        raise InvalidInputError(f"max_rounds must be at least 0, got {max_rounds}")
    check_output_path(output)  # a .gz name too: written plain, its resume refused it as a broken gzip file
    output = Path(output)
    documents = list(documents)
    named = next((doc_id for doc_id, _ in documents if not isinstance(doc_id, str)), None)
    if named is not None:  # written as given, then refused by the resume (and the report lost to a warning's join)
        raise InvalidInputError(f"document ids must be strings, got {type(named).__name__} {named!r}")
    check_texts([text for _, text in documents], "documents", blanks=True)  # a None failed once files were made
    output.parent.mkdir(parents=True, exist_ok=True)
    with sole_writer(output, "synthesis run"):  # a second run rewrote the files the first went on appending to
        return _synthesize(documents, teacher, output, simple, complex_, max_rounds)


def _synthesize(documents: list[tuple[str, str]], teacher: Teacher, output: Path, simple: int, complex_: int,
                max_rounds: int) -> SynthesisReport:
    ledger = output.with_name(output.name + ".done")
    if output.exists() != ledger.exists():  # resuming would drop every row, or skip documents it has no rows of
        present, absent = (output, ledger) if output.exists() else (ledger, output)
        raise InvalidInputError(f"{present} exists without {absent.name}, which a synthesis run writes beside it: "
                                "name another output, or move the file away")
    done = set()
    settings = {"simple": simple, "complex_": complex_, "max_rounds": max_rounds}
    teacher_name = getattr(teacher, "name_or_path", None)  # a callable teacher has none to compare
    teacher_name = os.fspath(teacher_name) if isinstance(teacher_name, (str, os.PathLike)) else None
    if ledger.exists():  # written again whole, so that a mark cut short is not continued by the next
        marks = read_jsonl(ledger, appended=True)
        for number, mark in enumerate(marks, 1):  # a KeyError or AttributeError, once the ledger was rewritten
            if not isinstance(mark, dict) or not isinstance(mark.get("doc_id"), str):
                raise InvalidInputError(f"{ledger} line {number} has no doc_id: not a synthesis run's ledger; name "
                                        "another output, or move the files away")
        # a folder recorded as typed before (./teacher) is that folder, where it is found from here
        others = {name for name in {mark.get("teacher") for mark in marks} - {None, teacher_name}
                  if not isinstance(name, str) or recorded_model_name(name) != teacher_name}
        if teacher_name is not None and others:  # two teachers' rows would read as one run's
            raise InvalidInputError(f"{ledger} was written with the teacher {sorted(others)[0]!r}, not "
                                    f"{teacher_name!r}: resume with it, or name another output")
        recorded = next((mark["settings"] for mark in marks if mark.get("settings", settings) != settings), None)
        if recorded is not None:  # and so would rows checked for as many rounds as asked, and for fewer
            raise InvalidInputError(f"{ledger} was written with the settings {str(recorded)[:200]}, not {settings} "
                                    "(--max-rounds, and synthesize's simple and complex_): resume with them, or "
                                    "name another output")
        write_jsonl(marks, ledger)
        done = {mark["doc_id"] for mark in marks}
    if output.exists():
        write_jsonl(_marked_rows(output, done), output)
    report, too_long = SynthesisReport(), []
    if done and documents and not done & {doc_id for doc_id, _ in documents}:  # resuming would redo them all
        raise InvalidInputError(f"{ledger} marks none of these documents done: it was written for another corpus, "
                                "or with other ids (clara synth keyed passages by position before it keyed them "
                                "by text); name another output")
    gone = done - {doc_id for doc_id, _ in documents}
    if gone:  # kept (stored data is not dropped), but a passage edited or removed since is no longer the corpus'
        warnings.warn(f"{output} holds the rows of {len(gone)} passages not among these (edited or removed since, "
                      "or left out by a smaller --limit): they are kept; name another output to leave them out",
                      stacklevel=3)
    with open(output, "a") as rows, open(ledger, "a") as marks:
        for doc_id, text in tqdm(documents, desc="synthesising"):
            if doc_id in done:
                report.skipped_done += 1
                continue
            try:
                qa, paraphrase, counts = synthesize_document(text, teacher, simple, complex_, max_rounds)
            except PromptTooLongError:  # marked, not asked again: every resume stopped at it, unnamed
                too_long.append(doc_id)
                qa = paraphrase = None
            else:
                report.dropped_qa_pairs += counts["dropped_pairs"]
                report.dropped_documents_qa += qa is None
                report.dropped_paraphrases += paraphrase is None
            report.documents += 1
            for row in (qa, paraphrase):
                if row is not None:
                    rows.write(json.dumps({**row, "doc_id": doc_id}) + "\n")
            report.qa_rows += qa is not None
            report.paraphrase_rows += paraphrase is not None
            rows.flush()
            os.fsync(rows.fileno())  # on disk before its mark: after a power loss, a mark alone skipped it for good
            marks.write(json.dumps({"doc_id": doc_id, "qa": qa is not None, "paraphrase": paraphrase is not None,
                                    "teacher": teacher_name, "settings": settings}) + "\n")
            marks.flush()
            done.add(doc_id)  # a document given twice is asked once
    report.too_long = len(too_long)
    if too_long:
        warnings.warn(f"{len(too_long)} documents are too long for the teacher to reply to, and have no rows: "
                      f"{', '.join(too_long[:3])}{' ...' if len(too_long) > 3 else ''}", stacklevel=3)
    return report


def _marked_rows(output: Path, done: set[str]) -> list[dict]:
    """The output's rows less those after the last marked one: the document in progress when the
    last run died (after a power loss, the documents whose marks did not reach the disk). Rows
    of a document not marked before a marked one, or without a ``doc_id``, are no run's
    leftovers: refused, not dropped."""
    rows = read_jsonl(output, appended=True)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("doc_id"), str):
            raise InvalidInputError(f"{output} row {number} has no doc_id: not a synthesis run's row; name another "
                                    "output, or move the file away")
    kept = len(rows)
    while kept and rows[kept - 1]["doc_id"] not in done:
        kept -= 1
    unmarked = next((number for number, row in enumerate(rows[:kept], 1) if row["doc_id"] not in done), None)
    if unmarked is not None:
        raise InvalidInputError(f"{output} row {unmarked} is of a document its ledger does not mark, before rows it "
                                "marks: not one run's rows; name another output, or move the file away")
    return rows[:kept]
