"""REALM training: salient-span masking, the document index and its asynchronous refresh, pre-training and QA
fine-tuning on a hand-made store where each answer is in exactly one document."""

from __future__ import annotations

import collections
import json
import random
import threading

import pytest
import torch

from retrolm.core.errors import RetrolmError
from retrolm.models.realm import RealmModel, RealmShape
from retrolm.train.realm import (
    RealmConfig,
    answer_spans,
    finetune,
    predict,
    pretrain,
    pretrain_step,
    qa_step,
)
from retrolm.train.realm_index import DocEmbedder, DocumentIndex, IndexRefresher, TextDocuments, embed_documents
from retrolm.train.realm_masking import mask_example, salient_spans

PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "George", "Helen"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Dublin", "Prague"]
DOCS = [f"{p} lives in {c} ." for p, c in zip(PEOPLE, CITIES, strict=True)] + ["the sky is blue .", "water is wet ."]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrolm.core.hub import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm").path)


def tiny_realm(tokenizer, seed: int = 0, embed_dim: int | None = None) -> RealmModel:
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return RealmModel(cfg, tokenizer, RealmShape("tiny", embed_dim))


def small_cfg(**kw) -> RealmConfig:
    base = dict(k=3, qa_k=10, batch_size=8, lr=3e-3, steps=10, refresh_every=0, max_doc_len=16, max_query_len=16,
                log_every=1000, save_every=1000, embed_dim=None, exclude_source=False)
    return RealmConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------------- masking
def test_salient_spans_of_fixed_sentences():
    def spans(t):
        return [t[s:e] for s, e in salient_spans(t)]

    assert spans("Marie Curie was born on 7 November 1867 in Warsaw.") == ["Marie Curie", "7 November 1867", "Warsaw"]
    assert spans("The treaty was signed on June 28, 1919 at the Palace of Versailles by 32 nations.") == [
        "June 28, 1919", "Palace of Versailles", "32"]
    assert spans("In 1903 she won. Then it rained on 2001-09-11.") == ["1903", "2001-09-11"]


def test_salient_masking_masks_one_whole_span(tokenizer):
    text = "Marie Curie was born on 7 November 1867 in Warsaw."
    seen = set()
    for seed in range(12):
        m = mask_example(text, tokenizer, "salient", random.Random(seed))
        original = tokenizer(text, add_special_tokens=False)["input_ids"]
        masked = [i for i, lab in enumerate(m.labels) if lab != -100]
        assert [m.labels[i] for i in masked] == [original[i] for i in masked]
        assert all(m.ids[i] == tokenizer.mask_token_id for i in masked)
        assert all(m.ids[i] == original[i] for i in range(len(original)) if i not in masked)
        assert masked == list(range(masked[0], masked[-1] + 1))  # one contiguous span
        assert tokenizer.decode([original[i] for i in masked]) == text[m.span[0]:m.span[1]].lower()
        seen.add(text[m.span[0]:m.span[1]])
    assert seen == {"Marie Curie", "7 November 1867", "Warsaw"}


def test_random_masking_is_the_ablation(tokenizer):
    text = "the cat sat on the mat and looked at the dog for a long time"
    m = mask_example(text, tokenizer, "random", random.Random(0), mask_prob=0.5)
    n = sum(lab != -100 for lab in m.labels)
    assert m.span is None
    assert 2 <= n <= len(m.ids) - 2
    none = mask_example("the cat sat on the mat", tokenizer, "salient", random.Random(0), mask_prob=0.01)
    assert none.span is None and sum(lab != -100 for lab in none.labels) == 1  # no salient span: random fallback


# ---------------------------------------------------------------------------------------------- index, refresh
def test_index_search_is_exact_top_k_with_exclusions():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    index = DocumentIndex(emb, step=0, live=torch.tensor([True, True, True, False]))
    q = torch.tensor([[-1.0, 0.1], [1.0, 0.9]])
    scores, ids = index.search(q, 2)
    assert ids.tolist() == [[1, 2], [2, 0]]  # doc 3 would be query 0's best but is not live
    assert scores[1].tolist() == pytest.approx([1.33, 1.0])
    _, ids = index.search(q, 2, exclude=[-1, 2])
    assert ids.tolist() == [[1, 2], [0, 1]]
    # more candidates than there are retrievable documents: fewer come back, never a deleted or excluded one
    scores, ids = index.search(q, 4, exclude=[-1, 2])
    assert ids.shape == (2, 2) and torch.isfinite(scores).all()
    with pytest.raises(RetrolmError, match="no retrievable document"):
        DocumentIndex(emb[:1], step=0).search(q, 2, exclude=[0, 0])


def test_the_index_pools_documents_as_the_model_does(tokenizer):
    """With mean pooling (a sentence-transformers encoder's own), the index's document embeddings are the model's
    Embed_doc, not the [CLS] state: queries and documents must be pooled alike."""
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = RealmModel(cfg, tokenizer, RealmShape("tiny", None, "mean")).eval()
    index = DocumentIndex.build(model, TextDocuments(DOCS), 0, 16)
    with torch.no_grad():
        enc = model.tokenize(DOCS, 16)
        torch.testing.assert_close(index.embeddings, model.embed_documents(enc["input_ids"], enc["attention_mask"]))


def _perturb(model: RealmModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.doc_encoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def test_refresh_swaps_in_a_snapshot_and_records_the_lag(tokenizer):
    docs = TextDocuments(DOCS)
    model = tiny_realm(tokenizer)
    refresher = IndexRefresher(docs, DocumentIndex.build(model, docs, 0, 16), max_len=16, batch_size=3)
    old = refresher.index
    _perturb(model, 1)  # "training" changed the document encoder by step 3
    expected = embed_documents(DocEmbedder(model, 16), docs)
    assert refresher.start(model, step=3)
    assert not refresher.start(model, step=3)  # one refresh at a time
    _perturb(model, 2)  # training goes on while the snapshot is embedded
    assert refresher.index is old
    record = refresher.poll(step=6, wait=True)
    assert record.snapshot_step == 3 and record.swap_step == 6 and record.lag == 3
    assert refresher.history == [record]
    assert refresher.index is not old and refresher.index.step == 3
    torch.testing.assert_close(refresher.index.embeddings, expected)  # = re-embedding from scratch with the snapshot
    assert not torch.allclose(old.embeddings, expected)
    assert not refresher.busy and refresher.poll(step=7) is None


def test_swap_is_atomic_under_concurrent_search(tokenizer):
    docs = TextDocuments([f"{d} ({i})" for i in range(20) for d in DOCS])  # 200 distinct documents
    model = tiny_realm(tokenizer)
    refresher = IndexRefresher(docs, DocumentIndex.build(model, docs, 0, 16, 8), max_len=16, batch_size=8)
    q = torch.randn(4, 32)
    before = refresher.index.search(q, 5)[1]
    _perturb(model, 3)
    after = DocumentIndex.build(model, docs, 1, 16, 8).search(q, 5)[1]
    assert not torch.equal(before, after)
    seen, stop = [], threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            seen.append(refresher.index.search(q, 5)[1])

    t = threading.Thread(target=searcher)
    t.start()
    refresher.start(model, step=1)
    while refresher.poll(step=2) is None:
        seen.append(refresher.index.search(q, 5)[1])
    stop.set()
    t.join()
    assert len(seen) > 1
    assert all(torch.equal(s, before) or torch.equal(s, after) for s in seen)  # never a half-swapped index
    assert torch.equal(refresher.index.search(q, 5)[1], after)


# ---------------------------------------------------------------------------------------------------- pre-training
def test_pretrain_lowers_the_loss_and_logs_refreshes(tokenizer, tmp_path):
    docs = TextDocuments(DOCS)
    examples = [(d, -1) for d in DOCS[:8]]
    model = tiny_realm(tokenizer)
    cfg = small_cfg(steps=30, refresh_every=5)

    def held_out_loss() -> float:
        index = DocumentIndex.build(model, docs, 0, 16)
        with torch.no_grad():
            out = pretrain_step(model, index, docs, [t for t, _ in examples], [-1] * 8, cfg, random.Random(1))
        return out.loss.item()

    before = held_out_loss()
    initial = DocumentIndex.build(model, docs, 0, 16)
    log = pretrain(docs, tmp_path / "run", cfg, model=model, examples=examples, resume=False)
    after = held_out_loss()
    assert after < 0.5 * before
    assert len(log["steps"]) == 30
    assert log["refreshes"], "no refresh was swapped in"
    for r in log["refreshes"]:
        assert r["snapshot_step"] % 5 == 0 and r["lag"] == r["swap_step"] - r["snapshot_step"] >= 1
        # steps after a swap train on the refreshed index
        assert log["steps"][r["swap_step"]]["index_step"] == r["snapshot_step"]
    assert log["steps"][0]["index_step"] == 0
    assert (tmp_path / "run" / "final" / "model.json").is_file()
    # the document encoder trained (p(z|x) reads the candidates re-embedded by it), so a refresh changes the index
    assert not torch.allclose(DocumentIndex.build(model, docs, 0, 16).embeddings, initial.embeddings)
    assert (tmp_path / "run" / "pretrain.json").is_file()


def test_pretrain_step_scores_candidates_with_the_current_document_encoder(tokenizer, monkeypatch):
    """The stale index only picks the candidates (REALM): p(z|x) is computed from them re-embedded by the current
    document encoder, so the loss's gradient reaches it; with an index of the same weights the embeddings agree."""
    docs = TextDocuments(DOCS)
    model = tiny_realm(tokenizer, embed_dim=8)
    index = DocumentIndex.build(model, docs, 0, 16)
    seen = {}
    score = model.retrieval_log_probs

    def spy(query, doc_embeddings, with_null=True):
        seen["docs"] = doc_embeddings
        return score(query, doc_embeddings, with_null)

    monkeypatch.setattr(model, "retrieval_log_probs", spy)
    out = pretrain_step(model, index, docs, DOCS[:3], [0, 1, 2], small_cfg(k=4, exclude_source=True),
                        random.Random(0))
    assert seen["docs"].requires_grad
    torch.testing.assert_close(seen["docs"].detach(), index.embeddings[out.retrieved], rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert sum(p.grad.abs().sum().item() for p in model.doc_encoder.parameters() if p.grad is not None) > 0
    assert model.doc_proj.weight.grad.abs().sum() > 0


def test_pretrain_step_excludes_the_source_document(tokenizer):
    docs = TextDocuments(DOCS)
    model = tiny_realm(tokenizer)
    index = DocumentIndex.build(model, docs, 0, 16)
    cfg = small_cfg(k=10, exclude_source=True)
    out = pretrain_step(model, index, docs, DOCS[:3], [0, 1, 2], cfg, random.Random(0))
    assert out.log_p_z.shape == (3, 10) and out.retrieved.shape == (3, 9)
    assert [b in out.retrieved[b].tolist() for b in range(3)] == [False] * 3
    kept = pretrain_step(model, index, docs, DOCS[:3], [0, 1, 2], small_cfg(k=10), random.Random(0))
    assert [b in kept.retrieved[b].tolist() for b in range(3)] == [True] * 3


def test_pretrain_resumes_where_it_stopped(tokenizer, tmp_path):
    docs = TextDocuments(DOCS)
    examples = [(d, -1) for d in DOCS[:8]]
    cfg = small_cfg(steps=4, batch_size=3, save_every=2)
    whole = pretrain(docs, tmp_path / "a", small_cfg(steps=4, batch_size=3), model=tiny_realm(tokenizer),
                     examples=examples)
    pretrain(docs, tmp_path / "b", small_cfg(steps=2, batch_size=3), model=tiny_realm(tokenizer), examples=examples)
    resumed = pretrain(docs, tmp_path / "b", cfg, model=tiny_realm(tokenizer, seed=5), examples=examples)
    assert len(resumed["steps"]) == 4
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in whole["steps"]], rel=1e-6)
    # the index it was reading comes back with it: refresh_every=0 is never rebuilt (it was, from the resumed
    # weights, at every resume)
    assert [s["index_step"] for s in resumed["steps"]] == [0, 0, 0, 0]
    # over other sentences the saved order would pick other ones, then stop with an IndexError
    with pytest.raises(RetrolmError, match=r"step-000004: written over 8 pre-training sentences, resumed over 5 "
                                           r"others .*start afresh \(--no-resume\)"):
        pretrain(docs, tmp_path / "b", small_cfg(steps=6, batch_size=3, save_every=2), model=tiny_realm(tokenizer),
                 examples=examples[:5])
    # a fresh start puts the earlier run aside: a later resume does not go on from its checkpoints
    pretrain(docs, tmp_path / "b", small_cfg(steps=1, batch_size=3), model=tiny_realm(tokenizer), examples=examples,
             resume=False)
    def aside() -> dict[str, int]:
        return collections.Counter(p.name.split(".before-")[0] for p in (tmp_path / "b").iterdir()
                                   if ".before-" in p.name)

    # (the 2-step run's final/ went aside when the resumed run trained on, the 4-step run's now)
    assert aside() == {"checkpoints": 1, "final": 2, "pretrain": 1}
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000001"]
    assert json.loads((tmp_path / "b" / "pretrain.json").read_text())["steps"][-1]["step"] == 1
    # fresh starts within one second each keep the run before them (the second rename failed or overwrote)
    for _ in range(2):
        pretrain(docs, tmp_path / "b", small_cfg(steps=1, batch_size=3), model=tiny_realm(tokenizer),
                 examples=examples, resume=False)
    assert aside() == {"checkpoints": 3, "final": 4, "pretrain": 3}
    # training a finished run on sets its final model aside (its checkpoints rotate away), then writes the new one
    pretrain(docs, tmp_path / "b", small_cfg(steps=2, batch_size=3), model=tiny_realm(tokenizer), examples=examples)
    assert aside() == {"checkpoints": 3, "final": 5, "pretrain": 3}
    assert (tmp_path / "b" / "final" / "model.json").is_file()


def test_a_resume_at_a_refresh_step_refreshes_and_takes_this_runs_lr(tokenizer, tmp_path, monkeypatch, caplog):
    """A refresh starts at the step a checkpoint is saved, which holds the index before it: a resumed run had no
    refresh in flight and read the stale index for another refresh_every steps. And the optimizer state brought back
    the checkpoint's lr and weight decay whatever the resumed run's config said."""
    import retrolm.train.realm as realm_train

    docs, examples = TextDocuments(DOCS), [(d, -1) for d in DOCS[:8]]
    wait = IndexRefresher.poll
    monkeypatch.setattr(IndexRefresher, "poll", lambda self, step, wait_=False: wait(self, step, wait=True))
    cfg = small_cfg(steps=6, batch_size=3, refresh_every=2, save_every=2)
    whole = pretrain(docs, tmp_path / "a", cfg, model=tiny_realm(tokenizer), examples=examples)
    assert [s["index_step"] for s in whole["steps"]] == [0, 0, 0, 2, 2, 4]

    class Crash(Exception):
        pass

    save = realm_train._save

    def crash_after_step_2(*args, **kwargs):
        save(*args, **kwargs)
        if args[4] == 2:
            raise Crash

    monkeypatch.setattr(realm_train, "_save", crash_after_step_2)
    with pytest.raises(Crash):
        pretrain(docs, tmp_path / "b", cfg, model=tiny_realm(tokenizer), examples=examples)
    monkeypatch.setattr(realm_train, "_save", save)
    resumed = pretrain(docs, tmp_path / "b", cfg, model=tiny_realm(tokenizer), examples=examples)
    assert [s["index_step"] for s in resumed["steps"]] == [0, 0, 0, 2, 2, 4]  # was [0, 0, 0, 0, 0, 4]
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in whole["steps"]], rel=1e-6)

    with caplog.at_level("WARNING"):
        pretrain(docs, tmp_path / "b", small_cfg(steps=7, batch_size=3, save_every=7, lr=1e-4, weight_decay=0.0),
                 model=tiny_realm(tokenizer), examples=examples)
    assert "resumed with lr 0.0001 and weight_decay 0 (written with 0.003 and 0.01)" in caplog.text
    groups = torch.load(tmp_path / "b" / "checkpoints" / "step-000007" / "optimizer.pt")["param_groups"]
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(1e-4, 0.0)}


# --------------------------------------------------------------------------------------------------------- QA
def test_answer_spans_finds_every_occurrence():
    assert answer_spans([5, 6, 7, 5, 6], [[5, 6], [7]]) == [(0, 1), (3, 4), (2, 2)]
    assert answer_spans([5, 6], [[6, 7]]) == []


def test_qa_step_trains_query_encoder_and_reader_not_document_encoder(tokenizer):
    docs = TextDocuments(DOCS)
    model = tiny_realm(tokenizer, embed_dim=8)
    model.doc_encoder.requires_grad_(False)
    index = DocumentIndex.build(model, docs, 0, 16)
    out = qa_step(model, index, docs, ["where does alice live ?", "what is blue ?"], [["Paris"], ["nothing"]],
                  small_cfg(qa_k=10))
    assert out.answered == 1
    out.loss.backward()
    assert sum(p.grad.abs().sum().item() for p in model.query_encoder.parameters() if p.grad is not None) > 0
    assert model.span_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.doc_encoder.parameters())


def test_finetune_learns_qa_whose_answers_are_only_in_the_store(tokenizer, tmp_path):
    from retrolm.eval.qa import QAItem
    from retrolm.eval.realm import evaluate_realm

    docs = TextDocuments(DOCS)
    items = [QAItem(str(i), f"where does {p} live ?", [c]) for i, (p, c) in enumerate(zip(PEOPLE, CITIES, strict=True))]
    model = tiny_realm(tokenizer)
    cfg = small_cfg(steps=60, qa_k=10)
    frozen = {k: v.clone() for k, v in model.doc_encoder.state_dict().items()}
    before = evaluate_realm(model, docs, items, cfg)
    finetune(model, docs, [it.question for it in items], [it.answers for it in items], tmp_path / "ft", cfg)
    after = evaluate_realm(model, docs, items, cfg, tmp_path / "eval")
    with pytest.raises(RetrolmError, match="a model checkpoint; realm eval would write its files into it"):
        evaluate_realm(model, docs, items, cfg, tmp_path / "ft" / "final")  # its config.yaml over the model's
    top1 = sum(r["retrieved"][0] == int(r["id"]) for r in after["predictions"])
    assert before["em"] <= 25.0
    assert after["em"] >= 75.0 and top1 >= 6
    assert after["recall_at_k"] == 100.0 and after["n"] == 8
    for k, v in model.doc_encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # without retrieval (only the null, empty document) the reader has nothing to point at
    answers, _ = predict(model, DocumentIndex(torch.zeros(1, 32), 0), TextDocuments([""]),
                         [it.question for it in items], cfg)
    assert sum(a.lower() in {c.lower() for c in CITIES} for a in answers) == 0
    assert (tmp_path / "eval" / "realm.json").is_file()


def test_rows_longer_than_the_encoders_positions_and_no_questions_are_refused(tokenizer, tmp_path):
    """max_query_len + max_doc_len + 3 past the encoder's 256 positions was an index error inside BERT at the first
    long document; a question file with only multiple-choice items was an empty torch.cat / IndexError."""
    model = tiny_realm(tokenizer)
    docs = TextDocuments(DOCS)
    too_long = small_cfg(max_query_len=16, max_doc_len=240)  # 259 > 256
    with pytest.raises(RetrolmError, match=r"^max_query_len \+ max_doc_len \+ 3 = 259 word pieces per reader row, "
                                           r"more than the 256 positions of tiny"):
        finetune(model, docs, ["Where does Alice live ?"], [["Paris"]], tmp_path / "ft", too_long)
    with pytest.raises(RetrolmError, match="259 word pieces"):
        pretrain(docs, tmp_path / "pt", too_long, model=model)
    index = DocumentIndex.build(model, docs, 0, 16)
    with pytest.raises(RetrolmError, match="259 word pieces"):
        predict(model, index, docs, ["Where does Alice live ?"], too_long)
    with pytest.raises(RetrolmError, match="no open-ended questions"):
        finetune(model, docs, [], [], tmp_path / "ft", small_cfg())
    with pytest.raises(RetrolmError, match="no open-ended questions"):
        predict(model, index, docs, [], small_cfg())
    exactly = small_cfg(max_doc_len=237, steps=1)  # 256: allowed
    finetune(model, docs, ["Where does Alice live ?"], [["Paris"]], tmp_path / "ok", exactly)


def test_a_kill_between_the_final_models_renames_brings_the_old_one_back(tokenizer, tmp_path):
    """final/ is swapped in (the old one renamed aside, the new one in, the old one removed): a kill between the two
    renames leaves no final/, and the next run puts the old one back before anything else."""
    from retrolm.train.realm import _recover_final, _write_final

    model = tiny_realm(tokenizer)
    _write_final(model, small_cfg(), tmp_path)
    assert (tmp_path / "final" / "model.json").is_file() and not (tmp_path / "final.partial").exists()
    (tmp_path / "final").rename(tmp_path / "final.old")  # the kill
    _recover_final(tmp_path)
    assert (tmp_path / "final" / "model.json").is_file() and not (tmp_path / "final.old").exists()
    _write_final(model, small_cfg(), tmp_path)  # replacing it leaves nothing aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
