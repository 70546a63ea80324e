"""Synthetic knowledge: reproducible files, and every test item's answer follows from the stated facts."""

from __future__ import annotations

import json
import re

import pytest

from conftest import assert_one_line_error, run_cli
from retrolm.core.errors import RetrolmError
from retrolm.text.knowledge import KnowledgeSpec, make_knowledge, write_knowledge

COMPARISON = re.compile(r"^(\w+) is (more|less) (\w+) than (\w+)\.$")
MEMBER = re.compile(r"^All (\w+) are (\w+)\.$")


def ranks(facts: list[dict]) -> set[tuple[str, str, str]]:
    """(higher, lower, adjective) of every stated comparison, whichever way it is written."""
    out = set()
    for f in facts:
        if m := COMPARISON.match(f["text"]):
            a, word, adj, b = m.groups()
            out.add((a, b, adj) if word == "more" else (b, a, adj))
    return out


def test_every_answer_follows_from_the_facts_it_names():
    facts, items, inferences = make_knowledge(KnowledgeSpec(chains=5, chain_len=4, tops=3, mids=2, leaves=2, seed=3))
    text = {f["id"]: f["text"] for f in facts}
    assert len(facts) == 5 * 3 + 3 * 2 * (1 + 2) and len(inferences) == 5 * 3 + 3 * 2 * 2
    kinds = [it["kind"] for it in items]
    assert kinds.count("reversal") == 15 and kinds.count("syllogism") == 12 and kinds.count("fact") == 15 + 18
    above = ranks(facts)
    parent = {m.group(1): m.group(2) for f in facts if (m := MEMBER.match(f["text"]))}
    for it in items:
        said = f"{it['question']} {it['choices'][it['answer']]}"
        assert len(set(it["choices"])) == len(it["choices"]) and all(f in text for f in it["facts"])
        if it["kind"] == "syllogism":  # two hops up the hierarchy, through the two facts it names
            leaf, top = MEMBER.match(said).groups()
            assert parent[parent[leaf]] == top and len(it["facts"]) == 2
        elif m := COMPARISON.match(said):  # the stated pair, the same way round or reversed
            a, word, adj, b = m.groups()
            assert ((a, b, adj) if word == "more" else (b, a, adj)) in above
            assert (said == text[it["facts"][0]]) == (it["kind"] == "fact")  # a reversal is never the stated sentence
        else:
            assert said == text[it["facts"][0]]  # a stated membership
        for wrong in (c for c in it["choices"] if c != it["choices"][it["answer"]]):  # no other option is true
            other = f"{it['question']} {wrong}"
            if m := COMPARISON.match(other):
                a, word, adj, b = m.groups()
                assert ((a, b, adj) if word == "more" else (b, a, adj)) not in above
            else:
                leaf, cat = MEMBER.match(other).groups()
                assert cat not in (parent.get(leaf), parent.get(parent.get(leaf, "")))
    written = [f["text"] for f in facts if COMPARISON.match(f["text"])]
    assert 0 < sum(" less " in t for t in written) < len(written)  # both wordings, so neither is the answer
    assert all(i["text"] not in text.values() for i in inferences)  # inferences are never stated


def test_same_seed_same_files_and_bad_sizes(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_knowledge(KnowledgeSpec(seed=1), a)
    write_knowledge(KnowledgeSpec(seed=1), b)
    write_knowledge(KnowledgeSpec(seed=2), c)
    for name in ("facts.jsonl", "qa.jsonl", "inferences.jsonl", "spec.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "facts.jsonl").read_bytes() != (c / "facts.jsonl").read_bytes()
    assert json.loads((a / "spec.json").read_text())["counts"]["items_syllogism"] == 36
    with pytest.raises(RetrolmError, match="tops must be >= 2"):
        KnowledgeSpec(tops=1)
    rc, out, _ = run_cli(["corpus", "knowledge", "--out", tmp_path / "cli", "--chains", 2, "--tops", 2], capsys)
    assert rc == 0 and "30 facts" in out  # 2 chains x 3 comparisons + 2 tops x 3 middles x (1 + 3 leaves)
    rc, _, err = run_cli(["corpus", "knowledge", "--out", tmp_path / "bad", "--chains", 99], capsys)
    assert_one_line_error(rc, err, "chains: at most 16")
    # sizes that need more invented words than exist ran for minutes (a quadratic search) before failing
    rc, _, err = run_cli(["corpus", "knowledge", "--out", tmp_path / "huge", "--chain-len", 50000], capsys)
    assert_one_line_error(rc, err, "these sizes need 600,052 invented words; at most 100,000")
    assert not (tmp_path / "huge").exists()
