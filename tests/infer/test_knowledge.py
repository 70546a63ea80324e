"""Knowledge injection on a tiny store of invented facts: a Llama that copies its context answers the stated facts
when they are in its context or retrieved, not closed book; fine-tuning lowers the loss on the facts; the report's
numbers are the predictions'."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from retrolm.core.errors import RetrolmError
from retrolm.infer.knowledge import KnowledgeConfig, KnowledgeStudy
from retrolm.models.hf import CausalLM
from retrolm.text.knowledge import KnowledgeSpec, write_knowledge
from retrolm.text.tokenizer import train_bpe
from retrolm.train.finetune import FinetuneConfig, finetune

_spec = importlib.util.spec_from_file_location("incontext_helpers",
                                               Path(__file__).parents[1] / "eval" / "test_incontext.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory):
    root = tmp_path_factory.mktemp("knowledge")
    write_knowledge(KnowledgeSpec(chains=3, chain_len=3, tops=2, mids=2, leaves=2, seed=0), root / "data")
    facts = [json.loads(x)["text"] for x in (root / "data" / "facts.jsonl").read_text().splitlines()]
    tok = train_bpe(facts * 3 + [json.loads(x)["question"] for x in (root / "data" / "qa.jsonl").read_text()
                                 .splitlines()], 400)
    _mod.induction_llama(tok.vocab_size).save_pretrained(root / "copier")
    tok.save(root / "copier" / "tokenizer.json")
    return root


def test_the_copier_answers_what_it_reads_and_the_report_counts_its_predictions(knowledge):
    out = knowledge / "out"
    cfg = KnowledgeConfig(data=str(knowledge / "data"), reader=str(knowledge / "copier"), out_dir=str(out),
                          conditions=["closed_book", "in_context", "retrieval", "multi_hop_retrieval",
                                      "augmented_rules"], retrieve_k=2,
                          finetune=FinetuneConfig(epochs=1, batch_size=4), bootstrap=200)
    r = KnowledgeStudy(cfg).run()
    acc = r["accuracy"]
    # a copier that reads the stated facts picks the option that continues them (closed book it cannot), and on a
    # reversal the option with the stated wording, which is wrong: reading is copying here
    assert acc["retrieval"]["fact"]["accuracy"] > 0.8 > acc["closed_book"]["fact"]["accuracy"]
    assert acc["retrieval"]["reversal"]["accuracy"] < 0.2
    assert r["finetuning"]["augmented_rules"]["texts"] == r["facts"] + 6 + 8  # facts + reversals + syllogisms
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for cond in acc:
        for kind in r["kinds"]:
            mine = [x[cond] == x["answer"] for x in rows if x["kind"] == kind]
            assert acc[cond][kind]["n"] == len(mine) and acc[cond][kind]["accuracy"] == pytest.approx(
                sum(mine) / len(mine))
            lo, hi = acc[cond][kind]["ci95"]
            assert lo <= acc[cond][kind]["accuracy"] <= hi
    assert r["chance"]["reversal"] == 0.5 and "| retrieval |" in (out / "report.md").read_text()
    assert r["augmentation"] is None  # augmented_model did not run
    # a syllogism's question names the leaf: the second hop, asked with the middle category its first fact names,
    # finds the middle category's fact too
    support = r["support_retrieved"]
    assert set(support) == {"retrieval", "multi_hop_retrieval"} and support["multi_hop_retrieval"]["syllogism"] == 1.0
    assert support["retrieval"]["syllogism"] < 1.0
    assert all(support["multi_hop_retrieval"][k] >= support["retrieval"][k] for k in [*r["kinds"], "all"])
    # accuracy split by which options the passages held adds up to the kind's accuracy, item by item
    for cond in ("retrieval", "multi_hop_retrieval"):
        for kind in r["kinds"]:
            groups = r["by_options_read"][cond][kind]
            mine = [x for x in rows if x["kind"] == kind]
            assert sum(g["n"] for g in groups.values()) == len(mine)
            only = [x for x in mine if x[f"{cond}_options_read"] == [x["answer"]]]
            assert groups["answer_only"]["n"] == len(only)
            if only:
                assert groups["answer_only"]["accuracy"] == pytest.approx(
                    sum(x[cond] == x["answer"] for x in only) / len(only))
    cells = " | ".join(f"{100 * support['multi_hop_retrieval'][k]:.1f}" for k in [*r["kinds"], "all"])
    assert f"| multi_hop_retrieval | {cells} |" in (out / "report.md").read_text()
    assert (out / "config.yaml").is_file()


def test_finetuning_lowers_the_loss_on_its_texts(knowledge):
    lm = CausalLM.from_pretrained(str(knowledge / "copier"))
    from retrolm.text.tokenizer import load_tokenizer

    tok = load_tokenizer(str(knowledge / "copier"))
    texts = ["All gloop are snerk.", "fraz is more famous than blip."]
    losses = finetune(lm, tok, texts, FinetuneConfig(epochs=6, lr=3e-3, batch_size=2, warmup_steps=0),
                      show_progress=False)
    assert losses[-1] < 0.7 * losses[0] and not lm.hf.training and not any(p.requires_grad for p in
                                                                           lm.hf.parameters())
    with pytest.raises(RetrolmError, match="no texts"):
        finetune(lm, tok, [], FinetuneConfig())


def test_cli_needs_the_data_and_known_conditions(knowledge, capsys):
    rc, _, err = run_cli(["knowledge", "--out", knowledge / "x"], capsys)
    assert_one_line_error(rc, err, "--data is required")
    rc, _, err = run_cli(["knowledge", "--data", knowledge / "data", "conditions=[telepathy]"], capsys)
    assert_one_line_error(rc, err, "conditions: choose from")


@pytest.mark.parametrize(("name", "line", "message"), [
    ("facts.jsonl", '{"id": "fact-x", "text": "All a are b."', "facts.jsonl:{n}: invalid JSON"),
    ("facts.jsonl", '{"id": "fact-x"}', "facts.jsonl:{n}: 'text' must be a non-empty string"),
    ("facts.jsonl", '{"id": "fact-x", "text": "All a are \\ud800."}',
     "facts.jsonl:{n}: not valid Unicode (a lone surrogate, U+D800)"),
    ("inferences.jsonl", '{"id": "inf-x", "text": "All a are c."}', "inferences.jsonl:{n}: 'from' must be a "),
    ("inferences.jsonl", '{"id": "inf-x", "text": "All a are c.", "from": ["fact-nowhere"]}',
     "inference 'inf-x' follows from 'fact-nowhere', which facts.jsonl does not hold"),
])
def test_a_malformed_data_file_is_one_line_naming_it(knowledge, tmp_path, capsys, name, line, message):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(knowledge / "data", data)
    n = len((data / name).read_text().splitlines()) + 1  # the line added
    with open(data / name, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    rc, _, err = run_cli(["knowledge", "--data", data, "--out", tmp_path / "out", "conditions=[closed_book]"], capsys)
    assert_one_line_error(rc, err, message.format(n=n))


def test_demonstrations_are_sound_and_the_database_is_this_sets(knowledge, tmp_path):
    from retrolm.infer.reader import Reading

    with pytest.raises(RetrolmError, match="a model checkpoint; knowledge would write its files into it"):
        KnowledgeStudy(KnowledgeConfig(data=str(knowledge / "data"), reader=str(knowledge / "copier"),
                                       out_dir=str(knowledge / "copier")))  # its reports over the reader's files
    study = KnowledgeStudy(KnowledgeConfig(data=str(knowledge / "data"), reader=str(knowledge / "copier"),
                                           out_dir=str(tmp_path / "out")))
    seen = []

    class Recorder:  # stands for the reader: records the prompts, writes the rule's inference for every other one
        def generate(self, prompts, max_new_tokens):
            seen.extend(study.tok.decode(p) for p in prompts)
            return [Reading([""], 0, 0, 0, [f" {inf['text']}\nmore" if i % 2 else " nonsense"])
                    for i, inf in enumerate(study.inferences)]

    written = study._generated_inferences(Recorder())
    assert [w["correct"] for w in written] == [i % 2 == 1 for i in range(len(written))]
    data_words = {w for f in study.facts for w in f["text"].rstrip(".").split()}
    demos = [p.rsplit("\n\n", 1)[0] for p in seen]  # the worked examples before the fact to restate
    for demo in demos:
        words = {w.strip(".") for w in demo.split()} - {"Statement:", "Other", "way", "round:", "is", "than", "famous",
                                                         "more", "less", "All", "are", "So:"}
        assert words and not words & data_words
    comparison = next(d for d in demos if "Statement" in d)
    assert "is more famous" in comparison and "is less famous" in comparison  # both directions shown
    for line in (x for d in demos for x in d.splitlines() if x.startswith("All ")):
        a, b, c = line.split()[1], line.split()[3].strip("."), line.split()[-1].strip(".")
        assert len({a, b, c}) == 3  # "All B are B." taught the middle category as the answer
    # a second set in the same folder retrieves its own facts (a stale database was reused)
    write_knowledge(KnowledgeSpec(chains=2, chain_len=3, tops=2, mids=1, leaves=1, seed=5), tmp_path / "other")
    study._retrieved(1)
    other = KnowledgeStudy(KnowledgeConfig(data=str(tmp_path / "other"), reader=str(knowledge / "copier"),
                                           out_dir=str(tmp_path / "out")))
    texts = {f["text"] for f in other.facts}
    assert all(p in texts for ps in other._retrieved(2)[0] for p in ps)


def test_facts_that_overflow_the_context_are_refused(knowledge, tmp_path):
    lm = CausalLM.from_pretrained(str(knowledge / "copier"))
    lm.hf.config.max_position_embeddings = 64
    study = KnowledgeStudy(KnowledgeConfig(data=str(knowledge / "data"), reader=str(knowledge / "copier"),
                                           out_dir=str(tmp_path / "out")))
    with pytest.raises(RetrolmError, match="do not fit the 64-token context"):
        study._choose(study._reader(lm), [[f["text"] for f in study.facts]] * len(study.items))


def test_options_are_scored_as_configured(knowledge, tmp_path, monkeypatch):
    from retrolm.infer.reader import Reader

    seen, real = [], Reader.choose

    def spy(self, prompts, choices, normalize="mean"):
        seen.append(normalize)
        return real(self, prompts, choices, normalize)

    monkeypatch.setattr(Reader, "choose", spy)
    KnowledgeStudy(KnowledgeConfig(data=str(knowledge / "data"), reader=str(knowledge / "copier"),
                                   out_dir=str(tmp_path / "pmi"), conditions=["closed_book"], choice_normalize="pmi",
                                   bootstrap=10)).run()
    assert seen and set(seen) == {"pmi"}
    with pytest.raises(RetrolmError, match="mean, sum or pmi"):
        KnowledgeConfig(choice_normalize="max")


def test_items_without_a_kind_are_reported_as_unlabelled(knowledge, tmp_path):
    """Items without a ``kind`` were grouped under "None" and then matched none of its items: n = 0, NaN accuracy."""
    import shutil

    data = Path(shutil.copytree(knowledge / "data", tmp_path / "data"))
    rows = [json.loads(x) for x in (data / "qa.jsonl").read_text().splitlines()]
    (data / "qa.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n"
                                           for r in rows))
    r = KnowledgeStudy(KnowledgeConfig(data=str(data), reader=str(knowledge / "copier"), out_dir=str(tmp_path / "o"),
                                       conditions=["closed_book"], bootstrap=10)).run()
    assert r["kinds"] == ["unlabelled"]
    cell = r["accuracy"]["closed_book"]["unlabelled"]
    assert cell["n"] == len(rows) and cell["accuracy"] == r["accuracy"]["closed_book"]["all"]["accuracy"]

