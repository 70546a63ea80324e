"""Test-time retrieval (retrieve → rerank → read, self-consistency, cross-document consistency) with a tiny copying
Llama over a hand-made store whose facts exist nowhere else: retrieval must raise accuracy, the consistency votes and
FLOPs must match hand-computed values, and the CLI must keep its contract."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli, wiki_docs, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database
from retrolm.eval.qa import QAItem, load_qa, score_prediction
from retrolm.infer.consistency import answer_similarity, cross_document_vote, majority_vote
from retrolm.infer.flops import ModelCost, StageFlops, pretraining_flops
from retrolm.infer.rag import Passage, PassageRetriever, RagConfig, RagPipeline, new_words, retrieve_hops
from retrolm.infer.rag_eval import RagEvalConfig, run_rag_eval
from retrolm.infer.reader import Reader, extract_answer
from retrolm.infer.rerank import CrossEncoderReranker, LMReranker, load_reranker
from retrolm.infer.sampling import row_generator
from retrolm.text.tokenizer import EOS_TOKEN

_spec = importlib.util.spec_from_file_location("incontext_helpers",
                                               Path(__file__).parents[1] / "eval" / "test_incontext.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
induction_llama = _mod.induction_llama  # a 2-layer Llama that copies what followed the current token in its context

NAMES = ["zorblat", "quenmir", "vastrel", "plimbo", "drunek", "yarrow", "teslin", "mogwen", "fradel", "kuvoth"]
WORDS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper"]
PLAIN = dict(template="{passages}{question}", max_new_tokens=6, batch_size=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A BM25 store of Wikipedia summaries plus one made-up fact per document, the copying Llama, and questions whose
    answers only the store holds (short answer and multiple choice)."""
    root = tmp_path_factory.mktemp("rag")
    facts = [{"id": f"fact-{n}", "text": f"The code of {n} is {w}"} for n, w in zip(NAMES, WORDS, strict=True)]
    db = Database.build([write_jsonl(root / "corpus.jsonl", wiki_docs(20) + facts)], root / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True), show_progress=False)
    lm_dir = root / "copy-llama"
    induction_llama(db.tokenizer.vocab_size).save_pretrained(lm_dir)
    db.tokenizer.save(lm_dir / "tokenizer.json")
    qa = [{"id": f"q{i}", "question": f"The code of {n} is", "answers": [w]}
          for i, (n, w) in enumerate(zip(NAMES, WORDS, strict=True))]
    mc = [{"id": f"m{i}", "question": f"The code of {n} is", "choices": [WORDS[(i + 1) % 10], w, WORDS[(i + 2) % 10]],
           "answer": 1} for i, (n, w) in enumerate(zip(NAMES[:4], WORDS[:4], strict=True))]
    return {"root": root, "db": db, "lm": str(lm_dir), "qa": write_jsonl(root / "qa.jsonl", qa),
            "mixed": write_jsonl(root / "mixed.jsonl", qa[:4] + mc)}


def eval_cfg(world, out: str, **kw) -> RagEvalConfig:
    base = dict(db=str(world["db"].path), reader=world["lm"], data=str(world["qa"]), out_dir=str(world["root"] / out),
                retriever="bm25", top_n=3, passages=1, rerank=False, **PLAIN)
    base.update(kw)
    return RagEvalConfig(**base)


def test_retrieval_raises_accuracy_on_answers_only_in_the_store(world):
    r = run_rag_eval(eval_cfg(world, "plain"), show_progress=False)
    s = r["summary"]
    assert set(s) == {"closed_book", "retrieval"}
    assert s["closed_book"]["em"] == 0.0  # the answers are nowhere in its weights or its prompt
    assert s["retrieval"]["em"] >= 90.0 and s["retrieval"]["f1"] >= s["retrieval"]["em"]
    assert s["retrieval"]["flops_per_question"] > s["closed_book"]["flops_per_question"] > 0
    by_stage = s["retrieval"]["flops_by_stage"]
    assert by_stage["search"] > 0 and by_stage["encoder"] == 0  # BM25: postings, no encoder
    assert by_stage["reader_prompt"] > s["closed_book"]["flops_by_stage"]["reader_prompt"]
    preds = [json.loads(x) for x in (world["root"] / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["retrieval"]["passages"] == ["fact-zorblat"] and preds[0]["retrieval"]["answer"] == "amber"
    # question + answer ("the code of zorblat is amber", shorter than 13 words: checked whole) are in the store
    assert r["contamination"]["fraction"] == 1.0 and all(p["contaminated"] for p in preds)
    assert s["retrieval"]["clean"] == {"n": 0, "em": None, "f1": None} and s["retrieval"]["contaminated"]["n"] == 10
    assert "NaN" not in (world["root"] / "plain" / "rag.json").read_text()


def test_every_stage_and_multiple_choice(world):
    r = run_rag_eval(eval_cfg(world, "all", data=str(world["mixed"]), rerank=True, samples=3, cross_doc=True,
                              cross_doc_passages=2, passages=1, max_questions=6), show_progress=False)
    s = r["summary"]
    assert list(s) == ["closed_book", "retrieval", "rerank", "self_consistency", "cross_doc"]
    assert r["n"] == 6 and r["multiple_choice"] == 2 and all(v["n"] == 6 for v in s.values())
    assert s["retrieval"]["em"] == 100.0  # the copy model reads the right fact, short answer and option alike
    assert s["rerank"]["flops_by_stage"]["reranker"] > 0 == s["retrieval"]["flops_by_stage"]["reranker"]
    assert s["self_consistency"]["flops_by_stage"]["reader_generation"] > s["rerank"]["flops_by_stage"][
        "reader_generation"]
    assert s["cross_doc"]["flops_per_question"] > s["rerank"]["flops_by_stage"]["reranker"]
    preds = [json.loads(x) for x in (world["root"] / "all" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds[0]["self_consistency"]["samples"]) == 3
    assert len(preds[0]["cross_doc"]["passages"]) == 2 and preds[4]["closed_book"]["answer"] in WORDS


def test_pipeline_answers_with_its_supporting_passages(world):
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=3,
                                      passages=1, rerank=False, cross_doc=True, cross_doc_passages=3, **PLAIN))
    a = pipe.answer("The code of quenmir is")
    assert a.mode == "cross_doc" and a.answer == "basalt"
    assert [a.passages[i].doc_id for i in a.support] == ["fact-quenmir"]
    assert a.flops.total == sum(v for k, v in a.flops.to_dict().items() if k != "total") > 0
    closed = RagPipeline(RagConfig(**PLAIN), pipe.reader, None).answer("The code of quenmir is")
    prompt = pipe.reader.prompt_ids("The code of quenmir is")
    assert closed.mode == "closed_book" and closed.flops.reader_prompt == pipe.reader.cost.prompt(len(prompt))


def test_rerankers(world, tiny_encoder, tmp_path):
    pipe = RagPipeline.load(RagConfig(reader=world["lm"], **PLAIN))
    lm = load_reranker(None, pipe.reader)
    assert isinstance(lm, LMReranker) and lm.yes != lm.no
    scores, flops = lm.score("The code of zorblat is", ["The code of zorblat is amber", "Paris is in France"])
    assert len(scores) == 2 and all(s <= 0 for s in scores)  # log p(yes) against no
    rows = [lm.tok.encode(lm.prompt_text("The code of zorblat is", p)) for p in ["The code of zorblat is amber",
                                                                                  "Paris is in France"]]
    assert flops == sum(lm.cost.prompt(len(r)) for r in rows)
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)
                                  ).save_pretrained(tmp_path / "ce")
    tok.save_pretrained(tmp_path / "ce")
    ce = load_reranker(str(tmp_path / "ce"), pipe.reader)
    assert isinstance(ce, CrossEncoderReranker) and ce.cost.bidirectional
    scores, flops = ce.score("what is amber", ["amber is a resin", "basalt is a rock", "x"])
    n_tokens = [len(tok("what is amber", p)["input_ids"]) for p in ["amber is a resin", "basalt is a rock", "x"]]
    assert len(scores) == 3 and flops == sum(ce.cost.prompt(n) for n in n_tokens)
    assert isinstance(load_reranker(f"cross-encoder:{tmp_path / 'ce'}", pipe.reader), CrossEncoderReranker)
    # a plain encoder named as a cross-encoder would score with a random head: refused
    with pytest.raises(RetrolmError, match=r"not a cross-encoder: its checkpoint has no classifier.bias, "
                                           r"classifier.weight"):
        load_reranker(f"cross-encoder:{tiny_encoder}", pipe.reader)
    # reranking reorders by the reranker's score, ties kept in retrieval order, and charges its FLOPs

    class Fixed:
        def score(self, question, texts):
            return [{"a": -2.0, "b": -0.5, "c": -0.5}[t] for t in texts], 7

    pipe.reranker = Fixed()
    cands = [Passage(t, t, chunk_id=i, position=0, score=1.0 - i / 10, rank=i) for i, t in enumerate("abc")]
    ranked, (f,) = pipe.rerank(["q"], [cands])
    assert [p.text for p in ranked[0]] == ["b", "c", "a"] and [p.rank for p in ranked[0]] == [1, 2, 0]
    assert f.reranker == 7 and ranked[0][0].rerank_score == -0.5


def test_consistency_votes_on_fixed_answers():
    v = majority_vote(["Paris", "paris.", "London", "The Paris", ""])
    assert (v.answer, v.normalized, v.score, v.support) == ("Paris", "paris", 3.0, [0, 1, 3])
    assert v.share == pytest.approx(3 / 4)  # the empty answer abstains
    assert majority_vote(["y", "x", "x", "y"]).answer == "y"  # a tie goes to the answer given first...
    # ...unless another tied answer is closer to the rest (summed token F1: "red car" 1 + 0.5 + 0.5, the others 1.5)
    assert majority_vote(["blue car", "a red truck", "Red car"]).answer == "Red car"
    assert majority_vote(["x", "y", "y"], weights=[5, 1, 1]).answer == "x"
    assert majority_vote(["", "  "]).answer == "" and majority_vote([]).support == []
    # one self-consistent passage against two that agree with each other: agreement wins
    cd = cross_document_vote([["P", "P", "P"], ["Q", "R", "S"], ["Q", "T", "U"]])
    assert cd.passage_answers == ["P", "Q", "Q"] and cd.self_consistency == pytest.approx([1, 1 / 3, 1 / 3])
    assert cd.agreement == [0.0, 1.0, 1.0] and cd.weights == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert (cd.answer, cd.support) == ("Q", [1, 2]) and cd.tally == pytest.approx({"p": 1.0, "q": 4 / 3})
    # without a partner, the self-consistent passage wins; with none consistent, the best-ranked one
    assert cross_document_vote([["P", "P", "P"], ["Q", "R", "S"]]).answer == "P"
    assert majority_vote(["A", "an"]).answer == ""  # articles alone normalise to nothing: abstentions
    assert cross_document_vote([["x"], ["y"], ["z"]]).support == [0]
    # partial agreement counts: "in 1970" and "1970" support each other against an unrelated answer
    cd = cross_document_vote([["Rome"], ["in 1970"], ["1970"]])
    assert cd.answer == "in 1970" and cd.agreement[0] == 0 and answer_similarity("in 1970", "1970") == pytest.approx(
        2 / 3)
    assert cross_document_vote([[""], ["the"]]).answer == ""
    # abstaining samples count against a passage: one answer in four is a consistency of 1/4, and a passage that
    # answered every time outweighs it
    cd = cross_document_vote([["Paris", "", "", ""], ["Lyon"] * 4])
    assert cd.self_consistency == pytest.approx([0.25, 1.0]) and cd.answer == "Lyon"


def test_multiple_choice_is_scored_and_voted_by_option_not_by_normalised_text():
    """Options that normalise alike ("-1" / "1", "per-CPU" / "per_cpu") are different answers: picking the wrong one
    scored as correct, and their votes were merged."""
    item = QAItem("m", "q", ["1"], ["-1", "1", "per-CPU", "per_cpu"], 1)
    assert score_prediction("-1", item)["em"] == 0.0 and score_prediction("1", item)["em"] == 1.0
    assert score_prediction("per_cpu", QAItem("m", "q", ["per-CPU"], ["per-CPU", "per_cpu"], 0))["em"] == 0.0
    repeated = QAItem("m", "q", ["4"], ["4", "5", "4 "], 0)  # real sets repeat an option now and then
    assert score_prediction("4 ", repeated)["em"] == 1.0 and score_prediction("5", repeated)["em"] == 0.0
    v = majority_vote(["-1", "1", "1"], exact=True)
    assert (v.answer, v.score, v.support) == ("1", 2.0, [1, 2])
    assert majority_vote(["-1", "1", "1"]).score == 3.0  # free-form answers still normalise alike
    cd = cross_document_vote([["-1"], ["1"], ["1"]], exact=True)
    assert (cd.answer, cd.support, cd.agreement) == ("1", [1, 2], [0.0, 1.0, 1.0])


def test_pmi_prefers_the_option_the_question_makes_likelier_not_the_likeliest_one(world):
    """choice_normalize=pmi: the option's total log-likelihood less its likelihood after the premise alone (the
    prompt without question or passages), read once more per question and paid for."""
    from retrolm.eval.qa import choice_prediction

    common, rare = [0.5, 0.5], [1.0, 1.0, 1.0]  # "common" is likelier after the question...
    assert choice_prediction([common, rare], "sum") == 0 and choice_prediction([common, rare], "mean") == 0
    assert choice_prediction([common, rare], "pmi", [[0.1, 0.1], [4.0, 4.0, 4.0]]) == 1  # ...but likelier anywhere
    with pytest.raises(RetrolmError, match="pmi needs"):
        choice_prediction([common, rare], "pmi")
    with pytest.raises(RetrolmError, match="mean, sum or pmi"):
        RagConfig(choice_normalize="max")
    reader = Reader.load(world["lm"], template="{passages}Q: {question}\nA:")
    premise = reader.prompt_ids("", reserve=8)
    assert premise
    prompt = reader.prompt_ids("The code of zorblat is")
    seen = []

    def nlls(p, options):  # option 1 is the likelier after the question, option 0 after the premise
        seen.append(p)
        return [[1.0], [0.5]] if p == prompt else [[3.0], [0.1]]

    reader.option_nlls = nlls
    (mean,) = reader.choose([prompt], [["amber", "basalt"]], "mean")
    (pmi,) = reader.choose([prompt], [["amber", "basalt"]], "pmi")
    assert mean.answers == ["basalt"] and pmi.answers == ["amber"] and seen[-1] == premise
    c = reader.cost  # the premise's forward and the options' after it, on top of the mean rule's
    assert pmi.generation_flops == mean.generation_flops + c.prompt(len(premise)) + 2 * c.prompt(1, past=len(premise))
    assert pmi.prompt_flops == mean.prompt_flops
    plain = Reader.load(world["lm"], template="{passages}{question}")  # nothing is left without the question
    plain.option_nlls = nlls
    plain.choose([prompt], [["amber", "basalt"]], "pmi")
    assert seen[-1] == [plain.tok.eos_id]


def test_flops_on_a_hand_computed_case():
    c = ModelCost("toy", matmul_params=100, n_layer=2, d_attn=8)
    assert c.per_token(5) == 200 + 4 * 2 * 5 * 8
    # 3 prompt tokens attend to 1, 2, 3 positions: 3·200 + 64·(1+2+3)
    assert c.prompt(3) == 600 + 64 * 6 == 984
    # 2 new tokens after a 3-token prompt: one more forward, of token 4 attending to 4 positions
    assert c.generation(3, 2) == 200 + 64 * 4 and c.generation(3, 1) == 0 and c.prompt(0) == 0
    assert c.prompt(2, past=3) == 400 + 64 * (4 + 5)
    enc = ModelCost("enc", 100, 2, 8, bidirectional=True)
    assert enc.prompt(3) == 3 * (200 + 64 * 3)
    s = StageFlops(encoder=1, search=2, reranker=3, reader_prompt=4, reader_generation=5)
    assert s.total == 15 and (s + s).to_dict()["total"] == 30
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    cost = ModelCost.of(m)
    # per layer q, o: 16×16; k, v: 16×8; gate, up, down: 16×32; plus the (tied) head 50×16
    assert cost.matmul_params == 2 * (2 * 256 + 2 * 128 + 3 * 512) + 50 * 16 and cost.d_attn == 16
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = ModelCost.of(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32)))
    # GPT-2's projections are Conv1D, not Linear: per layer c_attn 16×48, c_proj 16×16, c_fc 16×64, mlp c_proj 64×16
    assert gpt2.matmul_params == 2 * (16 * 48 + 16 * 16 + 2 * 16 * 64) + 50 * 16 and gpt2.d_attn == 16
    pre = pretraining_flops("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008)
    assert pre["flops"] == pytest.approx(6 * 134_515_008 * 2e12) and "2T" in pre["source"]
    assert pretraining_flops("unknown/model", 10) is None


def test_answer_extraction():
    assert extract_answer("\n  Answer: Paris.\nMore text") == "Paris."
    assert extract_answer('"basalt"') == "basalt" and extract_answer("") == ""
    # the chat prompt numbers its passages: a reader that cites one is not wrong for it (SmolLM2: "[3] Richard Overy")
    assert extract_answer("[3] Richard Overy") == "Richard Overy" and extract_answer("Paris [1][2]") == "Paris [1][2]"
    assert extract_answer("Answer: [1] [2] Paris [2]") == "Paris" and extract_answer("array[0]") == "array[0]"
    assert extract_answer("**Answer:** Paris") == "Paris"
    assert extract_answer("**Answer:**\n[2]\n  Paris\nmore") == "Paris"  # a label alone on its line, then the answer


def test_cli_contract(world, capsys):
    out = world["root"] / "cli"
    noise = write_jsonl(world["root"] / "noise.jsonl", wiki_docs(5, start=500))
    rc, _, err = run_cli(["rag-eval", "--db", world["db"].path, "--data", world["qa"], "--reader", world["lm"],
                          "--out", out, "-q", "retriever=bm25", "template='{passages}{question}'", "max_new_tokens=6",
                          "passages=1", "top_n=2", "max_questions=4", "samples=2", "cross_doc=true",
                          "cross_doc_passages=2", f"noise=[{noise}]"], capsys)
    assert rc == 0, err
    r = json.loads((out / "rag.json").read_text())
    assert r["software"]["retrolm"] and "torch" in r["software"]
    for mode in ("closed_book", "retrieval", "rerank", "self_consistency", "cross_doc"):
        assert {"em", "f1", "n", "flops_per_question"} <= set(r["summary"][mode])
        assert r["summary"][mode]["n"] == 4 and {"em", "f1", "n"} <= set(r["summary"][mode]["clean"])
    assert 0 <= r["contamination"]["fraction"] <= 1 and r["summary_clean"]["retrieval"]["n"] >= 0
    assert r["robustness"]["noise_chunks"] > 0 and "retrieval" in r["robustness"]["summary"]
    assert "closed_book" not in r["robustness"]["summary"]
    assert (out / "report.md").is_file() and (out / "predictions.jsonl").is_file()
    rc, stdout, err = run_cli(["rag", "--db", world["db"].path, "--reader", world["lm"], "The code of teslin is",
                               "--json", "retriever=bm25", "rerank=false", "passages=1", "top_n=2",
                               "template='{passages}{question}'", "max_new_tokens=6"], capsys)
    assert rc == 0, err
    a = json.loads(stdout)
    assert a["answer"] == "garnet" and a["supporting_passages"][0]["doc_id"] == "fact-teslin"
    assert a["flops"]["total"] > 0
    rc, stdout, _ = run_cli(["rag", "--db", world["db"].path, "--reader", world["lm"], "The code of teslin is",
                             "retriever=bm25", "rerank=false", "passages=1", "template='{passages}{question}'",
                             "max_new_tokens=6"], capsys)
    assert rc == 0 and "answer: garnet" in stdout and "fact-teslin" in stdout
    rc, stdout, _ = run_cli(["rag", "--db", world["db"].path, "--reader", world["lm"], "The code of teslin is",
                             "--query", "mogwen", "retriever=bm25", "rerank=false", "passages=1",
                             "template='{passages}{question}'", "max_new_tokens=6"], capsys)
    assert rc == 0 and "answer: harbor" in stdout and "fact-mogwen" in stdout  # searched with the query
    rc, _, err = run_cli(["rag", "--reader", world["lm"], "The code of teslin is", "--query", "mogwen"], capsys)
    assert rc == 2 and "--query is what retrieval searches with: it needs --db" in err
    rc, _, err = run_cli(["rag-eval", "--db", world["db"].path, "--data", world["qa"], "--reader", world["lm"],
                          "--out", out, "passages=5", "top_n=2"], capsys)
    assert rc == 2 and err.startswith("error: ") and "top_n" in err and len(err.strip().splitlines()) == 1


def test_config_errors(world):
    with pytest.raises(RetrolmError, match="sample_temperature"):
        RagConfig(samples=3, sample_temperature=0)
    with pytest.raises(RetrolmError, match="unit"):
        RagConfig(unit="page")
    # sampling settings with the config, not at the first sampled reading (after the model loads and stages ran)
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0},
                {"samples": 3, "sample_temperature": float("nan")}):
        with pytest.raises(RetrolmError, match="a finite temperature >= 0 and 0 < top_p <= 1"):
            RagConfig(**bad)
    with pytest.raises(RetrolmError, match="choice_normalize must be mean, sum or pmi, got 'max'"):
        RagConfig(choice_normalize="max")
    with pytest.raises(RetrolmError, match="needs --data"):
        run_rag_eval(RagEvalConfig(db=str(world["db"].path)))
    assert load_qa(world["mixed"])[4].multiple_choice and isinstance(load_qa(world["qa"])[0], QAItem)
    with pytest.raises(RetrolmError, match="queries must be >= 0"):
        eval_cfg(world, "bad", queries=-1)
    with pytest.raises(RetrolmError, match="contamination_scope must be item or parts, got 'answer'"):
        eval_cfg(world, "bad", contamination_scope="answer")
    with pytest.raises(RetrolmError, match="contamination_min_words must be >= 1"):
        eval_cfg(world, "bad", contamination_min_words=0)
    # baselines the multiplier cannot use (EM in percent that falls with compute) fail before any question is read,
    # not after the evaluation, which would be lost
    bad = world["root"] / "falling.json"
    bad.write_text(json.dumps([{"name": "s", "flops": 1e15, "metric": 40.0},
                               {"name": "l", "flops": 1e17, "metric": 30.0}]))
    with pytest.raises(RetrolmError, match="does not rise with pretraining FLOPs"):
        run_rag_eval(eval_cfg(world, "bad", baselines=str(bad)))
    assert not (world["root"] / "bad").exists()
    # an option (or answer) that fills the reader's context is refused by name before any question is read
    context = RagPipeline.load(eval_cfg(world, "x"), world["db"]).reader.lm.context_len
    huge = write_jsonl(world["root"] / "huge.jsonl", [
        {"id": "fine", "question": "The code of zorblat is", "answers": ["amber"]},
        {"id": "m-long", "question": "The code of zorblat is", "choices": ["amber", "zorblat " * context],
         "answer": 0}])
    with pytest.raises(RetrolmError, match=rf"huge.jsonl: question 'm-long': its longest option takes \d+ tokens, no "
                                           rf"room for a prompt in the {context}-token context"):
        run_rag_eval(eval_cfg(world, "huge", data=str(huge)))
    with pytest.raises(RetrolmError, match=rf"question 'fine': max_new_tokens is {context} tokens"):
        run_rag_eval(eval_cfg(world, "huge", data=str(huge), max_new_tokens=context))
    long_question = write_jsonl(world["root"] / "long.jsonl", [
        {"id": "fine", "question": "The code of zorblat is", "answers": ["amber"]},
        {"id": "q-long", "question": "zorblat " * context, "answers": ["amber"]}])
    with pytest.raises(RetrolmError, match=rf"long.jsonl: question 'q-long': .*: the prompt takes \d+ tokens; with "
                                           rf"\d+ kept for the answer or the options, its {context}-token context"):
        run_rag_eval(eval_cfg(world, "huge", data=str(long_question)))
    assert not (world["root"] / "huge" / "rag.json").exists()


def test_templates_and_devices_are_checked_with_the_config(world):
    for template, message in [("{passages}Q: {question} {lang}", "unknown field {lang}"),
                              ('Answer in JSON {"a": 1}. {passages}{question}', 'unknown field {"a"}'),
                              ("Question: {question}\nAnswer:", "has no {passages}"),
                              ("{passages}{question} }", "Single '}'")]:
        with pytest.raises(RetrolmError, match=re.escape(message)):
            RagConfig(template=template)
    RagConfig(template="{{literal}} {passages}{question}")
    with pytest.raises(RetrolmError, match="device=gpu: not a device"):
        RagConfig(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RetrolmError, match="device=cuda: CUDA is not available on this machine"):
            RagConfig(device="cuda")


def test_nothing_retrieved_cross_doc_reads_the_question_alone(world):
    """Every configuration reads the question alone when retrieval finds nothing; cross-document consistency
    answered nothing (a multiple-choice item always wrong)."""
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", rerank=False,
                                      cross_doc=True, cross_doc_passages=2, top_n=3, **PLAIN))
    items = [QAItem("m", "qqzx vvwk qqzx vvwk", ["qqzx"], ["qqzx", "basalt"], 0), QAItem("s", "qqzx vvwk qqzx", [])]
    closed = [r.answers[0] for r in pipe.read(items, None)]
    got = pipe.answer_items(items)
    assert [a.answer for a in got] == closed and closed[0] == "qqzx"
    assert all(a.passages == [] and a.support == [] for a in got)


def test_the_reranker_fits_its_prompt_to_the_context(world, tmp_path):
    """A passage longer than the context left by the question is cut further (the yes/no position ends the prompt);
    a question that alone fills the reranker's context is refused by name before anything is read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = world["db"].tokenizer.vocab_size
    small = tmp_path / "small-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(small)
    world["db"].tokenizer.save(small / "tokenizer.json")
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=str(small), retriever="bm25", top_n=2,
                                      passages=1, max_passage_tokens=192, rerank=True, **PLAIN))
    reranker = pipe.reranker
    assert isinstance(reranker, LMReranker) and reranker.lm.context_len == 64
    passage = "The code of zorblat is amber. " * 40
    assert len(reranker.tok.encode(reranker.prompt_text("The code of zorblat is", passage))) > 64
    ids = reranker.prompt_ids("The code of zorblat is", passage)
    assert 48 <= len(ids) <= 64 and reranker.tok.decode(ids).endswith("(yes or no)? Answer:")
    scores, _ = reranker.score("The code of zorblat is", [passage, "short"])
    assert len(scores) == 2
    long_q = QAItem("long", "zorblat " * 80, ["amber"])
    with pytest.raises(RetrolmError, match=r"qa.jsonl: question 'long': the reranker's prompt .* takes \d+ tokens with "
                                           r"no passage, no room in the 64-token context"):
        pipe.check_fits([QAItem("fine", "The code of zorblat is", ["amber"]), long_q], "qa.jsonl")


def test_cross_document_consistency_reads_each_document_once(world):
    """Chunks i and i+1 of one document (which overlap through the continuation) are one source: cross-document
    consistency reads the best-ranked passage of each of the first cross_doc_passages documents."""
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", rerank=False,
                                      cross_doc=True, cross_doc_passages=3, top_n=6, **PLAIN))
    docs = ["a", "a", "b", "a", "c", "d"]
    ps = [Passage(f"text {i}", d, chunk_id=10 + i, position=i, score=1.0 - i / 10, rank=i) for i, d in enumerate(docs)]
    assert [(p.doc_id, p.rank) for p in pipe.cross_doc_candidates(ps)] == [("a", 0), ("b", 2), ("c", 4)]
    ans = pipe.answer("The code of plimbo is")
    assert len({p.doc_id for p in ans.passages}) == len(ans.passages) == 3


def test_document_unit_reads_whole_documents(world):
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", unit="document",
                                      top_n=2, passages=1, rerank=False, document_tokens=64, **PLAIN))
    passages, flops = pipe.retrieve(["The code of plimbo is"])
    assert passages[0][0].doc_id == "fact-plimbo" and passages[0][0].text.strip() == "The code of plimbo is dune"
    assert len({p.doc_id for p in passages[0]}) == len(passages[0]) and flops[0].search > 0


def test_a_document_passage_is_read_around_the_chunk_it_was_found_by(tmp_path):
    """A document's window is clamped at its end, and the reader reads the first max_passage_tokens of a passage:
    a fact at the end of a long document was cut off before the reader saw it (the answer came from the text before
    it). The window is now cut around the best chunk, which a later hop follows too."""
    long_doc = " ".join(d["text"] for d in wiki_docs(3)) + " The code of zorblat is amber."
    db = Database.build([write_jsonl(tmp_path / "corpus.jsonl", [{"id": "long", "text": long_doc}, *wiki_docs(8, 3)])],
                        tmp_path / "db", BuildConfig(tokenizer="train:1000", index="none", bm25=True),
                        show_progress=False)
    assert len(db.tokenizer.encode(long_doc)) > 400
    lm_dir = tmp_path / "copy-llama"
    induction_llama(db.tokenizer.vocab_size).save_pretrained(lm_dir)
    db.tokenizer.save(lm_dir / "tokenizer.json")
    cfg = RagConfig(db=str(db.path), reader=str(lm_dir), retriever="bm25", unit="document", top_n=1, passages=1,
                    rerank=False, max_passage_tokens=96, template="{passages}{question}", max_new_tokens=2)
    pipe = RagPipeline.load(cfg)
    (p,), = pipe.retrieve(["The code of zorblat is"])[0]
    assert p.doc_id == "long" and p.matched and p.matched.strip() in long_doc
    assert "The code of zorblat is amber" in p.text  # was cut off: the window's first 96 tokens
    assert len(pipe.reader.tok.encode(p.text)) <= 96
    assert "The code of zorblat is amber" in pipe.reader.prompt_text("The code of zorblat is", [p.text])
    # a window that fits is read whole, and a part it does not hold leaves it as it is
    assert pipe.reader.window("short text", "short") == "short text"
    assert pipe.reader.window(long_doc, "not in it") == long_doc


def test_document_passages_are_searched_deeper_until_n_documents_are_found(tmp_path):
    """unit=document fetched 4·n chunks once: where one long document filled them, fewer than n documents came back
    although the store held more that match."""
    db = Database.build([write_jsonl(tmp_path / "corpus.jsonl", wiki_docs(40))], tmp_path / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True, chunk_len=8), show_progress=False)
    retriever = PassageRetriever(db, "bm25", unit="document")
    questions = [" ".join(d["text"].split()[:8]) for d in wiki_docs(40)]
    everything = retriever.retriever.search(questions, db.store.n_chunks)
    searched, search = [], retriever.retriever.search

    def counted(queries, k, *args, **kwargs):
        searched.extend(queries)
        return search(queries, k, *args, **kwargs)

    retriever.retriever.search = counted
    for n in (2, 3):
        searched.clear()
        found, flops = retriever.retrieve(questions, n)
        for i, ps in enumerate(found):
            matching = list(dict.fromkeys(h.doc_id for h in everything.hits(i)))
            assert [p.doc_id for p in ps] == matching[:n]
            # each search of a question is counted (searched again deeper: twice or more)
            assert flops[i].search == searched.count(questions[i]) * retriever.flops(questions[i]).search
        assert len(searched) > len(questions)


def test_a_later_hop_finds_new_chunks_beyond_those_next_to_the_earlier_ones(tmp_path):
    """The second hop's query holds the first hop's chunk, so that chunk and the chunks next to it rank first: it
    fetched n + 2 per passage found before and could come back empty though other chunks matched."""
    db = Database.build([write_jsonl(tmp_path / "corpus.jsonl", wiki_docs(40))], tmp_path / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True, chunk_len=16),
                        show_progress=False)
    retriever = PassageRetriever(db, "bm25", continuation=True)
    questions = [" ".join(d["text"].split()[:10]) for d in wiki_docs(40)]
    found, _ = retrieve_hops(retriever, questions, 1, hops=2)
    followed = [i for i, ps in enumerate(found) if new_words(questions[i], ps[0].matched or ps[0].text)]
    assert len(followed) > 20 and all([p.hop for p in found[i]] == [1, 2] for i in followed)


def test_passages_that_do_not_fit_are_the_lowest_ranked_left_out_and_not_reported(world, monkeypatch, caplog):
    """Three passages where the reader's context holds the prompt with one: the best-ranked one is read and is the
    only one reported (a prompt cut on the left lost the instructions and the best passages, yet all were listed)."""
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=3,
                                      passages=3, rerank=False, **PLAIN))
    q = "The code of plimbo is"
    full = pipe.answer(q)
    assert len(full.passages) == 3 and full.support == [0, 1, 2]
    one = len(pipe.reader.prompt_ids(q, [full.passages[0].text], reserve=pipe.cfg.max_new_tokens))
    monkeypatch.setattr(type(pipe.reader.lm), "context_len", property(lambda _: one + pipe.cfg.max_new_tokens))
    import retrolm.infer.rag as rag_module

    monkeypatch.setattr(rag_module, "_FIT_WARNED", set())  # warned once per reader
    ans = pipe.answer(q)
    assert [p.chunk_id for p in ans.passages] == [full.passages[0].chunk_id] and ans.support == [0]
    assert ans.answer == "dune" and "2 of the 3 passages of question 'q' do not fit" in caplog.text
    # cross-document consistency reads each passage alone: only those that fit are read and can support the answer
    room = min(len(pipe.reader.prompt_ids(q, [p.text], reserve=pipe.cfg.max_new_tokens)) for p in full.passages)
    monkeypatch.setattr(type(pipe.reader.lm), "context_len", property(lambda _: room + pipe.cfg.max_new_tokens))
    cross = RagPipeline(dataclasses.replace(pipe.cfg, cross_doc=True, cross_doc_passages=3), pipe.reader,
                        pipe.retriever)
    fitting = [p for p in full.passages if len(pipe.reader.prompt_ids(q, [p.text], reserve=0)) <= room]
    got = cross.answer(q)  # the prompt was refused half way (it had been cut on the left)
    assert [p.chunk_id for p in got.passages] == [p.chunk_id for p in fitting] and 0 < len(fitting) < 3
    # a byte that is not UTF-8 in a command-line argument arrives as half a surrogate pair: refused, not a traceback
    for question, query, what in [("What is \udcff?", None, "question"), ("What?", "x \ud800", "query")]:
        with pytest.raises(RetrolmError, match=f"rag: the {what}: not valid Unicode"):
            pipe.answer(question, query)


def test_an_answer_label_on_its_own_line_does_not_end_the_answer(world, monkeypatch):
    """A reader writing "**Answer:**", a line break, then the answer was stopped at the break: the answer extracted
    from "**Answer:**" is empty. A line break ends the answer once there is one."""
    import retrolm.infer.reader as reader_module

    reader = RagPipeline.load(RagConfig(reader=world["lm"], **PLAIN)).reader
    tok = reader.tok
    script = [*tok.encode("**Answer:**"), *tok.encode("\n"), *tok.encode(" ember"), *tok.encode("\n"),
              *tok.encode("and more")]
    written = iter(script)
    monkeypatch.setattr(reader_module, "sample", lambda *args: next(written))
    (reading,) = reader.generate([reader.prompt_ids("The code of drunek is", ["The code of drunek is ember"])],
                                 max_new_tokens=len(script))
    assert reading.answers == ["ember"] and reading.texts == ["**Answer:**\n ember"]


def test_batched_reading_matches_reading_alone(world):
    """Left padding, the shared KV cache of samples and the options read after one prompt change nothing."""
    reader = RagPipeline.load(RagConfig(reader=world["lm"], **PLAIN)).reader
    prompts = [reader.prompt_ids(q, [p]) for q, p in [("The code of drunek is", "The code of drunek is ember"),
                                                      ("Paris is", "The city of Paris is big and old and famous")]]
    assert len(prompts[0]) != len(prompts[1])
    together = reader.generate(prompts, max_new_tokens=5, batch_size=2)
    alone = [reader.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert [r.texts for r in together] == [r.texts for r in alone] and together[0].answers == ["ember"]
    assert [r.generation_flops for r in together] == [r.generation_flops for r in alone]
    sampled = reader.generate(prompts, samples=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=1)
    assert [len(r.answers) for r in sampled] == [3, 3]
    assert sampled[0].prompt_flops == reader.cost.prompt(len(prompts[0]))  # the prompt is read once for 3 samples
    again = reader.generate(prompts, samples=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=1)
    assert [r.texts for r in again] == [r.texts for r in sampled]  # seeded
    # ...per prompt: a question's samples do not depend on the questions generated with it or on the batch size
    alone_sampled = [reader.generate([p], samples=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=1)[0]
                     for p in prompts[::-1]][::-1]
    assert [r.texts for r in alone_sampled] == [r.texts for r in sampled]
    assert len({row_generator(1, prompts[0], i).initial_seed() for i in range(3)} | {
        row_generator(2, prompts[0], 0).initial_seed(), row_generator(1, prompts[1], 0).initial_seed()}) == 5
    # a prompt that leaves no room for what is generated or scored after it is refused, not cut (on the left it
    # would lose the instructions and the best passages); passages_that_fit says how many fit, best first
    n = reader.lm.context_len
    short, long = "The code of drunek is ember", "x " * (n // 2)
    full = len(reader.prompt_ids("The code of drunek is", [short, long]))
    assert reader.passages_that_fit("The code of drunek is", [short, long], reserve=n - full) == 2
    assert reader.passages_that_fit("The code of drunek is", [short, long], reserve=n - full + 1) == 1
    alone = len(reader.prompt_ids("The code of drunek is", [long]))  # the long one is cut to max_passage_tokens
    assert reader.passages_that_fit("The code of drunek is", [long, short], reserve=n - alone + 1) == 0
    assert reader.passages_that_fit("The code of drunek is", [short, long], reserve=n - alone + 1) == 1
    with pytest.raises(RetrolmError, match=rf"the prompt with 2 passages takes {full} tokens; with {n - full + 1} "
                                           rf"kept for the answer or the options, its {n}-token context has room for "
                                           rf"{full - 1}"):
        reader.prompt_ids("The code of drunek is", [short, long], reserve=n - full + 1)
    with pytest.raises(RetrolmError, match=f"{n} tokens to generate or score leave no room"):
        reader.prompt_ids("q", reserve=n)
    options = ["ember", "basalt cobalt", "x"]
    nlls = reader.option_nlls(prompts[0], options)
    ids = [reader.tok.encode(" " + o) for o in options]
    ref = reader.lm.token_nll([prompts[0] + i for i in ids], [len(i) for i in ids])
    for got, want in zip(nlls, ref, strict=True):
        assert got == pytest.approx(want.tolist(), abs=1e-4)
    (r,) = reader.choose([prompts[0]], [options])
    assert r.answers == ["ember"] and r.prompt_flops == reader.cost.prompt(len(prompts[0]))
    assert r.generation_flops == sum(reader.cost.prompt(len(i), past=len(prompts[0])) for i in ids)


def test_retrieval_flops_of_dense_and_hybrid(built_db):
    """Dense: the query's encoder forward (bidirectional) and 2·d per key; hybrid adds BM25's postings + one pass over
    the chunks."""
    from retrolm.infer.rag import PassageRetriever

    q = "a city on a river"
    dense = PassageRetriever(built_db, "dense")
    passages, (f,) = dense.retrieve([q], 3)
    enc = built_db.encoder
    tokens = int(enc.tokenize([q])["attention_mask"].sum())
    assert f.encoder == ModelCost.of(enc.model, bidirectional=True).prompt(tokens) > 0
    assert f.search == 2 * enc.dim * built_db.store.n_chunks and len(passages[0]) == 3
    hybrid = PassageRetriever(built_db, "hybrid").flops(q)
    bm25 = PassageRetriever(built_db, "bm25").flops(q)
    assert bm25.encoder == 0 and built_db.store.n_chunks < bm25.search
    # the postings counted are those of the index: on a hand-made one, "apple" is in 2 chunks, "date" in 1
    from retrolm.db.lexical import LexicalIndex

    texts = ["apple banana", "apple cherry", "date", "banana"]
    tiny = LexicalIndex.build(lambda ids: [texts[i] for i in ids], len(texts))
    assert tiny.postings("apple date zzz apple") == 3 and tiny.postings("banana") == 2 and tiny.postings("") == 0
    assert hybrid.encoder == f.encoder and hybrid.search == f.search + bm25.search


def test_a_chat_prompt_keeps_special_token_strings_of_passages_and_questions_as_text(world):
    pipe = RagPipeline.load(RagConfig(reader=world["lm"], **PLAIN))
    eos = pipe.reader.tok.eos_id

    class Chat:  # a template whose turn markers are the tokenizer's one special token
        chat_template = "turns"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(f"{EOS_TOKEN}{m['role']}\n{m['content']}{EOS_TOKEN}\n" for m in messages) + \
                f"{EOS_TOKEN}assistant\n"

    reader = Reader(pipe.reader.lm, pipe.reader.tok, Chat(), system="")
    passage, question = f"GPT-2 writes {EOS_TOKEN} between documents.", f"What does {EOS_TOKEN} do?"
    assert reader.prompt_ids(question, [passage]).count(eos) == 3  # the user turn's two markers + the answer's
    assert LMReranker.of_reader(reader).prompt_ids(question, passage).count(eos) == 5  # system, user, answer


def test_one_answer_reranks_only_when_a_reranker_is_named_and_an_evaluation_by_default(world, capsys):
    base = dict(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=3, passages=1, **PLAIN)
    pipe = RagPipeline.load(RagConfig(**base))
    assert pipe.reranker is None and pipe.answer("The code of quenmir is").mode == "retrieval"
    assert isinstance(RagPipeline.load(RagConfig(**base, rerank=True)).reranker, LMReranker)
    assert isinstance(RagPipeline.load(RagConfig(**base, reranker=world["lm"])).reranker, LMReranker)
    assert RagPipeline.load(RagConfig(**base), evaluation=True).reranker is not None  # rag-eval compares the stages
    assert RagPipeline.load(RagConfig(**base, rerank=False), evaluation=True).reranker is None
    rc, stdout, err = run_cli(["rag", "--db", world["db"].path, "--reader", world["lm"], "The code of teslin is",
                               "retriever=bm25", "passages=1", "template='{passages}{question}'", "max_new_tokens=6",
                               "rerank=null"], capsys)
    assert rc == 0 and "mode: retrieval" in stdout, err


def test_a_second_hop_finds_what_the_question_does_not_name(tmp_path):
    """"What is the code of the keeper of the amber gate?" names the gate, not its keeper: hop 1 finds who keeps it,
    hop 2 (the question and the passage's new word, the keeper's name) the keeper's code; a passage found again is
    not repeated, each hop adds up to n new ones, and the second search is counted."""
    bridges = [{"id": f"bridge-{n}", "text": f"The keeper of the {w} gate is {n}"}
               for n, w in zip(NAMES, WORDS, strict=True)]
    facts = [{"id": f"fact-{n}", "text": f"The code of {n} is {n[::-1]}"} for n in NAMES]
    db = Database.build([write_jsonl(tmp_path / "corpus.jsonl", wiki_docs(10) + bridges + facts)], tmp_path / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True), show_progress=False)
    retriever = PassageRetriever(db, "bm25", continuation=False)
    questions = [f"What is the code of the keeper of the {w} gate?" for w in WORDS]
    one, one_flops = retrieve_hops(retriever, questions, 1, hops=1)
    assert [[p.doc_id for p in ps] for ps in one] == [[f"bridge-{n}"] for n in NAMES]
    two, two_flops = retrieve_hops(retriever, questions, 1, hops=2)
    assert [[p.doc_id for p in ps] for ps in two] == [[f"bridge-{n}", f"fact-{n}"] for n in NAMES]
    assert [p.hop for p in two[0]] == [1, 2] and two[0][1].to_dict()["hop"] == 2 and "hop" not in two[0][0].to_dict()
    assert all(b.search > a.search for a, b in zip(one_flops, two_flops, strict=True))
    assert new_words("What is the code of the keeper of the amber gate?", bridges[0]["text"]) == "zorblat"
    # interleaved, best of each hop first; nothing twice
    wide, _ = retrieve_hops(retriever, questions[:1], 3, hops=2)
    assert [p.hop for p in wide[0]] == [1, 2, 1, 2, 1, 2]
    assert wide[0][1].doc_id == "fact-zorblat" and len({p.doc_id for p in wide[0]}) == 6


def test_the_pipeline_reads_both_hops(world):
    """hops=2 in the pipeline: the reader's passages interleave the hops, and hops must be >= 1."""
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=2,
                                      passages=2, hops=2, **PLAIN))
    passages, _ = pipe.retrieve(["The code of zorblat is"])
    assert [p.hop for p in passages[0]][:2] == [1, 2] and passages[0][0].doc_id == "fact-zorblat"
    with pytest.raises(RetrolmError, match="hops must be >= 1"):
        RagConfig(hops=0)


def test_hops_that_cannot_be_read_are_warned_about(world, caplog):
    cfg = dict(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=2, **PLAIN)
    with caplog.at_level("WARNING", logger="retrolm.infer.rag"):
        RagPipeline.load(RagConfig(passages=1, hops=2, **cfg))
    assert "passages of the last 1 hop(s) are searched but not read" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrolm.infer.rag"):
        RagPipeline.load(RagConfig(passages=2, hops=2, **cfg))
    assert "not read" not in caplog.text


def test_later_hops_skip_text_already_found_and_follow_the_chunk_not_its_continuation(tmp_path):
    """With continuations a passage is a chunk and the next one: a later hop must not return that next chunk (its
    text is already there), and its query takes the new words of the matched chunk alone."""
    db = Database.build([write_jsonl(tmp_path / "corpus.jsonl", wiki_docs(20))], tmp_path / "db",
                        BuildConfig(tokenizer="train:1000", index="none", bm25=True, chunk_len=32), show_progress=False)
    retriever = PassageRetriever(db, "bm25", continuation=True)
    questions = [" ".join(d["text"].split()[:12]) for d in wiki_docs(8)]
    found, _ = retrieve_hops(retriever, questions, 3, hops=2)
    later = 0
    for ps in found:
        for p in (p for p in ps if p.hop == 2):  # (hop 1 is one search's ranking, as without hops)
            for q in (q for q in ps if q is not p and (q.hop == 1 or q.rank < p.rank)):
                same = (p.doc_id, p.shard) == (q.doc_id, q.shard)
                assert not (same and p.position < q.position + q.span and q.position < p.position + p.span)
        later += sum(p.hop == 2 for p in ps)
        hop2 = [p.rank for p in ps if p.hop == 2]
        assert hop2 == list(range(len(hop2)))  # ranks among the hop's new passages
    assert later > 0
    first = found[0][0]
    assert first.span == 2 and first.matched is not None and first.text.startswith(first.matched)


def test_new_words_in_scripts_without_spaces_or_with_combining_marks():
    assert new_words("हिन्दी भाषा", "हिन्दी भारत की भाषा है") == "भारत की है"  # vowel signs stay in their word
    assert new_words("北京是", "北京是中国的首都") == "中 国 的 首 都"  # each Han character is a word
    assert new_words("cafe\u0301 noir", "Caf\u00e9 au lait") == "au lait"  # NFC: a decomposed é is é


def test_a_later_hop_asks_no_more_than_the_retriever_serves():
    """A sharded database's remote parts cap k (max_k): the later hop's wider fetch stays within it."""
    asked = []

    class Capped:
        unit, max_k = "chunk", 5

        def retrieve(self, questions, n):
            asked.append(n)
            ps = [[Passage(f"{q} alpha{j} beta{j}", f"d{j}", j, 0, 1.0, j) for j in range(n)] for q in questions]
            return ps, [StageFlops() for _ in questions]

    found, _ = retrieve_hops(Capped(), ["alpha0"], 4, hops=2)
    assert asked == [4, 5] and [p.hop for p in found[0]] == [1, 2, 1, 1, 1]


def test_a_record_s_query_is_what_retrieval_searches_with(world, tmp_path):
    """A benchmark's ``query`` replaces the question in the search only: the reader still reads the question."""
    qa = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "question": "The code of zorblat is", "answers": ["amber"]},
                                            {"id": "r", "question": "The code of zorblat is", "answers": ["amber"],
                                             "query": "quenmir"}])
    r = run_rag_eval(eval_cfg(world, "query", data=str(qa), contamination_scope="parts", contamination_min_words=1),
                     show_progress=False)
    assert r["contamination"]["scope"] == "parts" and r["contamination"]["min_words"] == 1
    assert "answers also on their own, whole from 1 words" in (world["root"] / "query" / "report.md").read_text()
    preds = [json.loads(x) for x in (world["root"] / "query" / "predictions.jsonl").read_text().splitlines()]
    assert [p["retrieval"]["passages"] for p in preds] == [["fact-zorblat"], ["fact-quenmir"]]
    assert [p["retrieval"]["answer"] for p in preds] == ["amber", "basalt"]  # copied after the question's "is"
    assert "query" not in preds[0] and preds[1]["query"] == "quenmir"
    pipe = RagPipeline.load(RagConfig(db=str(world["db"].path), reader=world["lm"], retriever="bm25", top_n=3,
                                      passages=1, rerank=False, **PLAIN))
    (a,) = pipe.answer_items(load_qa(qa)[1:])
    assert [p.doc_id for p in a.passages] == ["fact-quenmir"] and a.question == "The code of zorblat is"
    assert pipe.answer("The code of zorblat is", query="quenmir").answer == "basalt"
    with pytest.raises(RetrolmError, match="the query is empty"):
        pipe.answer("The code of zorblat is", query=" ")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q", "question": "x", "answers": ["y"], "query": " "}])
    with pytest.raises(RetrolmError, match=r"bad\.jsonl:1: 'query' must be a non-empty string"):
        load_qa(bad)


def test_an_evaluation_that_stops_resumes_after_its_last_finished_block(world, monkeypatch):
    import retrolm.infer.rag_eval as rag_eval

    real, calls, stop = rag_eval.evaluate_block, [], {"at": 0}

    def counted(pipe, items, *a, **kw):
        calls.append([it.id for it in items])
        if len(calls) == stop["at"]:
            raise KeyboardInterrupt  # the job is killed during this block
        return real(pipe, items, *a, **kw)

    def run(cfg, killed_at: int = 0) -> dict | None:
        """The evaluation, killed during its ``killed_at``-th block (0: never); ``calls`` holds this run's blocks."""
        calls.clear()
        stop["at"] = killed_at
        if not killed_at:
            return run_rag_eval(cfg, show_progress=False)
        with pytest.raises(KeyboardInterrupt):
            run_rag_eval(cfg, show_progress=False)
        return None

    monkeypatch.setattr(rag_eval, "evaluate_block", counted)
    whole = run(eval_cfg(world, "whole", block=2, samples=2))
    assert len(calls) == 5 and not (world["root"] / "whole" / "progress.jsonl").exists()
    cfg = eval_cfg(world, "stopped", block=2, samples=2)
    run(cfg, killed_at=3)
    progress = world["root"] / "stopped" / "progress.jsonl"
    assert len(progress.read_text().splitlines()) == 3  # the fingerprint and two finished blocks
    with open(progress, "a") as f:
        f.write('{"pass": "rag-eval", "start": 4, "ids": ["q4", "q')  # a line torn by the crash
    run(cfg, killed_at=2)  # stops again, one block later: the torn line must not have glued itself to the next row
    assert [json.loads(x)["start"] for x in progress.read_text().splitlines()[1:]] == [0, 2, 4]
    resumed = run(cfg)
    assert calls == [["q6", "q7"], ["q8", "q9"]]  # only the blocks that had not finished
    assert resumed["resumed_blocks"] == 3 and whole["resumed_blocks"] == 0
    assert resumed["summary"] == whole["summary"]
    preds = [(world["root"] / d / "predictions.jsonl").read_text() for d in ("whole", "stopped")]
    assert preds[0] == preds[1] and not progress.exists()
    # other settings start over
    run(cfg, killed_at=2)
    run(eval_cfg(world, "stopped", block=2, samples=2, top_n=2))
    assert len(calls) == 5
    # fewer questions: the finished blocks are kept, a block that now holds fewer questions is read again
    run(cfg, killed_at=3)
    short = run(eval_cfg(world, "stopped", block=2, samples=2, max_questions=3))
    assert calls == [["q2"]] and short["n"] == 3 and short["resumed_blocks"] == 1


def test_progress_keeps_odd_answers_and_ignores_rows_it_cannot_use(tmp_path):
    from retrolm.infer.rag_eval import Prediction, Progress

    path = tmp_path / "progress.jsonl"
    one = {"retrieval": [Prediction("a\u2028b\x85c", StageFlops(search=3), ["d"], [0], [])]}
    Progress(path, "fp").put("rag-eval", 0, ["q0"], one, {"retrieval": 1.5})
    back = Progress(path, "fp").get("rag-eval", 0, ["q0"])  # str.splitlines() would cut this row at U+2028
    assert back is not None and back[0]["retrieval"][0].answer == "a\u2028b\x85c" and back[1] == {"retrieval": 1.5}
    assert back[0]["retrieval"][0].flops == StageFlops(search=3)
    rows = path.read_text().splitlines(keepends=False)
    for bad in ('{"block": 0}', '{"fingerprint": "fp", "pass": ["x"], "start": 2, "ids": [], "predictions": {}, '
                '"seconds": {}}', rows[1].replace('"search": 3', '"search": "many"'),
                rows[1].replace('"fingerprint": "fp"', '"fingerprint": "another run"')):
        path.write_text(rows[0] + "\n" + bad + "\n" + rows[1] + "\n")
        p = Progress(path, "fp")  # no traceback: the row and everything after it are dropped
        assert p.get("rag-eval", 0, ["q0"]) is None and len(path.read_text().splitlines()) == 1
    path.write_text("\x00\xff garbage")
    assert Progress(path, "fp").done == {} and json.loads(path.read_text()) == {"fingerprint": "fp"}


def test_the_fingerprint_of_an_evaluation_follows_its_questions_and_database(world, tmp_path):
    import shutil

    from retrolm.infer.rag_eval import fingerprint

    db = tmp_path / "db"
    shutil.copytree(world["db"].path, db)
    qa = tmp_path / "qa.jsonl"
    shutil.copy(world["qa"], qa)
    cfg = eval_cfg(world, "fp", db=str(db), data=str(qa))
    first = fingerprint(cfg)
    assert fingerprint(eval_cfg(world, "elsewhere", db=str(db), data=str(qa), max_questions=3)) == first
    Database.open(db).delete(doc_ids=["fact-zorblat"])
    edited = fingerprint(cfg)
    assert edited != first
    qa.write_text(qa.read_text().replace("amber", "ambre"))
    assert fingerprint(cfg) != edited
    assert fingerprint(eval_cfg(world, "fp", db=str(db), data=str(qa), contamination_n=8, contamination_scope="parts",
                                contamination_min_words=2)) == fingerprint(cfg)  # no prediction changes
    noise = write_jsonl(tmp_path / "noise.jsonl", wiki_docs(2, start=900))
    noisy = eval_cfg(world, "fp", db=str(db), data=str(qa), noise=[str(noise)])
    before = fingerprint(noisy)
    noise.write_text(noise.read_text() + json.dumps({"id": "more", "text": "more noise"}) + "\n")
    assert fingerprint(noisy) != before
    lm = tmp_path / "lm"
    shutil.copytree(world["lm"], lm)
    local = eval_cfg(world, "fp", db=str(db), data=str(qa), reader=str(lm))
    before = fingerprint(local)
    weights = next(lm.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")  # retrained in place
    assert fingerprint(local) != before
    before = fingerprint(local)  # a chat template makes other prompts of the same weights
    (lm / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert fingerprint(local) != before
    reranked = eval_cfg(world, "fp", db=str(db), data=str(qa), reranker=f"cross-encoder:{lm}")
    before = fingerprint(reranked)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x02")  # a local cross-encoder retrained
    assert fingerprint(reranked) != before


def test_the_fingerprint_follows_a_hub_models_cached_revision(world, tmp_path, monkeypatch):
    """A hub reader's answers change with its revision: the resume fingerprint reads the revision the cache holds."""
    from retrolm.infer.rag_eval import fingerprint

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--reader-lm"

    def cache_revision(commit: str) -> None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")

    cfg = eval_cfg(world, "fp", reader="someone/reader-lm")
    cache_revision("a" * 40)
    first = fingerprint(cfg)
    assert fingerprint(cfg) == first
    cache_revision("b" * 40)  # the hub model was updated and read again
    assert fingerprint(cfg) != first
    reranked = eval_cfg(world, "fp", reader="someone/reader-lm", reranker="cross-encoder:someone/ce")
    assert fingerprint(reranked) != fingerprint(cfg)
