"""Readers of the official QA formats and the training-row converters, on the real files."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from clara_plugins.bm25 import bm25_rank, bm25_top, fill_short_pools, with_candidates
from clara_plugins.cli import main
from clara_plugins.corpora import QAExample, read_examples, spaced_alike
from clara_plugins.errors import InvalidInputError
from clara_plugins.rows import (cloze_rows, continuation_rows, e2e_rows, gold_count, instruct_rows,
                                inverse_cloze_rows, question_name, reconstruction_rows, row_recall, scp_qa_rows)
from conftest import SHARED_DATA, needs_shared_data

NQ_LIKE = QAExample("q1", "where does the danube flow", ["Vienna"], ["Danube\nIt flows through Vienna.",
                                                                      "Seine\nIt flows through Paris."], [0])
MULTI_HOP = QAExample("q2", "who and where", ["x"], ["A\na", "B\nb"], [0, 1])


@needs_shared_data
@pytest.mark.parametrize("path,gold_per_question", [("hotpotqa/dev.json", 2), ("2wikimultihopqa/dev.json", 2),
                                                    ("musique/dev.jsonl", 2), ("nq/dev.jsonl", 1)])
def test_every_official_format_reads_with_its_gold_passages(path, gold_per_question):
    examples = read_examples(SHARED_DATA / path, limit=20)
    assert len(examples) == 20 and all(e.question and e.answers for e in examples)
    # the HotpotQA sample lacks some supporting paragraphs: such examples are flagged incomplete
    complete = [e for e in examples if e.gold_complete]
    assert complete and all(len(e.gold) >= gold_per_question for e in complete)
    assert all(0 <= i < len(e.passages) for e in examples for i in e.gold)


def test_sentences_are_joined_with_the_spaces_each_format_needs(tmp_path):
    # 2WikiMultihopQA's sentences carry no leading space: its passages read "in 930.He is named"
    def row(sentences):
        return {"_id": "1", "question": "q", "answer": "a", "supporting_facts": [["T", 0]],
                "context": [["T", sentences]]}

    # and HotpotQA's their leading space, mostly: dev 25 read "NH 35 (Jessore Road).It is a major";
    # an opening quote ends the sentence before its own: 'five times. " Somebody Said a Prayer"' was read
    (tmp_path / "dev.json").write_text(json.dumps([row(["It rose in 930.", "He is named."]),
                                                   row(["It rose in 930.", " He is named.", '"', "It is old."]),
                                                   row(["One sentence. "]),
                                                   row(["It rose.", ' It charted five times. "', 'Somebody Said" was out.'])]))
    assert [e.passages[0] for e in read_examples(tmp_path / "dev.json")] == [
        "T\nIt rose in 930. He is named.", 'T\nIt rose in 930. He is named." It is old.', "T\nOne sentence.",
        'T\nIt rose. It charted five times. "Somebody Said" was out.']


@pytest.mark.parametrize("name,content,message", [
    ("squad.json", '{"data": []}', r"squad.json holds a JSON dict, not a list of questions"),
    ("musique.jsonl", '{"id": "m1", "question": "q", "answer": "a", "paragraphs": [{"title": "T", "paragraph_text": '
                      '"p"}]}\n', r"musique.jsonl, row 0: has no field 'is_supporting'"),
    ("other.jsonl", '{"id": "q"}\n{"query": "q"}\n', r"other.jsonl, row 0: no known format .* its fields: \['id'\]"),
    ("strings.json", '["a question"]', r"strings.json, row 0: a JSON str, not a question record"),
    ("empty.json", "[]", "empty.json holds no examples"),
    ("nq.jsonl", '{"question": "q", "answers": "Paris", "ctxs": []}\n',  # its letters were the answers
     r"nq.jsonl, row 0: answers must be a non-empty list of strings, got 'Paris'"),
    ("nq.jsonl", '{"question": "q", "answers": [], "ctxs": []}\n', r"nq.jsonl, row 0: answers must be"),
    # written as rows, then failed: a null answer in the held-out check, a blank one at training,
    # a lone surrogate in the tokenizer (and again at each resume)
    ("hotpot.json", '[{"_id": "1", "question": "q", "answer": null, "supporting_facts": [], "context": []}]',
     r"hotpot.json, row 0: an answer is None, not an answer's text"),
    ("nq.jsonl", '{"question": "q", "answers": [""], "ctxs": []}\n', r"nq.jsonl, row 0: an answer is '', not"),
    ("nq.jsonl", '{"question": " ", "answers": ["a"], "ctxs": []}\n', r"nq.jsonl, row 0: its question is ' ', not"),
    ("hotpot.json", '[{"_id": "1", "question": "q", "answer": "a", "supporting_facts": [], '
                    '"context": [["T", ["It \\ud83d rose."]]]}]',
     r"hotpot.json, row 0: a passage is not valid Unicode text \(surrogates not allowed at character 5\)"),
    # a sentence given as a list failed on a bare AttributeError; a paragraph given as one string
    # was read letter by letter ("T h e  D a n u b e")
    ("hotpot.json", '[{"_id": "1", "question": "q", "answer": "a", "supporting_facts": [], '
                    '"context": [["T", ["It rose.", ["in", "930"]]]]}]',
     r"hotpot.json, row 0: the paragraph 'T' is \['It rose.', \['in', '930'\]\], not a list of sentences"),
    ("hotpot.json", '[{"_id": "1", "question": "q", "answer": "a", "supporting_facts": [], '
                    '"context": [["T", "It rose. In 930."]]}]',
     r"hotpot.json, row 0: the paragraph 'T' is 'It rose. In 930.', not a list of sentences"),
    ("musique.jsonl", '{"id": "m", "question": "q\\ud83d", "answer": "a", "paragraphs": []}\n',
     r"musique.jsonl, row 0: question is not valid Unicode text"),
])
def test_question_files_of_the_wrong_shape_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        read_examples(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="typo.json: no such file"):  # exit code 3, as any missing file
        read_examples(tmp_path / "typo.json")


def test_musique_questions_marked_unanswerable_are_left_out_with_a_warning(tmp_path):
    # their evidence is removed from the paragraphs: they were scored (and trained on) as answerable
    def row(id_, answerable):
        return json.dumps({"id": id_, "question": "q?", "answer": "a", "answerable": answerable, "paragraphs": [
            {"title": "T", "paragraph_text": "a", "is_supporting": answerable}]})

    (tmp_path / "musique.jsonl").write_text(f"{row('kept', True)}\n{row('dropped', False)}\n{row('next', True)}\n")
    with pytest.warns(UserWarning, match="left out 1 questions marked unanswerable"):
        assert [e.id for e in read_examples(tmp_path / "musique.jsonl")] == ["kept", "next"]
    # a limit counts examples, as convert-data --skip does: the held-out first 2 were one
    with pytest.warns(UserWarning):
        assert [e.id for e in read_examples(tmp_path / "musique.jsonl", limit=2)] == ["kept", "next"]


def test_nq_reads_as_dpr_and_lost_in_the_middle_publish_it(tmp_path):
    # DPR's retriever output (has_answer) was read with no gold passage, its training file was
    # "no known format", and the gzipped oracle file "not UTF-8 text"
    import gzip

    ctxs = [{"title": "Danube", "text": "It flows through Vienna.", "has_answer": True},
            {"title": "Rhine", "text": "It flows through Basel.", "has_answer": False}]
    (tmp_path / "retrieved.jsonl").write_text(json.dumps({"question": "q", "answers": ["Vienna"], "ctxs": ctxs}))
    assert read_examples(tmp_path / "retrieved.jsonl")[0].gold == [0]
    training = {"question": "q", "answers": ["Vienna"], "positive_ctxs": ctxs[:1], "hard_negative_ctxs": ctxs[1:],
                "negative_ctxs": []}
    (tmp_path / "train.json").write_text(json.dumps([training]))
    example = read_examples(tmp_path / "train.json")[0]
    assert example.passages == ["Danube\nIt flows through Vienna.", "Rhine\nIt flows through Basel."]
    assert example.gold == [0]
    with gzip.open(tmp_path / "oracle.jsonl.gz", "wt") as handle:
        handle.write((tmp_path / "retrieved.jsonl").read_text())
    assert read_examples(tmp_path / "oracle.jsonl.gz") == read_examples(tmp_path / "retrieved.jsonl")
    unmarked = [{k: v for k, v in c.items() if k != "has_answer"} for c in ctxs]
    (tmp_path / "unmarked.jsonl").write_text(json.dumps({"question": "q", "answers": ["Vienna"], "ctxs": unmarked}))
    with pytest.warns(UserWarning, match="no example marks a gold passage"):
        read_examples(tmp_path / "unmarked.jsonl")


def test_a_damaged_gzip_file_is_named(tmp_path):
    # a damaged deflate stream raised zlib's own error, which named no file
    import gzip

    from clara_plugins.jsonfiles import read_jsonl

    packed = bytearray(gzip.compress("\n".join(json.dumps({"text": f"passage {i} " * 40}) for i in range(200)).encode()))
    packed[20:60] = bytes(b ^ 0xFF for b in packed[20:60])
    (tmp_path / "corpus.jsonl.gz").write_bytes(bytes(packed))
    with pytest.raises(InvalidInputError, match="corpus.jsonl.gz is not a whole gzip file"):
        read_jsonl(tmp_path / "corpus.jsonl.gz")


def test_jsonl_and_tsv_files_are_read_a_line_at_a_time_as_their_whole_text_reads(tmp_path, monkeypatch):
    # a corpus was held whole (its bytes, its text, and a copy or its lines) beside the rows made of it
    import gzip

    from clara_plugins import jsonfiles
    from clara_plugins.corpora import read_documents
    from clara_plugins.jsonfiles import read_jsonl, read_lines, read_text

    text = '\ufeff{"text": "a\u2028b"}\r\n{"text": "c\u00e9"}\r{"text": "d"}\n\n{"text": "e"}'
    (tmp_path / "rows.jsonl").write_bytes(text.encode("utf-8"))
    with gzip.open(tmp_path / "rows.jsonl.gz", "wb") as handle:
        handle.write(text.encode("utf-8"))
    for name in ("rows.jsonl", "rows.jsonl.gz"):
        assert "".join(read_lines(tmp_path / name)) == read_text(tmp_path / name)
    tsv = 'id\ttext\ttitle\r\n1\t"A ""quoted""\r\nline"\tT\r\n2\tplain\tU\n'
    (tmp_path / "p.tsv").write_text(tsv, newline="")
    monkeypatch.setattr(jsonfiles, "read_text", lambda *a: pytest.fail("the whole file was read"))
    assert [row["text"] for row in read_jsonl(tmp_path / "rows.jsonl")] == ["a\u2028b", "c\u00e9", "d", "e"]
    assert read_documents([str(tmp_path / "p.tsv")]) == ['T\nA "quoted"\nline', "U\nplain"]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xe2\x28"}\n')
    with pytest.raises(InvalidInputError, match="bad.jsonl is not UTF-8 text: byte 24 cannot be decoded"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "cut.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"te')  # a killed run's last line
    assert read_jsonl(tmp_path / "cut.jsonl", appended=True) == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "cut.jsonl").write_text('{"text": "a"}\n{"te\n{"text": "b"}\n')  # not the last: damaged
    with pytest.raises(InvalidInputError, match="cut.jsonl line 2 is not JSON"):
        read_jsonl(tmp_path / "cut.jsonl", appended=True)


def test_a_corpus_whose_record_is_refused_is_not_left_open_by_the_error(tmp_path):
    # the error's traceback held the line reader, and its file stayed open while a notebook kept it
    from clara_plugins.corpora import read_documents

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("lists open files through /proc")

    def open_files() -> set[str]:
        return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"title": "no text"}\n{"text": "b"}\n')
    (tmp_path / "c.tsv").write_text("id\ttext\ttitle\n1\ta\tA\n2\tb\n")
    (tmp_path / "n.jsonl").write_text('{"text": "a", "n": 1' + "0" * 5000 + "}\n")  # a bare ValueError before
    for name, message in [("c.jsonl", "c.jsonl, record 1 has no text"), ("c.tsv", "c.tsv, row 2 lacks the fields"),
                          ("n.jsonl", "n.jsonl line 1 is corrupted: Exceeds the limit")]:
        with pytest.raises(InvalidInputError, match=message) as kept:
            read_documents([str(tmp_path / name)])
        assert str(tmp_path / name) not in open_files() and kept.value


def test_json_nested_deeper_than_python_reads_is_named(tmp_path):
    # a bare RecursionError, which named no file
    from clara_plugins.jsonfiles import read_json, read_jsonl

    (tmp_path / "rows.jsonl").write_text('{"question": "q"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(InvalidInputError, match="rows.jsonl line 2 nests its JSON deeper than Python can read"):
        read_jsonl(tmp_path / "rows.jsonl")
    (tmp_path / "rows.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidInputError, match="rows.json nests its JSON deeper than Python can read"):
        read_json(tmp_path / "rows.json", InvalidInputError)


def test_a_paragraph_repeated_within_a_question_is_one_passage(tmp_path):
    # 2WikiMultihopQA repeats a paragraph in about 4 % of its questions: it took two of k places
    context = [["Pirates", ["A film."]], ["Vienna", ["A city."]], ["Pirates", ["A film."]], ["Danube", ["A river."]]]
    (tmp_path / "2wiki.json").write_text(json.dumps([{"_id": "x", "question": "q?", "answer": "a", "context": context,
                                                      "supporting_facts": [["Danube", 0], ["Pirates", 0]]}]))
    example = read_examples(tmp_path / "2wiki.json")[0]
    assert example.passages == ["Pirates\nA film.", "Vienna\nA city.", "Danube\nA river."] and example.gold == [0, 2]


@needs_shared_data
def test_oracle_rows_hold_the_gold_passages_and_e2e_rows_point_at_them():
    examples = read_examples(SHARED_DATA / "hotpotqa" / "dev.json", limit=40)
    oracle = instruct_rows(examples, "oracle", k=5)
    complete = [e for e in examples if e.gold_complete]
    assert len(oracle) == len(complete) > 0  # oracle rows only where every gold passage exists
    for example, row in zip(complete, oracle):
        assert len(row["docs"]) == 5 and len(row["pos_index"]) == 2
        assert {row["docs"][i] for i in row["pos_index"]} == {example.passages[i] for i in example.gold}
    pools = e2e_rows(examples, candidates=20)
    assert len(pools) == len(examples)
    for example, row in zip(examples, pools, strict=True):
        assert len(row["docs"]) == 20
        assert {row["docs"][i] for i in row["pos_index"]} == {example.passages[i] for i in example.gold}


def test_a_pool_is_filled_with_each_shared_passage_once():
    # a paragraph several other questions share filled one pool two or three times
    shared = "Vienna\nThe Danube flows through Vienna."
    examples = [QAExample("a", "where does the danube flow", ["Vienna"], ["Danube\nIt rises in the Black Forest."], [0]),
                QAExample("b", "b", ["x"], [shared], [0]), QAExample("c", "c", ["x"], [shared], [0]),
                QAExample("d", "d", ["x"], ["Paris\nThe Seine flows through Paris."], [0])]
    filled = fill_short_pools(examples, 3)[0].passages
    assert filled[1] == shared and filled.count(shared) == 1 and len(filled) == 3
    # nor does its own gold passage, spaced otherwise by another example, come back as a distractor
    respaced = QAExample("e", "e", ["x"], ["Danube\nIt rises  in the Black Forest."], [0])
    assert "Danube\nIt rises  in the Black Forest." not in fill_short_pools(examples + [respaced], 4)[0].passages


def test_a_pool_is_not_filled_with_its_own_evidence_from_another_example():
    # NQ gives one paragraph to several questions in other windows, and HotpotQA's dev sample
    # lacks supporting paragraphs that neighbours hold: either was added unmarked, a distractor
    window = ("First Battle of Bull Run\nThe First Battle of Bull Run was fought on July 21, 1861 in Prince "
              "William County, Virginia. It was a Confederate victory, followed by a disorganized retreat.")
    other_window = ("First Battle of Bull Run\nfought on July 21, 1861 in Prince William County, Virginia. It was "
                    "a Confederate victory, followed by a disorganized retreat of the Union forces.")
    coldplay = "Coldplay\nColdplay are a British rock band formed in London in 1996."
    examples = [QAExample("nq-310", "who won the first battle of bull run", ["Confederate victory"], [window], [0]),
                QAExample("nq-859", "when was the first battle of bull run", ["1861"], [other_window], [0]),
                QAExample("hp", "are coldplay and pierre bouvier from the same country", ["no"],
                          ["Pierre Bouvier\nPierre Bouvier is a Canadian singer."], [0], missing_titles=("Coldplay",)),
                QAExample("hp2", "which band formed in london", ["Coldplay"], [coldplay], [0]),
                QAExample("x", "x", ["x"], ["Rome\nRome is the capital of Italy and of its Lazio region."], [0])]
    pools = [example.passages for example in fill_short_pools(examples, 3)]
    assert other_window not in pools[0] and window not in pools[1] and coldplay not in pools[2]
    assert len(pools[0]) == len(pools[2]) == 3  # filled with what is no evidence of theirs


def test_the_best_n_passages_are_the_start_of_the_full_ranking_ties_in_index_order():
    # the n best are selected without sorting the whole corpus: ties at the cut must fall as in a stable sort
    passages = ["Danube\nA river."] * 4 + ["Danube\nThe Danube is a river."] * 3 + ["Seine\nParis."] * 5
    for query in ("the danube river", "paris", "Is it?"):
        full = bm25_rank(query, passages)
        assert [bm25_top([query], passages, n)[0] for n in range(len(passages) + 2)] == \
            [full[:n] for n in range(len(passages) + 2)]


@needs_shared_data
def test_pools_filled_from_the_best_few_are_those_the_whole_ranking_filled():
    # each question walked its ranking of every passage in the file: hours on an official train split
    def reference(examples, size):  # the whole ranking, each question
        texts = [(e.id, p) for e in examples for p in e.passages]
        filled = []
        for example in examples:
            passages = list(example.passages)
            ranking = bm25_rank(example.question, [p for _, p in texts])
            own = {spaced_alike(p) for p in passages}
            extra = {}
            for i in ranking:
                if texts[i][0] != example.id and spaced_alike(texts[i][1]) not in own:
                    extra.setdefault(spaced_alike(texts[i][1]), texts[i][1])
            filled.append(passages + list(extra.values())[: max(0, size - len(passages))])
        return filled

    examples = read_examples(SHARED_DATA / "nq" / "dev.jsonl", limit=120)
    assert [e.passages for e in fill_short_pools(examples, 20)] == reference(examples, 20)


def test_a_question_of_stopwords_alone_ranks_every_passage():
    # bm25s found no query word in "Is it?" and failed, taking a whole conversion with it
    assert sorted(bm25_rank("Is it?", ["Danube\nA river.", "Seine\nAnother river."])) == [0, 1]


@needs_shared_data
def test_oracle_rows_list_their_passages_best_bm25_match_first_not_gold_first():
    examples = fill_short_pools(read_examples(SHARED_DATA / "nq" / "dev.jsonl", limit=40), 5)
    rows = instruct_rows(examples, "oracle", k=5)
    examples = {e.id: e for e in examples}
    assert len(rows) > 20
    for row in rows:
        example = examples[row["id"]]
        ranked = bm25_rank(example.question, example.passages)
        order = [ranked.index(example.passages.index(doc)) for doc in row["docs"]]
        assert order == sorted(order)
    # NQ's gold passage opens every pool; listed in pool order it would open every row
    assert {row["pos_index"][0] for row in rows} != {0}


def test_instruction_rows_all_have_k_documents():
    three = QAExample("q3", "which river flows through Vienna", ["Danube"],
                      ["Seine\nIt flows through Paris.", "Thames\nIt flows through London.",
                       "Danube\nIt flows through Vienna."], [2])
    rows = instruct_rows([NQ_LIKE, three], k=3, setting="oracle")
    assert [len(row["docs"]) for row in rows] == [3, 3]  # the 2-passage pool got one of q3's passages
    assert rows[0]["docs"][rows[0]["pos_index"][0]] == NQ_LIKE.passages[0]
    assert rows[1]["docs"][rows[1]["pos_index"][0]].startswith("Danube")
    # nothing to fill from: the left-out example is said, and why (a conversion that made no row named no cause)
    with pytest.warns(UserWarning) as caught:
        assert instruct_rows([NQ_LIKE], k=3) == []
    assert [str(w.message) for w in caught] == [
        "1 of 1 pools hold fewer than 20 passages: the other examples' passages could not fill them (fill from "
        "more examples)",
        "1 of 1 examples make no normal row: 1 with a pool of fewer than 3 passages, even filled from the others"]
    assert {w.filename for w in caught} == {__file__}
    # a Normal k of the whole pool read every passage: its gold one was never missed
    with pytest.raises(InvalidInputError, match="k=3 reads every pool whole: use a smaller k"):
        instruct_rows([NQ_LIKE, three], k=3)
    wide = dataclasses.replace(three, passages=[*three.passages, *(f"Town {i}\nA town." for i in range(24))])
    assert len(instruct_rows([wide], k=20)) == 1  # the best 20 of 27
    with pytest.warns(UserWarning, match="2 of 2 pools hold fewer than 5 passages") as caught:  # e2e rows too
        assert [len(row["docs"]) for row in e2e_rows([NQ_LIKE, three], candidates=5)] == [3, 3]
    assert caught[0].filename == __file__  # the caller's line, not one inside the library


def test_normal_rows_are_the_best_k_of_a_pool_the_gold_passage_may_miss():
    # NQ's one-passage pools, filled to k alone, always held their gold passage: Oracle rows
    bridges = [QAExample(f"b{i}", f"what is bridge {i}", ["x"],
                         [f"Bridge {i}\nThe Danube flows through the city; the city lies on the Danube."], [0])
               for i in range(30)]
    asked = QAExample("q", "which city does the Danube flow through", ["Vienna"],
                      ["Danube\nIt rises in the Black Forest and reaches Vienna."], [0])
    row = instruct_rows([asked, *bridges], "normal", k=5)[0]
    assert len(row["docs"]) == 5 and row["pos_index"] == []  # the best 5 of 20: the gold one is not among them
    assert gold_count(row) == 1 and row_recall([0, 1, 2, 3, 4], row, 5) == 0.0  # and is counted as not found


def test_oracle_rows_hold_every_gold_passage_or_are_not_made():
    # -k 1 gave a two-hop question one of its two supporting passages, often not the answer's
    two_hop = QAExample("q3", "Where does the river through Vienna rise?", ["the Black Forest"],
                        ["Danube\nThe Danube rises in the Black Forest.", "Vienna\nThe Danube flows through Vienna."],
                        [0, 1])
    with pytest.warns(UserWarning, match="1 of 1 examples make no oracle row: 1 with more gold passages than k=1"):
        assert instruct_rows([two_hop], k=1, setting="oracle") == []
    rows = instruct_rows([two_hop], k=2, setting="oracle")
    assert len(rows) == 1 and sorted(rows[0]["pos_index"]) == [0, 1]


def test_scp_qa_rows_read_the_single_gold_passage():
    rows = scp_qa_rows([NQ_LIKE, MULTI_HOP])
    assert rows == [{"data_type": "qa", "question": ["where does the danube flow"], "answers": ["Vienna"],
                     "docs": ["Danube\nIt flows through Vienna."]}]
    with pytest.raises(ValueError, match="exactly one gold passage"):
        scp_qa_rows([MULTI_HOP])
    # a HotpotQA example whose second supporting paragraph is missing from its pool
    half = dataclasses.replace(MULTI_HOP, gold=[0], missing_titles=("C",))
    with pytest.raises(ValueError, match="exactly one gold passage"):
        scp_qa_rows([half])
    # and its end-to-end row says so: its recall counts the missing one as not found
    assert [row.get("gold_missing") for row in e2e_rows([half, NQ_LIKE], candidates=2)] == [1, None]


def test_continuation_rows_split_each_passage_in_half():
    passage = "Title\none two three four five six seven eight nine"
    assert continuation_rows([passage, "too short"]) == [
        {"data_type": "continue", "answers": ["five six seven eight nine"], "docs": ["Title\none two three four"]}]
    # runs of spaces made blank words: a target of spaces alone, which training refuses
    spaced = "one two three four five six seven eight" + " " * 16
    assert continuation_rows([spaced, "delta    epsilon zeta eta theta iota kappa lambda"]) == [
        {"data_type": "continue", "answers": ["five six seven eight"], "docs": ["one two three four"]},
        {"data_type": "continue", "answers": ["theta iota kappa lambda"], "docs": ["delta epsilon zeta eta"]}]


def test_cloze_rows_blank_a_name_number_or_date_of_the_passage():
    passage = "Danube\nThe river rises in the Black Forest and is 2,850 kilometres long."
    rows = cloze_rows([passage] * 2 + ["Short\nno capital words here at all, none."], seed=0)
    assert len(rows) == 1 and rows[0]["docs"] == [passage]
    row = rows[0]
    assert row["answer"] in ("Black Forest", "2,850") and row["answers"] == [row["answer"]]
    assert row["question"].startswith("Fill in the blank: ") and "____" in row["question"]
    assert row["question"].replace("____", row["answer"]).removeprefix("Fill in the blank: ") in passage


def test_a_cloze_blank_is_never_readable_in_its_own_sentence_nor_spans_a_repeated_title():
    # "On July 2, 1980, ... Act of 1980" kept one 1980 beside the blank; DPR repeats the title as
    # the text's first words, and "Bennett Kathi Bennett" became one blank
    dated = "Act\nOn July 2, 1980, President Carter signed the Small Business Act of 1980."
    titled = '"Kathi Bennett"\nKathi Bennett (born January 31, 1963) is an American politician from Ohio.'
    for seed in range(8):
        for passage in (dated, titled):
            (row,) = cloze_rows([passage], seed=seed)
            assert row["answer"] != "1980" and "Kathi" not in row["answer"] and "Bennett" not in row["answer"]
            assert row["question"].lower().count(row["answer"].lower()) == 0
    # a text that opens with its title opens with its subject: it stays (only DPR's quoted heading goes)
    subject = "Film Journal International\nFilm Journal International is a trade magazine published in New York."
    for seed in range(4):
        assert cloze_rows([subject], seed=seed)[0]["question"].startswith("Fill in the blank: Film ")


def test_a_cloze_question_is_never_a_sentence_cut_from_its_subject():
    # a split after "U.S." or a window opening mid-sentence asked "in ____ and then he lived there"
    cut = "Poe\nin Boston and then he lived there with Allan. Edgar Allan Poe was born in Boston in 1809."
    for seed in range(6):
        assert cloze_rows([cut], seed=seed)[0]["question"].startswith("Fill in the blank: Edgar ")


def test_inverse_cloze_rows_ask_with_a_sentence_cut_from_its_passage():
    danube = ("Danube\nThe Danube is a river of Europe. It rises in the Black Forest of Germany. "
              "It flows to the Black Sea.")
    rhine = "Rhine\nThe Rhine is a river of Europe. It rises in the Swiss Alps near the Oberalp Pass."
    seine = "Seine\nThe Seine is a river of France. It flows through Paris to the English Channel at Le Havre."
    short = "Tiber\nA river that flows through the city of Rome. "  # one sentence: nothing left to find it by
    rows = inverse_cloze_rows([danube, rhine, seine, short, danube], candidates=2, seed=0)
    assert len(rows) == 3 and all(len(row["docs"]) == 2 and len(row["pos_index"]) == 1 for row in rows)
    for row, passage in zip(rows, [danube, rhine, seine]):
        gold = row["docs"][row["pos_index"][0]]
        assert row["question"] in passage and row["question"] not in gold and len(row["question"].split()) >= 6
        assert gold.startswith(passage.split("\n")[0] + "\n")  # the title stays
        assert sorted((gold + " " + row["question"]).split()) == sorted(passage.split())
        assert passage not in row["docs"]  # the other candidate is another passage, not the whole gold one
    first, rest = "Lisbon is the capital city of Portugal.", "It lies on the Tagus estuary."
    copy = "Lisbon\n" + rest  # the gold text of the first sentence's row: never a negative beside it
    rows = inverse_cloze_rows(["Lisbon\n" + first + "\n" + rest, copy, danube], candidates=3, seed=1)
    row = next(row for row in rows if row["question"] == first)
    assert row["docs"].count(copy) == 1 and row["docs"][row["pos_index"][0]] == copy  # the newline is kept
    # another revision of the passage is no negative; a sentence its title repeats is no question
    words = " ".join(f"w{i}" for i in range(30))
    revised = f"Ohio River\nThe river {words} joins the Mississippi near Cairo. It is long and wide for miles on end."
    other = f"Ohio River (revised)\nThe river {words} joins the Mississippi at Cairo. It is long and wide for miles."
    titled = "Where Are You Going, Alfonso XII?\nWhere Are You Going, Alfonso XII? is a 1959 Spanish film by Luis."
    rows = inverse_cloze_rows([revised, other, titled, danube, rhine, seine], candidates=3, seed=0)
    assert all(other not in row["docs"] for row in rows if row["question"] in revised)
    assert all(row["question"] not in row["docs"][row["pos_index"][0]] for row in rows)


@pytest.mark.parametrize("question, answers, name", [
    ("Where does the Danube rise?", ["the Black Forest"], "Danube"),
    ("Which is older, Alpha Centauri or Sirius?", ["Sirius"], "Alpha Centauri"),  # the other choice
    ("What nationality is Lord Charles Petty-Fitzmaurice's father?", ["British"], "Lord Charles Petty-Fitzmaurice"),
    ("Who founded the Bank of England?", ["William Paterson"], "Bank of England"),
    ("Is Vienna on the Danube?", ["the Danube"], "Vienna"),  # a name an answer shares is no restatement
    ("Who painted the Mona Lisa?", ["the Mona Lisa's painter, Leonardo"], None),
    ("who said have you no sense of decency", ["Joseph Nye Welch"], None),  # NQ asks in lower case
])
def test_question_name_is_the_longest_name_of_the_question_no_answer_shares(question, answers, name):
    assert question_name({"question": question, "answers": answers}) == name


def test_reconstruction_rows_target_each_distinct_passage_once():
    rows = reconstruction_rows(["b", "a", "b"])
    assert rows == [{"data_type": "reconstruct", "answers": ["b"], "docs": ["b"]},
                    {"data_type": "reconstruct", "answers": ["a"], "docs": ["a"]}]


@needs_shared_data
def test_held_out_evidence_does_not_come_back_in_another_wording(tmp_path, capsys):
    # NQ dev 18 and 1161 both ask who wrote "I Can Only Imagine", over one paragraph: the
    # training rows from 300 on held 8 such repeats of the evaluation's evidence, and 5 more
    # of one paragraph spaced otherwise (".  The" against ". The": dev 600 repeats dev 18's)
    source, out = SHARED_DATA / "nq" / "dev.jsonl", tmp_path / "scp.jsonl"
    main(["convert-data", str(source), str(out), "--kind", "scp", "--skip", "300"])
    held = {spaced_alike(e.passages[i]) for e in read_examples(source, limit=300) for i in e.gold}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and not any(spaced_alike(document) in held for row in rows for document in row["docs"])
    assert "left out 20 of 1355 sources" in capsys.readouterr().out


@needs_shared_data
def test_another_files_held_out_questions_and_evidence_are_left_out(tmp_path, capsys):
    # --skip held out its own file's first N alone: MuSiQue train asks NQ dev 92 again as one hop
    # ("History of Maryland", the English), and the MuSiQue corpus holds its gold paragraph whole
    nq, out = SHARED_DATA / "nq" / "dev.jsonl", tmp_path / "rows.jsonl"
    main(["convert-data", str(SHARED_DATA / "musique" / "train.jsonl"), str(out), "--setting", "oracle",
          "--held-out", f"{nq}:300"])
    assert "2hop__84565_92585" not in out.read_text() and "left out 1 of 100 sources" in capsys.readouterr().out
    from clara_plugins.corpora import same_evidence, word_grams

    asked_again = read_examples(nq, limit=93)[92]
    gold = word_grams(asked_again.passages[asked_again.gold[0]])
    corpus = SHARED_DATA / "corpus" / "musique_train_1890.json"
    for held_out, count in (([], 1890), (["--held-out", f"{nq}:300"], 1889)):
        main(["convert-data", str(corpus), str(out), "--kind", "reconstruct", *held_out])
        documents = [json.loads(line)["docs"][0] for line in out.read_text().splitlines()]
        assert len(documents) == count
        assert any(same_evidence(document, gold) for document in documents) == (not held_out)
    for wrong in ("nq.jsonl", "nq.jsonl:0"):
        with pytest.raises(SystemExit):
            main(["convert-data", str(nq), str(out), "--held-out", wrong])
        assert f"takes FILE:N, N a positive integer, got '{wrong}'" in capsys.readouterr().err


def test_a_held_out_question_asked_again_in_other_words_is_left_out():
    # NQ dev 21 and 951 ask who sang "From Russia with Love" over two paragraphs of one article,
    # and dev 173 and 539 over two revisions of one paragraph: the later ones were trained on
    from clara_plugins.corpora import after_held_out

    def example(question, answer, passage):
        return QAExample(id=question, question=question, answers=[answer], passages=[passage], gold=[0])

    words = " ".join(f"word{i}" for i in range(40))
    held = [example("who sang it", "Matt Monro", "From Russia with Love (soundtrack)\nThe title song was sung by "
                    "Matt Monro."), example("who is next", "Charles", f"Succession\n{words} and more.")]
    rest = [example("who sang the theme", "Matt Monro", "From Russia with Love (soundtrack)\nJohn Barry arranged it."),
            example("who is heir", "Prince Charles", f"Succession (revised)\n{words} and others."),
            example("who wrote it", "Ian Fleming", "From Russia with Love (soundtrack)\nThe novel came first."),
            example("who sang in another film", "Matt Monro", "Born Free\nMatt Monro sang it."),
            example("untitled", "Matt Monro", "Matt Monro sang it.")]
    assert [e.id for e in after_held_out(held, rest)] == ["who wrote it", "who sang in another film", "untitled"]
    assert after_held_out([f"Succession\n{words}."], [f"Other\n{words}!", "Other\nshort"]) == ["Other\nshort"]
    longer = f"Article\n{words} " + " ".join(f"more{i}" for i in range(200))  # holds all of the held-out one
    assert after_held_out([f"Succession\n{words}."], [longer]) == []
    # a held-out gold passage as a later example's distractor (HotpotQA dev 89's in dev 245's pool)
    pool = QAExample(id="later", question="who is queen", answers=["Anne"],
                     passages=["Other\nunrelated text.", f"Succession\n{words} and more.", "Anne\nAnne was queen."],
                     gold=[2])
    (kept,) = after_held_out(held, [pool])
    assert kept.passages == ["Other\nunrelated text.", "Anne\nAnne was queen."] and kept.gold == [1]


@needs_shared_data
def test_convert_data_writes_scp_rows_after_the_held_out_questions(tmp_path, capsys):
    out = tmp_path / "scp.jsonl"
    main(["convert-data", str(SHARED_DATA / "nq" / "dev.jsonl"), str(out), "--kind", "scp", "--skip", "300",
          "--limit", "5"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    held_out = {e.question for e in read_examples(SHARED_DATA / "nq" / "dev.jsonl", limit=300)}
    assert len(rows) == 5 and not {r["question"][0] for r in rows} & held_out
    assert "wrote 5 scp rows" in capsys.readouterr().out
    main(["convert-data", str(SHARED_DATA / "nq" / "dev.jsonl"), str(out), "--setting", "oracle", "--limit", "20"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # one passage each, filled to 5
    assert len(rows) == 20 and all(len(r["docs"]) == 5 and len(r["pos_index"]) == 1 for r in rows)
    corpus = tmp_path / "reconstruct.jsonl"
    main(["convert-data", str(SHARED_DATA / "corpus" / "dpr_wiki_1000.jsonl"), str(corpus), "--kind",
          "reconstruct", "--limit", "3"])
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(rows) == 3 and all(r["answers"] == r["docs"] for r in rows)
    main(["convert-data", str(SHARED_DATA / "corpus" / "dpr_wiki_1000.jsonl"), str(corpus), "--kind",
          "inverse-cloze", "--candidates", "4", "--limit", "50"])
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(rows) >= 45 and all(len(r["docs"]) == 4 and len(r["pos_index"]) == 1 for r in rows)
    main(["convert-data", str(SHARED_DATA / "corpus" / "dpr_wiki_1000.jsonl"), str(corpus), "--kind",
          "inverse-cloze", "--limit", "50"])  # the row builder's default, not e2e's 20
    assert {len(json.loads(line)["docs"]) for line in corpus.read_text().splitlines()} == {5}


def test_fewer_candidates_than_gold_passages_are_refused():
    with pytest.raises(InvalidInputError, match="example q2 has 2 gold passages, more than the 1 candidates"):
        with_candidates([MULTI_HOP], 1)  # the pool kept every passage but the last


def test_convert_data_that_makes_no_rows_keeps_the_destination(tmp_path, capsys):
    source, out = tmp_path / "passages.txt", tmp_path / "rows.jsonl"
    source.write_text("A passage.\n\nAnother passage.")
    out.write_text("an earlier run's rows\n")
    for kind in ("reconstruct", "inverse-cloze"):  # inverse-cloze rows failed on max() of nothing
        with pytest.raises(SystemExit):
            main(["convert-data", str(source), str(out), "--kind", kind, "--skip", "5"])
        assert "--skip 5 leaves none of the 2 passages" in capsys.readouterr().err
        assert out.read_text() == "an earlier run's rows\n"


def test_passages_without_a_word_to_index_rank_alike():
    # bm25s cannot index passages of stopwords alone, and failed on max() of nothing
    assert bm25_rank("capital", ["The", "a"]) == [0, 1]
    assert bm25_rank("capital", ["The", "the capital city"]) == [1, 0]


def test_ranking_a_thousand_pools_shows_progress(capsys):
    # HotpotQA train's 90,447 Oracle rows ranked for minutes without a word
    examples = [QAExample(f"q{i}", f"question {i}", [f"answer {i}"],
                          [f"Title {i}\nPassage {i} holds answer {i}.", *(f"Other {i}\nfiller {j}" for j in range(5))],
                          [0]) for i in range(1000)]
    assert len(instruct_rows(examples, "oracle")) == 1000
    assert "ranking pools (BM25)" in capsys.readouterr().err
    assert len(with_candidates(examples, 3)) == 1000
    assert "ranking pools (BM25)" in capsys.readouterr().err


def test_inverse_cloze_rows_have_their_candidates_past_a_family_of_lookalikes():
    # the first 2k + 1 BM25 matches of a "Prince of Anhalt-Bernburg" sentence were all its
    # family's passages, each left out as the same evidence: 21 of 2Wiki's 4,445 rows had no negative
    family = [f"Prince {name} of Anhalt\nPrince {name} of Anhalt was a German prince of the House of Ascania and "
              f"ruler of the principality of Anhalt-Bernburg. He was born in Bernburg as the son of the prince. "
              f"He was known as {name} the Elder in the family chronicle of Anhalt-Bernburg."
              for name in ("Victor", "Karl", "Frederick", "Lebrecht", "Alexius", "Christian", "Joachim")]
    towns = [f"Town {name}\n{name} is a small town in a valley beside a river. Its market sells grain and wine "
             f"to the villages around it every week." for name in ("Alba", "Brena", "Corte", "Dova")]
    rows = inverse_cloze_rows(family + towns, candidates=2)
    assert len(rows) == len(family + towns) and {len(row["docs"]) for row in rows} == {2}
