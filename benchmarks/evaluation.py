"""Evaluating answers and retrieval on converted rows ({question, docs, answers, pos_index}).

``clara eval`` runs these; the reading gain (``--reading``) is the core's
``clara_plugins.reading``.

Systems, all on one backbone:
- ``clara``: the documents compressed into memory tokens; with more than k documents the
  query reasoner keeps the top-k (its Recall@k is the ``reasoner`` retriever's, below);
- ``control``: ``clara`` reading another question's documents; ``f1_above_control`` pairs the
  two, the measure of whether the generator reads;
- ``text``: the plain base model reading the documents as text (text RAG), or the decoder of a
  checkpoint the text stage trained (``decoder_reads_text``);
- ``none``: the plain base model with no documents.
Retrievers for Recall@k / Precision@k: ``reasoner`` (CLaRa's query reasoner over memory
tokens), ``compressor`` (the question compressed like a document: the untrained reasoner),
``dense`` (a sentence-transformers model) and ``bm25``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from clara_plugins import ClaraModel
from clara_plugins.bm25 import bm25_rank
from clara_plugins.errors import InvalidInputError
from clara_plugins.model import cuts_warned_once, tallied_cuts
from clara_plugins.metrics import (
    answer_scores,
    paired_difference,
    precision_at_k,
    summarize_answer_scores,
)
from clara_plugins.prompts import prompt_positions, question_prompt
from clara_plugins.reading import compressed_pools, first_row_beyond, other_rows, reading_width
from clara_plugins.retrieval import best_first, cosine_scores, top_k
from clara_plugins.rows import gold_count, question_row_problem, reading_row_problem, row_recall

from .dense import DenseRetriever
from .text_reader import read_text, text_prompt

SYSTEMS = ("clara", "control", "text", "none")
RETRIEVERS = ("reasoner", "compressor", "dense", "bm25")


def check_evaluation_rows(rows: Sequence[object], systems: Sequence[str], retrievers: Sequence[str] = (),
                          reading_k: int | None = None, k: int = 5) -> None:
    """Refuse rows the evaluation cannot read, naming the first bad row and field, before a
    model loads: a bad row found later would cost every answer before it.

    Answering systems and the reading gain (``reading_k`` set) read question rows with
    answers; retrievers, question rows of which at least one has gold candidates (``pos_index``);
    the reading gain alone also reads SCP rows, all with as many documents. ``text`` and the
    reading gain read a row's first k documents as they stand, so rows with more (an end-to-end
    pool, in a random order) are refused for them: they would read k random candidates."""
    if not rows:
        raise InvalidInputError("there are no rows to evaluate")
    for number, row in enumerate(rows):
        needs_answer = bool(systems) or reading_k is not None
        problem = (reading_row_problem(row, needs_answer) if not systems and not retrievers
                   else question_row_problem(row, needs_answer))
        if problem:
            raise InvalidInputError(f"row {number}: {problem}")
    if retrievers and not any(gold_count(row) for row in rows):
        raise InvalidInputError("retrievers are scored against each row's gold candidates (pos_index), "
                                "and none of these rows has any")
    longer = first_row_beyond(rows, k)
    if "text" in systems and longer is not None:
        raise InvalidInputError(f"row {longer} has {len(rows[longer]['docs'])} documents, more than k={k}: text "
                                f"would read its first {k} as they stand, not the best ones; give rows of at most "
                                "k documents (clara convert-data --kind instruct)")
    if reading_k is not None:  # which refuses such rows too
        reading_width(rows, reading_k)


def evaluate_answers(model: ClaraModel, rows: Sequence[dict], system: str = "clara", k: int = 5,
                     max_new_tokens: int = 32, batch_size: int = 4, control_shifts: Sequence[int] = (1,),
                     memories: dict[tuple[str, ...], torch.Tensor] | None = None) -> dict:
    """EM, F1 and cover-EM of one system, with its predictions and context positions.

    ``control`` answers like ``clara`` with each row reading the documents of the row ``shift``
    after it among those that hold none of its gold passages (``reading.other_rows``): what the generator
    scores from the wrong documents. Which wrong
    documents it reads moves that score by points, so with several shifts each question's
    scores are averaged over them. Compressing the documents is most of a CLaRa answer's cost
    on CPU, so ``memories`` (documents → their memory tokens) keeps them for later passes and
    calls; a control keeps its own across its shifts when none is given."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    control = system == "control"
    if control:
        partners_of = control_partners(rows, control_shifts)
        memories = {} if memories is None else memories
    answer_lists = [row.get("answers") or [row["answer"]] for row in rows]
    runs, scores, predictions = [], [], []
    for shift in control_shifts if control else [0]:
        partners = partners_of[shift] if control else []
        read = [{**row, "docs": rows[j]["docs"]} for row, j in zip(rows, partners)] if control else rows
        label = f"control, shift {shift}" if control else system
        run = _answer_rows(model, read, "clara" if control else system, label, k, max_new_tokens, batch_size,
                           memories)
        runs.append(run)
        scores.append([answer_scores(p, answers) for p, answers in zip(run["predictions"], answer_lists)])
        predictions += [{"question": row["question"], "prediction": prediction, "answers": answers,
                         **({"documents_of": partners[i]} if control else {})}
                        for i, (row, prediction, answers) in enumerate(zip(rows, run["predictions"], answer_lists))]
    averaged = [{name: statistics.fmean(run[i][name] for run in scores) for name in ("em", "f1", "cover_em")}
                for i in range(len(rows))]
    return {
        "system": system, "examples": len(rows), "k": k,
        **({"shifts": list(control_shifts)} if control else {}),
        **summarize_answer_scores(averaged),
        "context_positions": round(statistics.mean(n for run in runs for n in run["positions"]), 1),
        # all answering time over all answers: a batch of one weighs as one question, not as a batch
        "seconds_per_question": round(sum(t for run in runs for t in run["seconds"]) / (len(runs) * len(rows)), 3),
        "question_f1": [round(100 * s["f1"], 6) for s in averaged],  # the paired differences read these
        "predictions": predictions,
    }


def f1_above_control(clara: dict, control: dict) -> dict:
    """CLaRa's F1 minus the control's on the same rows, with the 95 % interval of the paired
    difference: whether the generator answers from its documents or from the question alone."""
    f1, interval = paired_difference(clara["question_f1"], control["question_f1"])
    return {"f1": f1, "interval": interval}


def control_partners(rows: Sequence[dict], shifts: Sequence[int]) -> dict[int, list[int]]:
    """Whose documents each row reads in the control at each shift (``reading.other_rows``:
    all of a row's documents may be read); a control that would give some row its own
    documents is refused, before any answering runs."""
    if len(rows) < 2:
        raise ValueError(f"the control gives each row another row's documents and needs at least 2 rows, got {len(rows)}")
    if not shifts or any(isinstance(shift, bool) or not isinstance(shift, int) for shift in shifts):
        raise InvalidInputError(f"control shifts are whole numbers of rows, at least one, got {list(shifts)!r:.60}")
    bad = [shift for shift in shifts if not 0 < shift < len(rows)]
    if bad:
        raise ValueError(f"a control shift of {bad[0]} does not name another of the {len(rows)} rows: use shifts "
                         f"from 1 to {len(rows) - 1}")
    width = max(len(row["docs"]) for row in rows)
    partners_of = {}
    for shift in shifts:
        partners = other_rows(rows, width, shift)
        if None in partners:
            raise ValueError(f"row {partners.index(None)}: fewer than {shift} other rows hold none of its gold "
                             f"documents, so a control shift of {shift} gives it none")
        partners_of[shift] = partners
    return partners_of


def _answer_rows(model: ClaraModel, rows: Sequence[dict], reader: str, label: str, k: int, max_new_tokens: int,
                 batch_size: int, memories: dict[tuple[str, ...], torch.Tensor] | None) -> dict[str, list]:
    """One answering pass: each row's prediction and context positions, and each batch's seconds.

    The seconds leave out compressing the documents: done once per pool where ``memories``
    keeps them, it would be charged to whichever pass came first (as a benchmark indexes
    before it times answers)."""
    run: dict[str, list] = {"predictions": [], "positions": [], "seconds": []}
    with cuts_warned_once(model.config.doc_max_length, stacklevel=3):  # once, not a warning a row
        for start in tqdm(range(0, len(rows), batch_size), desc=f"answering ({label})"):
            batch = rows[start:start + batch_size]
            questions = [row["question"] for row in batch]
            if reader == "clara":
                pools = [compressed_pools(model, [row["docs"]], memories)[0] for row in batch]  # a call a row
                began = time.perf_counter()
                answers, counts = _clara_answers(model, batch, pools, k, max_new_tokens)
            else:
                began = time.perf_counter()
                documents = [row["docs"][:k] if reader == "text" else [] for row in batch]
                answers = read_text(model, questions, documents, max_new_tokens)
                counts = [prompt_positions(model.tokenizer, text_prompt(model, q, d))
                          for q, d in zip(questions, documents)]
            run["seconds"].append(time.perf_counter() - began)
            run["predictions"].extend(answers)
            run["positions"].extend(counts)
    return run


def _clara_answers(model: ClaraModel, batch: Sequence[dict], pools: Sequence[torch.Tensor], k: int,
                   max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Each row's answer from its compressed documents (``pools``), of which the query reasoner
    keeps the best k, best first (with k or fewer it only orders them, as a retriever would hand
    them over)."""
    questions = [row["question"] for row in batch]
    queries = model.encode_queries(questions)  # [B, n_mem, hidden], one pass for the batch
    groups = [top_k(query.unsqueeze(0), pool, k, model.config.retrieval_key)[0][0]
              for query, pool in zip(queries, pools)]
    prompts = [question_prompt(model.tokenizer, q, len(g), model.document_placeholder) for q, g in zip(questions, groups)]
    return model.generate(prompts, groups, max_new_tokens), [prompt_positions(model.tokenizer, p) for p in prompts]


def evaluate_retrieval(rows: Sequence[dict], retrievers: Sequence[str], model: ClaraModel | None = None,
                       dense: DenseRetriever | None = None, ks: Sequence[int] = (1, 3, 5),
                       memories: dict[tuple[str, ...], torch.Tensor] | None = None) -> list[dict]:
    """Recall@k and Precision@k of each retriever ranking the rows' candidates against pos_index.

    ``compressor`` encodes the question with the compressor adapter: the query reasoner an
    end-to-end run starts from. Each pool is compressed once for both memory-token retrievers
    (and once for the answering passes too, with their ``memories``). Each result keeps its
    per-question recalls (``question_recall``) for ``recall_above``.
    """
    unknown = [name for name in retrievers if name not in RETRIEVERS]
    if unknown:
        raise ValueError(f"retriever must be one of {RETRIEVERS}, got {unknown[0]!r}")
    retrievers = list(dict.fromkeys(retrievers))  # one named twice scored row i with row i // 2's ranking
    rows = [row for row in rows if gold_count(row)]
    rankings: dict[str, list[list[int]]] = {name: [] for name in retrievers}
    question_cuts: list[int] = []
    with cuts_warned_once(model.config.doc_max_length if model is not None else 0, stacklevel=2):
        for row in tqdm(rows, desc=f"ranking ({', '.join(retrievers)})"):
            kept = {} if memories is None else memories  # without a cache, a row's pool is kept for its row alone
            for name in retrievers:
                if name in ("reasoner", "compressor"):
                    pool = compressed_pools(model, [row["docs"]], kept)[0]
                    encode = model.encode_queries if name == "reasoner" else model.compress_documents
                    with tallied_cuts() as cut:  # a question the compressor encodes is not counted as a document
                        question = encode([row["question"]])
                    question_cuts += cut
                    scores = cosine_scores(question, pool, model.config.retrieval_key)[0]
                    rankings[name].append(best_first(scores).tolist())
                elif name == "dense":
                    rankings[name].append(dense.rank(row["question"], row["docs"]))
                else:
                    rankings[name].append(bm25_rank(row["question"], row["docs"]))
    if any(question_cuts):  # its first doc_max_length tokens, as of a document (the reasoner keeps the end)
        warnings.warn(f"{sum(tokens > 0 for tokens in question_cuts)} questions exceed doc_max_length="
                      f"{model.config.doc_max_length} tokens: the compressor retriever read their beginning",
                      stacklevel=2)
    return [_ranking_scores(name, ranked, rows, ks) for name, ranked in rankings.items()]


def recall_above(first: dict, other: dict) -> list[dict]:
    """One retriever's Recall@k minus another's on the same rows (``evaluate_retrieval`` results
    with the same ks), at each k, with the 95 % interval of the paired difference: on a hundred
    questions two trained retrievers differ by a few points, about the sampling noise."""
    differences = []
    for k, recalls in first["question_recall"].items():
        recall, interval = paired_difference(recalls, other["question_recall"][k])
        differences.append({"retriever": first["retriever"], "over": other["retriever"], "k": int(k),
                            "recall": recall, "interval": interval})
    return differences


def _ranking_scores(retriever: str, rankings: list[list[int]], rows: list[dict], ks: Sequence[int]) -> dict:
    """Recall@k and precision@k in percent, and each question's recall (for paired differences)."""
    result = {"retriever": retriever, "examples": len(rows)}
    question_recall = {}
    for k in ks:
        recalls = [row_recall(r, row, k) for r, row in zip(rankings, rows)]
        result[f"recall@{k}"] = round(100 * statistics.mean(recalls), 2)
        result[f"precision@{k}"] = round(100 * statistics.mean(
            precision_at_k(r, row.get("pos_index") or [], k) for r, row in zip(rankings, rows)), 2)
        question_recall[str(k)] = [round(100 * recall, 6) for recall in recalls]  # the paired differences read these
    result["question_recall"] = question_recall
    return result
