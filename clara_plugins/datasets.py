"""The official QA benchmark formats, read into one shape, and the training-row converters.

Readers take the files as their authors publish them: HotpotQA and 2WikiMultihopQA
(``context`` = [[title, [sentences]]], gold paragraphs named by ``supporting_facts``),
MuSiQue (``paragraphs`` with ``is_supporting``) and NQ-open with passages
(``ctxs`` with ``isgold``). ``read_documents`` reads passage corpora and plain text files.

Settings (the paper's): *Normal* gives the 5 passages a BM25 retriever ranks highest among
the example's candidates; *Oracle* puts the gold passages among the 5. End-to-end rows carry
about 20 candidates with ``pos_index`` (gold positions, used only for logged Recall@k).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import bm25s
import numpy as np


@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    passages: list[str]  # "title\ntext"
    gold: list[int]  # indices of the gold passages
    gold_complete: bool = True  # False when some supporting paragraph is missing from the pool


def read_examples(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Read HotpotQA, 2WikiMultihopQA, MuSiQue or NQ (format detected from the rows)."""
    path = Path(path)
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    examples = [_example(row, number) for number, row in enumerate(rows[:limit])]
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def read_documents(paths: list[str]) -> list[str]:
    """Documents from passage files.

    A ``.json`` file holds a list of records and a ``.jsonl`` file one record per line, each
    record's ``text`` or ``contents`` (with its ``title`` in front when present); any other
    file gives one document per blank-line-separated paragraph. A path that is not a file is
    an error: it is never read as the text of a document.
    """
    documents: list[str] = []
    for source in paths:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file" if not path.exists() else f"{source} is not a file")
        if path.suffix == ".jsonl":
            documents.extend(_record_text(json.loads(line)) for line in path.read_text().splitlines() if line.strip())
        elif path.suffix == ".json":
            documents.extend(_record_text(record) for record in json.loads(path.read_text()))
        else:
            documents.extend(p.strip() for p in path.read_text().split("\n\n") if p.strip())
    return documents


def _record_text(record: dict) -> str:
    text = record.get("text") or record.get("contents") or ""
    return f"{record['title']}\n{text}" if record.get("title") else text


def _example(row: dict, number: int) -> QAExample:
    if "context" in row and "supporting_facts" in row:  # HotpotQA, 2WikiMultihopQA
        titles = {title for title, _ in row["supporting_facts"]}
        passages = [f"{title}\n{''.join(sentences).strip()}" for title, sentences in row["context"]]
        present = {title for title, _ in row["context"]}
        gold = [i for i, (title, _) in enumerate(row["context"]) if title in titles]
        return QAExample(str(row["_id"]), row["question"], [row["answer"]], passages, gold, titles <= present)
    if "paragraphs" in row:  # MuSiQue
        passages = [f"{p['title']}\n{p['paragraph_text']}" for p in row["paragraphs"]]
        gold = [i for i, p in enumerate(row["paragraphs"]) if p["is_supporting"]]
        return QAExample(str(row["id"]), row["question"], [row["answer"], *row.get("answer_aliases", [])],
                         passages, gold)
    if "ctxs" in row:  # NQ-open with passages
        passages = [f"{c['title']}\n{c['text']}" for c in row["ctxs"]]
        gold = [i for i, c in enumerate(row["ctxs"]) if c.get("isgold")]
        return QAExample(f"nq-{number}", row["question"], list(row["answers"]), passages, gold)
    raise ValueError(f"row {number} is in no known format (keys: {sorted(row)[:8]})")


def bm25_rank(query: str, passages: list[str]) -> list[int]:
    """Passage indices, best BM25 match first."""
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, show_progress=False), show_progress=False)
    scores = retriever.get_scores(bm25s.tokenize(query, show_progress=False, return_ids=False)[0])
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]


def _fill_short_pools(examples: list[QAExample], size: int) -> list[QAExample]:
    """Extend every pool shorter than ``size`` with the BM25-best passages of the other examples
    (NQ has one passage per question); the example's own passages and gold stay first."""
    if all(len(e.passages) >= size for e in examples):
        return examples
    everything = [(e.id, p) for e in examples for p in e.passages]
    pool_texts = [p for _, p in everything]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(pool_texts, show_progress=False), show_progress=False)
    result = []
    for example in examples:
        passages = list(example.passages)
        if len(passages) < size:
            tokens = bm25s.tokenize(example.question, show_progress=False, return_ids=False)[0]
            order = np.argsort(-np.asarray(index.get_scores(tokens)), kind="stable")
            extra = [pool_texts[i] for i in order if everything[i][0] != example.id
                     and pool_texts[i] not in passages]
            passages += extra[: size - len(passages)]
        result.append(dataclasses.replace(example, passages=passages))
    return result


def with_candidates(examples: list[QAExample], size: int, seed: int = 0) -> list[QAExample]:
    """Give every example ``size`` candidates in a seeded order: short pools are filled with
    other examples' passages, long pools trimmed to the gold plus the best-ranked others."""
    rng = random.Random(seed)
    result = []
    for example in _fill_short_pools(examples, size):
        passages, gold = list(example.passages), list(example.gold)
        if len(passages) > size:
            ranked = [i for i in bm25_rank(example.question, passages) if i not in gold]
            keep = sorted(gold + ranked[: size - len(gold)])
            gold = [keep.index(i) for i in gold]
            passages = [passages[i] for i in keep]
        order = list(range(len(passages)))
        rng.shuffle(order)
        result.append(dataclasses.replace(example, passages=[passages[i] for i in order],
                                          gold=sorted(order.index(i) for i in gold)))
    return result


def instruct_rows(examples: list[QAExample], setting: str = "normal", k: int = 5) -> list[dict]:
    """Rows ``{question, docs[k], answer, answers, pos_index}`` in the Normal or Oracle setting.

    Oracle rows are made only for examples whose gold passages are all in the pool. Pools of
    fewer than k passages are filled from the other examples (a training batch needs the same
    k in every row); an example that still has fewer is left out.
    """
    if setting not in ("normal", "oracle"):
        raise ValueError(f"setting must be 'normal' or 'oracle', got {setting!r}")
    examples = [e for e in _fill_short_pools(examples, k) if len(e.passages) >= k]
    if setting == "oracle":
        examples = [e for e in examples if e.gold_complete and e.gold]
    rows = []
    for example in examples:
        ranked = bm25_rank(example.question, example.passages)
        if setting == "oracle":
            gold = example.gold[:k]
            chosen = sorted(gold + [i for i in ranked if i not in gold][: k - len(gold)])
        else:
            chosen = ranked[:k]
        rows.append({"id": example.id, "question": example.question, "docs": [example.passages[i] for i in chosen],
                     "answer": example.answers[0], "answers": example.answers,
                     "pos_index": [n for n, i in enumerate(chosen) if i in example.gold]})
    return rows


def e2e_rows(examples: list[QAExample], candidates: int = 20, seed: int = 0) -> list[dict]:
    """Rows ``{question, docs[candidates], answer, answers, pos_index}`` for end-to-end training."""
    return [{"id": e.id, "question": e.question, "docs": e.passages, "answer": e.answers[0],
             "answers": e.answers, "pos_index": e.gold}
            for e in with_candidates(examples, candidates, seed)]


def scp_qa_rows(examples: list[QAExample]) -> list[dict]:
    """SCP QA rows from human-written questions: every example answered by one gold passage
    (NQ) becomes ``{"data_type": "qa", question, answers, docs: [that passage]}``."""
    rows = [{"data_type": "qa", "question": [e.question], "answers": [e.answers[0]], "docs": [e.passages[e.gold[0]]]}
            for e in examples if len(e.gold) == 1]
    if not rows:
        raise ValueError("no example has exactly one gold passage (NQ has; the multi-hop sets have not)")
    return rows


def reconstruction_rows(passages: list[str]) -> list[dict]:
    """Teacher-free SCP rows: each distinct passage is its own target (``data_type`` "reconstruct")."""
    return [{"data_type": "reconstruct", "answers": [p], "docs": [p]} for p in dict.fromkeys(passages)]


def continuation_rows(passages: list[str]) -> list[dict]:
    """Teacher-free SCP rows: the first half of a passage (by words) is the document, the
    second half the target (``data_type`` "continue")."""
    rows = []
    for passage in dict.fromkeys(passages):
        words = passage.split(" ")
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
        body = passage.split("\n", 1)[-1]
        blanks = [(sentence, match) for sentence in _SENTENCE_END.split(body) if len(sentence.split()) >= 6
                  for match in _CLOZE_SPAN.finditer(sentence)]
        if blanks:
            sentence, match = rng.choice(blanks)
            question = f"Fill in the blank: {sentence[:match.start()]}____{sentence[match.end():]}"
            rows.append({"question": question, "docs": [passage], "answer": match.group(), "answers": [match.group()]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
