"""Training and evaluation rows made from QA examples or from bare passages.

Settings (the paper's): *Normal* gives the 5 passages a BM25 retriever ranks highest among
the example's candidates; *Oracle* puts the gold passages among the 5. End-to-end rows carry
about 20 candidates with ``pos_index`` (gold positions: the targets of the retrieval stage and of
the e2e retrieval term, and of the logged Recall@k).
The teacher-free rows (reconstruction, continuation, cloze, inverse cloze) need only passages.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence

from tqdm.auto import tqdm

from .bm25 import bm25_rank, bm25_ranker, fill_short_pools, with_candidates
from .checks import unicode_problem
from .config import SETTINGS, TrainConfig
from .corpora import QAExample, official_format, same_evidence, word_grams
from .errors import InvalidInputError
from .metrics import recall_at_k
from .prompts import SCP_REWRITES


# a Normal row's k passages are the BM25 best of a pool of at least this many, as clara bench's
# candidates: NQ's one-passage pools, filled to k alone, always held their gold passage
NORMAL_POOL = 20


def instruct_rows(examples: list[QAExample], setting: str = "normal", k: int = 5) -> list[dict]:
    """Rows ``{question, docs[k], answer, answers, pos_index}`` in the Normal or Oracle setting,
    with ``gold_missing`` where a Normal row's k lack supporting passages, as ``e2e_rows``'.

    Oracle rows are made only for examples whose gold passages are all in the pool, and at
    most k. Pools of fewer than k passages (Normal: ``NORMAL_POOL``) are filled from the other
    examples (a training batch needs the same k in every row); an example that still has
    fewer than k is left out, and a warning counts those left out by cause. A Normal k that
    reads every pool whole is refused. Both settings list their passages best BM25 match
    first, as a retriever would: in the pool's order, a set whose gold passage opens every
    pool (NQ's) would teach a reader to trust the first document.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be 'normal' or 'oracle', got {setting!r}")
    pool = k if setting == "oracle" else max(k, NORMAL_POOL)
    filled = fill_short_pools(examples, pool)
    causes = [_no_row_cause(e, setting, k) for e in filled]
    examples = [e for e, cause in zip(filled, causes) if cause is None]
    if setting == "normal" and examples and all(len(e.passages) == k for e in examples):  # its gold one never missed
        raise InvalidInputError(f"a Normal row reads the best k of its pool, and k={k} reads every pool whole: use "
                                "a smaller k, or the oracle setting")
    _warn_left_out(causes, setting)
    rows = []
    for example in tqdm(examples, desc="ranking pools (BM25)", disable=len(examples) < 1000):
        ranked = bm25_rank(example.question, example.passages)
        if setting == "oracle":
            gold = example.gold
            picked = set(gold + [i for i in ranked if i not in gold][: k - len(gold)])
            chosen = [i for i in ranked if i in picked]
        else:
            chosen = ranked[:k]
        found = [n for n, i in enumerate(chosen) if i in example.gold]
        # a recall counts those BM25 left out as not found (rows it missed were left out of it: R@5 100)
        missing = len(example.gold) - len(found) + example.gold_missing
        left_out = [example.passages[i] for i in example.gold if i not in chosen]
        rows.append(_row(example, [example.passages[i] for i in chosen], found, missing, left_out))
    return rows


def _no_row_cause(example: QAExample, setting: str, k: int) -> str | None:
    """Why an example (its pool filled) makes no row of the setting, or None: too few passages
    for k; for Oracle, a gold passage missing from the pool or more than k of them (-k 1 gave a
    2-hop question half its evidence)."""
    if len(example.passages) < k:
        return f"a pool of fewer than {k} passages, even filled from the others"
    if setting == "oracle" and not (example.gold_complete and example.gold):
        return "not all of their gold passages in their pool"
    if setting == "oracle" and len(example.gold) > k:
        return f"more gold passages than k={k}"
    return None


def _warn_left_out(causes: list[str | None], setting: str) -> None:
    """Say how many examples made no row, and why: a conversion that made none named no
    cause (-k below every example's gold passages, pools too few to fill)."""
    why = Counter(cause for cause in causes if cause is not None)
    if why:
        warnings.warn(f"{why.total()} of {len(causes)} examples make no {setting} row: "
                      + "; ".join(f"{count} with {reason}" for reason, count in why.most_common()), stacklevel=3)


def e2e_rows(examples: list[QAExample], candidates: int = 20, seed: int = 0) -> list[dict]:
    """Rows ``{question, docs[candidates], answer, answers, pos_index}`` for end-to-end training,
    with ``gold_missing``, the supporting passages the pool lacks, where there are some: a
    retriever's recall counts them as not found."""
    return [_row(e, e.passages, e.gold, e.gold_missing) for e in with_candidates(examples, candidates, seed)]


def _row(example: QAExample, docs: list[str], pos_index: list[int], gold_missing: int,
         left_out: Sequence[str] = ()) -> dict:
    """A question row, with ``gold_missing`` where its documents lack supporting passages, and
    ``gold_left_out``, the texts of those its pool held (the control passes over the rows that
    read them: another row's documents gave a Normal row its own gold passage back)."""
    return {"id": example.id, "question": example.question, "docs": docs, "answer": example.answers[0],
            "answers": example.answers, "pos_index": pos_index, **({"gold_missing": gold_missing} if gold_missing else {}),
            **({"gold_left_out": list(left_out)} if left_out else {})}


def gold_count(row: dict) -> int:
    """A row's supporting passages, those its pool lacks included: what its recall divides by."""
    return len(row.get("pos_index") or []) + row.get("gold_missing", 0)


def row_recall(ranked: list[int], row: dict, k: int) -> float:
    """Recall@k of a ranking of the row's candidates, a supporting passage its pool lacks
    counted as not found."""
    return recall_at_k(ranked, row.get("pos_index") or [], k, row.get("gold_missing", 0))


def scp_qa_rows(examples: list[QAExample]) -> list[dict]:
    """SCP QA rows from human-written questions: every example answered by one gold passage
    (NQ) becomes ``{"data_type": "qa", question, answers, docs: [that passage]}``. A multi-hop
    example whose pool lacks its other supporting passages is not one (284 of HotpotQA dev's
    685 would be read from half their evidence)."""
    rows = [{"data_type": "qa", "question": [e.question], "answers": [e.answers[0]], "docs": [e.passages[e.gold[0]]]}
            for e in examples if e.gold_complete and len(e.gold) == 1]
    if not rows:
        raise ValueError("no example has exactly one gold passage, all of its evidence (NQ has; the multi-hop "
                         "sets have not)")
    return rows


def reconstruction_rows(passages: list[str]) -> list[dict]:
    """Teacher-free SCP rows: each distinct passage is its own target (``data_type`` "reconstruct")."""
    return [{"data_type": "reconstruct", "answers": [p], "docs": [p]} for p in dict.fromkeys(passages)]


def continuation_rows(passages: list[str]) -> list[dict]:
    """Teacher-free SCP rows: the first half of a passage (by words) is the document, the
    second half the target (``data_type`` "continue"). Runs of spaces count as one (as blank
    words, they made a target of spaces alone)."""
    rows = []
    for passage in dict.fromkeys(passages):
        words = [word for word in passage.split(" ") if word]  # not split(): a title's line break stays
        if len(words) >= 8:
            half = len(words) // 2
            rows.append({"data_type": "continue", "answers": [" ".join(words[half:])],
                         "docs": [" ".join(words[:half])]})
    return rows


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# a number or date, or a run of capitalised words that does not open the sentence
_CLOZE_SPAN = re.compile(r"\b\d[\d,.]*\d\b|\b\d\b|(?<=\w )[A-Z][\w'-]+(?: (?:of |de |the )?[A-Z][\w'-]+)*")


def cloze_rows(passages: list[str], seed: int = 0) -> list[dict]:
    """Teacher-free questions: one sentence of each passage with a number, date or name
    blanked out, answered from the passage's memories (one-document instruction rows)."""
    rng = random.Random(seed)
    rows = []
    for passage in dict.fromkeys(passages):
        title, _, body = passage.partition("\n") if "\n" in passage else ("", "", passage)
        # DPR's quoted title comes again as the text's first words (a heading); elsewhere a text
        # opening with its title opens with its subject, which stays
        if title.startswith('"') and title.endswith('"') and body.startswith(title[1:-1] + " "):
            body = body[len(title) - 1:]
        # a blank whose words stay elsewhere in its sentence ("1980 ... of 1980") is no question
        # nor is a sentence opening in lower case: a split after "U.S." or mid-window lost its subject
        blanks = [(sentence, match) for sentence in _SENTENCE_END.split(body)
                  if len(sentence.split()) >= 6 and not sentence[:1].islower()
                  for match in _CLOZE_SPAN.finditer(sentence)
                  if sentence.lower().count(match.group().lower()) == 1]
        if blanks:
            sentence, match = rng.choice(blanks)
            question = f"Fill in the blank: {sentence[:match.start()]}____{sentence[match.end():]}"
            rows.append({"question": question, "docs": [passage], "answer": match.group(), "answers": [match.group()]})
    return rows


def inverse_cloze_rows(passages: list[str], candidates: int = 5, seed: int = 0) -> list[dict]:
    """Teacher-free retrieval rows ``{question, docs[candidates], pos_index}``: one sentence of a
    passage is the question, the passage without that sentence its gold candidate, and the
    passages of the file that BM25 ranks best for the sentence the others (none that holds the
    sentence, or is the gold text). Cutting the sentence out makes the match one of meaning, not
    of the same words; the title stays."""
    rng = random.Random(seed)
    passages = list(dict.fromkeys(passages))
    picked = []
    for number, passage in enumerate(passages):
        passage = passage.rstrip()  # trailing whitespace would split off an empty last sentence
        start = passage.index("\n") + 1 if "\n" in passage else 0  # the title stays
        spans, begin = [], start
        for gap in _SENTENCE_END.finditer(passage, start):
            spans.append((begin, gap.start()))
            begin = gap.end()
        spans.append((begin, len(passage)))
        # a sentence its title repeats (a title ending in "?", cut at "St.") would stay in its gold
        long = [(passage[a:b], _cut(passage, a, b)) for a, b in spans
                if len(passage[a:b].split()) >= 6 and passage[a:b] not in _cut(passage, a, b)]
        if len(spans) >= 2 and long:
            question, gold = rng.choice(long)
            picked.append((number, question, gold))
    rank, rows = bm25_ranker(passages), []
    for number, question, gold in tqdm(picked, desc="ranking (BM25)", disable=len(picked) < 1000):
        evidence = word_grams(passages[number])  # another revision of the passage is no negative
        fetched = 2 * candidates + 1
        while True:  # wider where a family of lookalikes (one article's boilerplate) filled the first fetch
            negatives = [passages[i] for i in rank(question, fetched) if i != number and passages[i] != gold
                         and question not in passages[i] and not same_evidence(passages[i], evidence)]
            if len(negatives) >= candidates - 1 or fetched >= len(passages):
                break
            fetched = min(4 * fetched, len(passages))
        docs = [gold] + negatives[: candidates - 1]
        rng.shuffle(docs)
        rows.append({"question": question, "docs": docs, "pos_index": [docs.index(gold)]})
    return rows


def _cut(passage: str, start: int, end: int) -> str:
    """The passage without its sentence at [start, end), the text around it joined by a space."""
    head, tail = passage[:start].rstrip(" "), passage[end:].lstrip()
    return head + (" " if head and not head.endswith("\n") and tail else "") + tail


# a run of capitalised words, possibly joined by "of", "de", "the" or "and"
_NAME = re.compile(r"[A-Z][\w'.-]+(?: (?:of |de |the |and )?[A-Z][\w'.-]+)*")
# capitalised words that open a question or a clause rather than name something
_QUESTION_WORDS = {"Which", "What", "Who", "Whom", "Whose", "Where", "When", "How", "Why", "Are", "Is", "Was",
                   "Were", "Did", "Do", "Does", "The", "In", "On", "Of", "A", "An", "This", "That", "These",
                   "Name", "Fill", "Between", "If", "For", "At", "By", "From", "After", "Before"}


def check_training_rows(rows: list[object], config: TrainConfig, corpus: bool = False) -> None:
    """Refuse rows that ``config``'s stage cannot read, naming the first bad row and field,
    before a step runs: a missing field would otherwise stop a run hours in, and
    ``"docs": "text"`` would train on the text's letters.

    SCP rows (``data_type`` set) hold one document and read their ``answers`` (and, for "qa", as many
    ``question`` strings); question rows read ``question``, ``docs``, ``answer`` or ``answers``
    and, in the retrieval stage, ``pos_index``. Where several rows' documents are batched into
    one tensor (instruct, and e2e without a ``corpus`` store), every row has as many as the first.
    """
    if not rows:
        raise ValueError("no training rows")
    batched = config.batch_size > 1 and (config.stage == "instruct" or (config.stage == "e2e" and not corpus))
    # the restatement margin and the text teacher read a question string, which SCP rows lack
    reads_scp = config.stage == "scp" or (config.stage == "instruct" and not config.restate_weight
                                          and not config.distill_weight)
    width = None  # the first row's documents, once checked
    for number, row in enumerate(rows):
        problem = _row_problem(row, config.stage, reads_scp, width)
        if problem:
            raise InvalidInputError(f"training row {number} ({config.stage} stage): {problem}")
        if batched and width is None:
            width = len(row["docs"])


def _row_problem(row: object, stage: str, reads_scp: bool, width: int | None) -> str | None:
    scp = isinstance(row, dict) and "data_type" in row
    if scp and not reads_scp:
        return ("an SCP row (data_type set), which only the scp stage and the instruct stage without "
                "restate_weight or distill_weight read")
    problem = scp_row_problem(row) if scp else question_row_problem(row, needs_answer=stage != "retrieval")
    if problem is None and stage == "scp" and len(row["docs"]) != 1:  # scp_loss compresses docs[0] alone
        return f"the scp stage reads one document a row, and docs holds {len(row['docs'])} (instruct reads more)"
    if problem is None and width is not None and len(row["docs"]) != width:
        return f"{len(row['docs'])} documents, where the first row has {width}: rows are batched together"
    if problem is None and stage == "retrieval" and not row.get("pos_index"):
        return "the retrieval stage learns from each row's gold candidates, and this row has no pos_index"
    return problem


def scp_row_problem(row: dict) -> str | None:
    """What keeps an SCP row ({data_type, docs, answers}, and a question per answer for "qa")
    from being read, or None."""
    if not _strings(row.get("docs")):
        return "docs must be a non-empty list of document texts, none blank"
    if len(row["docs"]) != 1:  # its prompt holds one document's memories
        return f"an SCP row compresses one document, and docs holds {len(row['docs'])}"
    if row["data_type"] not in ("qa", *SCP_REWRITES):
        return f"data_type must be one of {('qa', *SCP_REWRITES)}, got {row['data_type']!r}"
    if not _strings(row.get("answers")):
        return "answers must be a non-empty list of non-blank strings"
    if row["data_type"] == "qa" and not (_strings(row.get("question")) and len(row["question"]) == len(row["answers"])):
        return "a qa row's question must be a list of strings, one for each of its answers"
    return _broken_text(row)


def _official_hint(row: object) -> str:
    """Where converted rows are read, an official QA file given instead named (HotpotQA's is one
    JSON list on one line): it is converted first."""
    if isinstance(row, list) and row and (kind := official_format(row[0])):
        return f" (a file of {kind} records: clara convert-data makes rows of it)"
    if kind := official_format(row):
        return f" (a record of {kind}: clara convert-data makes rows of it)"
    return ""


def question_row_problem(row: object, needs_answer: bool = True) -> str | None:
    """What keeps a question row ({question, docs, answer(s), pos_index}) from being read, or
    None: an SCP row, a missing field, or a field of the wrong shape."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object" + _official_hint(row)
    if "data_type" in row:
        return "an SCP row (data_type set), not a question row"
    if not _strings(row.get("docs")):
        return "docs must be a non-empty list of document texts, none blank" + _official_hint(row)
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "question must be a non-empty string"
    if "answer" in row and not isinstance(row["answer"], str):  # the prompts read it before answers
        return f"answer must be a string, got {type(row['answer']).__name__}"
    if needs_answer and "answer" in row and not row["answer"].strip():  # the generator would learn to answer blank
        return f"answer must not be blank, got {row['answer']!r}"
    if "answers" in row and not _strings(row["answers"]):  # the scores and the restatement margin read it first
        return f"answers must be a non-empty list of non-blank strings, got {row['answers']!r:.80}"
    answered = "answer" in row or "answers" in row  # a blank answer was refused above where one is read
    if needs_answer and not answered:
        return "it needs an answer (a string) or answers (a non-empty list of strings)"
    positions = row.get("pos_index", [])
    if not (isinstance(positions, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                and 0 <= i < len(row["docs"]) for i in positions)):
        return f"pos_index must list positions of its {len(row['docs'])} documents, got {positions!r}"
    missing = row.get("gold_missing", 0)
    if isinstance(missing, bool) or not isinstance(missing, int) or missing < 0:  # recall divides by it
        return f"gold_missing must count the supporting passages its pool lacks (0 or more), got {missing!r}"
    if "gold_left_out" in row and not (_strings(row["gold_left_out"]) and len(row["gold_left_out"]) <= missing):
        # the control compares its texts: a string's letters, a None, failed there
        return (f"gold_left_out must list the texts of supporting passages the row lacks (at most gold_missing, "
                f"{missing}), got {row['gold_left_out']!r:.80}")
    return _broken_text(row)


def _broken_text(row: dict) -> str | None:
    """A field's text that is no valid Unicode (a lone surrogate: text a UTF-16 tool cut mid-emoji),
    which failed at its row's batch, after the answers or steps before it."""
    for field, value in row.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (problem := unicode_problem(text)) is not None:
                return f"{field} is not valid Unicode text ({problem})"
    return None


def reading_row_problem(row: object, needs_answer: bool = True) -> str | None:
    """What keeps a row the reading gain reads (an SCP row, or a question row) from being
    read, or None."""
    if isinstance(row, dict) and "data_type" in row:
        return scp_row_problem(row)
    return question_row_problem(row, needs_answer)


def _strings(value: object) -> bool:
    """A non-empty list of texts, none blank (a blank document has no tokens to compress)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) and v.strip() for v in value)


def row_text(row: dict) -> str:
    """A row's texts (question, answers, documents), one per line."""
    values = [item for value in row.values() for item in (value if isinstance(value, list) else [value])]
    return "\n".join(value for value in values if isinstance(value, str))


def question_name(row: dict) -> str | None:
    """The longest name the row's question holds that shares no word with any of its answers,
    or None: the wrong answer a weak reader gives by restating what the question is about
    ("Where does the Danube rise?" -> "Danube")."""
    def words(text: str) -> set[str]:
        return set(re.findall(r"\w+", text.lower())) - {"the", "a", "an", "of", "and", "in"}

    answers = row.get("answers") or [row["answer"]]
    gold = set().union(*(words(answer) for answer in answers))
    names = []
    for match in _NAME.finditer(row["question"]):
        name = re.sub(r"'s$", "", match.group().rstrip("."))
        first = name.split(" ")[0]
        if first in _QUESTION_WORDS:
            name = name[len(first):].strip()
        if name and not words(name) & gold:
            names.append(name)
    return max(names, key=len, default=None)
