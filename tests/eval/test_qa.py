"""QA evaluation: JSONL items with one-line errors, SQuAD normalisation / EM / F1, multiple-choice scoring, and
contamination counts on hand-made items and documents."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database
from retrolm.eval.qa import (
    QAItem,
    choice_prediction,
    contamination,
    exact_match,
    find_contamination,
    load_qa,
    mean_scores,
    normalize_answer,
    score_prediction,
    token_f1,
)


@pytest.mark.parametrize(("text", "norm"), [
    ("The Quick, Brown Fox!", "quick brown fox"),  # case, punctuation, the article
    ("  a  an the  ", ""),  # only articles
    ("Theatre of the Absurd", "theatre of absurd"),  # articles as whole words only
    ("U.S. Army", "us army"),  # punctuation inside a word is dropped, not split on
    ("Denver\tBroncos\n", "denver broncos"),  # whitespace
    ("1,000 km²", "1000 km²"),
])
def test_squad_normalisation(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_and_f1_on_squad_cases():
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    assert exact_match("broncos", ["Denver Broncos", "Broncos."]) == 1.0  # any gold answer
    assert token_f1("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("Broncos", ["Denver Broncos", "the Broncos"]) == 1.0  # the best gold answer
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)  # shared tokens counted with multiplicity
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0 and token_f1("", ["cat"]) == 0.0  # empty after normalisation (SQuAD 2.0)
    short = QAItem("q", "?", ["Denver Broncos"])
    assert score_prediction("Broncos", short) == {"em": 0.0, "f1": pytest.approx(2 / 3)}
    mc = QAItem("m", "?", ["red"], ["red", "blue"], 0)
    assert score_prediction("Red", mc) == {"em": 1.0, "f1": 1.0}
    assert score_prediction("blue", mc) == {"em": 0.0, "f1": 0.0}
    s = mean_scores([{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5}], keep=[False, True])
    assert s == {"n": 1, "em": 0.0, "f1": 50.0}
    assert mean_scores([{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5}]) == {"n": 2, "em": 50.0, "f1": 75.0}


def test_choice_prediction():
    nlls = [[1.0, 1.0, 1.0], [2.5], [0.9, 5.0]]  # sums 3, 2.5, 5.9; means 1, 2.5, 2.95
    assert choice_prediction(nlls) == 0 and choice_prediction(nlls, "sum") == 1
    with pytest.raises(RetrolmError, match="mean, sum or pmi"):
        choice_prediction(nlls, "max")


def test_load_qa_and_its_one_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": 1, "question": "Who?", "answers": ["Ada", "Ada Lovelace"], "provenance": {"doc": "x"}},
        {"id": "m", "question": "Which?", "choices": ["a", "b", "c"], "answer": 2},
        {"id": "s", "question": "What?", "answers": "one string"},
    ])
    items = load_qa(path)
    assert [i.id for i in items] == ["1", "m", "s"] and items[0].meta == {"provenance": {"doc": "x"}}
    assert items[1].multiple_choice and items[1].answers == ["c"] and items[2].answers == ["one string"]
    assert items[0].text() == "Who? Ada"
    assert len(load_qa(path, max_questions=2)) == 2
    bad = {
        "not json": "invalid JSON",
        json.dumps({"question": "q", "answers": ["a"]}): "missing field 'id'",
        json.dumps({"id": 1, "question": " ", "answers": ["a"]}): "non-empty string",
        json.dumps({"id": 1, "question": "q", "answers": []}): "'answers' must be",
        json.dumps({"id": 1, "question": "q", "choices": ["a", "b"], "answer": 2}): "index of the correct choice",
        json.dumps({"id": 1, "question": "q", "choices": ["a"], "answer": 0}): "at least two",
        json.dumps([1, 2]): "expected a JSON object",
        '{"id": 1, "question": "What is \\ud800?", "answers": ["a"]}':
            r"not valid Unicode \(a lone surrogate, U\+D800\)",
        '{"id": 1, "question": "q", "answers": ["\\udfff"]}': "not valid Unicode",
    }
    for line, message in bad.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps({"id": 0, "question": "fine", "answers": ["x"]}) + "\n" + line + "\n")
        with pytest.raises(RetrolmError, match=message) as e:
            load_qa(f)
        assert str(e.value).startswith(f"{f}:2: ") and "\n" not in str(e.value)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "q", "answers": ["a"]}] * 2)
    with pytest.raises(RetrolmError, match="duplicate id"):
        load_qa(dup)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RetrolmError, match="no questions"):
        load_qa(tmp_path / "empty.jsonl")
    with pytest.raises(RetrolmError, match="not found"):
        load_qa(tmp_path / "missing.jsonl")


DOCS = [
    "Yesterday the quick brown fox jumps over the lazy dog, as everyone knows.",
    "What is Zorblat? A code used by the ancients.",
    "The river bank was flooded. Near the river",  # the end of an item's gram, split across two documents...
    "bank the heron waited.",  # ...is no match
]
ITEMS = [
    QAItem("fox", "The quick brown fox jumps over the lazy dog near the river bank", ["today"]),  # 5-gram in DOCS[0]
    QAItem("clean", "Where does the heron wait near the river bank", ["bank"]),
    QAItem("short", "What is Zorblat?", ["A code"]),  # shorter than n: the whole item, "what is zorblat code"
    QAItem("short-clean", "What is Quenmir?", ["a code"]),
    QAItem("split", "Near the river bank the heron waited", ["yes"]),  # only across the boundary of DOCS[2] / [3]
    QAItem("mc", "Which animal is lazy?", ["the lazy dog as everyone knows"], ["cat", "the lazy dog as everyone knows"],
           1),
]


def test_contamination_counts_on_hand_made_items():
    c = find_contamination(ITEMS, DOCS, n=5)
    assert c.flags == [True, False, True, False, False, True]
    assert c.fraction == pytest.approx(3 / 6) and c.documents == 4
    assert c.evidence["short"] == "what is zorblat code"
    assert c.to_dict()["contaminated_ids"] == ["fox", "short", "mc"]
    # the fox item shares a run of 7 normalised words with DOCS[0] ("quick brown fox jumps over lazy dog"): n = 7 flags
    # it, n = 8 does not; the short item is still checked whole
    c8 = find_contamination(ITEMS, DOCS, n=8)
    assert c8.flags == [False, False, True, False, False, False]
    assert find_contamination(ITEMS, DOCS, n=7).flags[0] is True
    with pytest.raises(RetrolmError, match="n must be"):
        find_contamination(ITEMS, DOCS, n=0)
    # an item with no words has no gram to find (the empty one would match every document)
    assert find_contamination([QAItem("marks", "¿?", ["—"])], DOCS, n=5).flags == [False]


def test_checking_question_and_answer_apart_finds_a_short_answer_held_verbatim():
    """Every 13-gram of question + answer spans the question's wording, so a definition of nine words held verbatim
    is missed; checked apart, the answer is found whole."""
    docs = ["Cofferdam, n. a large watertight chamber used for construction under the water. See Caisson."]
    item = QAItem("d", 'What does the word "cofferdam" mean?',
                  ["large watertight chamber used for construction under the water"], ["x", "y"], 0)
    common = QAItem("w", 'What does the word "lazy" mean?', ["the lazy dog"], ["the lazy dog", "y"], 0)
    assert find_contamination([item, common], docs + DOCS, n=13).flags == [False, False]
    parts = find_contamination([item, common], docs + DOCS, n=13, scope="parts")  # "lazy dog": 2 words, not checked
    assert parts.flags == [True, False] and parts.evidence["d"].startswith("large watertight chamber")
    assert parts.to_dict()["scope"] == "parts" and parts.to_dict()["min_words"] == 5
    assert find_contamination([common], DOCS, n=13, scope="parts", min_words=2).flags == [True]  # "lazy dog"
    assert find_contamination([item], docs, n=5, scope="parts").flags == [True]  # 5-grams inside the answer
    # parts only adds: whatever the whole item finds stays found, a gram across question and answer included
    assert find_contamination([QAItem("a", "x y", ["z w"])], ["x y z w"], n=13, scope="parts").flags == [True]
    assert find_contamination(ITEMS, DOCS, n=5, scope="parts").flags == [True, False, True, False, False, True]
    # a short question is not checked whole (it would be found in any text that asks it)
    question = QAItem("q", "who was the first president of the united states", ["a man"])
    assert find_contamination([question], ["Who was the first president of the United States?"], n=13,
                              scope="parts").flags == [False]
    with pytest.raises(RetrolmError, match="scope must be item or parts"):
        find_contamination(ITEMS, DOCS, n=5, scope="answer")
    with pytest.raises(RetrolmError, match="min_words must be >= 1"):
        find_contamination(ITEMS, DOCS, n=5, scope="parts", min_words=0)


def test_contamination_against_a_database(tmp_path):
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", docs)], tmp_path / "db",
                        BuildConfig(tokenizer="train:300", index="none", bm25=True, chunk_len=8), show_progress=False)
    assert contamination(ITEMS, db, 5).flags == [True, False, True, False, False, True]  # documents, not chunks
    db.delete(doc_ids=["d0"])  # deleted documents are not part of the store
    assert contamination(ITEMS, Database.open(db.path), 5).flags == [False, False, True, False, False, False]
