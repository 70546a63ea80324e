"""Evaluation: the leakage metric on hand-made chunks, near-duplicate detection, and an end-to-end run on a
constructed corpus where only retrieval can know what comes next."""

from __future__ import annotations

import json
import math
from importlib import metadata

import numpy as np
import pytest
import yaml

from conftest import run_cli, write_jsonl
from retrolm.core.errors import RetrolmError
from retrolm.db import BuildConfig, Database
from retrolm.eval import EvalConfig, ScaleConfig, run_eval, scale_db_size, scale_neighbours
from retrolm.eval.evaluator import RETRO, RETRO_OFF, Evaluator, neighbours_of_other_documents
from retrolm.eval.leakage import (
    bits_per_byte,
    leakage_curve,
    longest_common_run,
    novel_chunks,
    overlap_by_rank,
    overlap_ratio,
)
from retrolm.text.dedup import find_near_duplicates, jaccard, ngram_set
from retrolm.train import ModelSpec, TrainConfig, Trainer

# --- the leakage metric -------------------------------------------------------------------------------------------


def lcs(chunk: list[int], *neighbours: list[int], masks: list[list[bool]] | None = None) -> int:
    R = max(len(n) for n in neighbours)
    nb = np.full((1, len(neighbours), R), -7)
    mask = np.zeros((1, len(neighbours), R), dtype=bool)
    for i, n in enumerate(neighbours):
        nb[0, i, : len(n)] = n
        mask[0, i, : len(n)] = True if masks is None else masks[i]
    return int(longest_common_run(np.array([chunk]), np.array([len(chunk)]), nb, mask)[0])


def test_longest_common_run_on_hand_made_chunks():
    c = list(range(10, 26))  # 16 tokens
    assert lcs(c, c) == 16  # identical → r = 1
    assert overlap_ratio(np.array([16]), np.array([16]))[0] == 1.0
    np.testing.assert_array_equal(overlap_ratio(np.array([1, 3, 0]), np.array([1, 4, 0])), [1.0, 0.75, 0.0])
    # novel: r(C) under 8/64 of the chunk's own length; a 5-token last chunk found whole is not novel, one sharing
    # nothing is; full chunks sharing 7 and 8 tokens fall either side
    lcs_, lengths = np.array([7, 8, 5, 0]), np.array([64, 64, 5, 5])
    np.testing.assert_array_equal(novel_chunks(overlap_ratio(lcs_, lengths), 8, 64), [True, False, False, True])
    assert lcs(c, list(range(100, 132))) == 0  # disjoint → 0
    assert lcs(c, [1, 2, 13, 14, 15, 3, 20, 21, 22, 23, 24, 9]) == 5  # the longest of two shared runs
    assert lcs(c, [12, 99, 14]) == 1  # shared tokens that are not contiguous count one at a time
    # a run never spans two neighbours, nor a masked (padding) position inside one neighbour
    assert lcs(c, [10, 11, 12], [13, 14, 15, 16]) == 4
    assert lcs(c, [10, 11, 12, 13, 14], masks=[[True, True, False, True, True]]) == 2
    # chunk padding (beyond the chunk's length) never matches
    chunk = np.array([[5, 6, 7, 0, 0, 0]])
    nb = np.array([[[0, 0, 0, 0, 0, 0]]])
    assert longest_common_run(chunk, np.array([3]), nb, np.ones_like(nb, dtype=bool))[0] == 0
    # vectorised over many chunks with a block size that does not divide them
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, 5, (37, 8))
    nbs = rng.integers(0, 5, (37, 3, 16))
    got = longest_common_run(chunks, np.full(37, 8), nbs, np.ones_like(nbs, dtype=bool), block=10)
    want = [max(_brute_lcs(list(chunks[i]), list(n)) for n in nbs[i]) for i in range(37)]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64  # token counts


def _brute_lcs(a: list[int], b: list[int]) -> int:
    return max((k for i in range(len(a)) for j in range(len(b)) for k in range(1, len(a) - i + 1)
                if j + k <= len(b) and a[i : i + k] == b[j : j + k]), default=0)


def test_leakage_curve_filters_chunks_by_overlap():
    overlap = np.array([0.0, 0.1, 0.5, 1.0])
    n_bytes = np.array([10.0, 10.0, 10.0, 10.0])
    nats = {"a": np.array([1.0, 2.0, 3.0, 4.0]) * math.log(2)}
    curve = leakage_curve(overlap, n_bytes, nats, alphas=(0.0, 0.125, 0.5, 1.0))
    assert curve.alphas == [0.0, 0.125, 0.5, 1.0]
    assert curve.fraction == [0.25, 0.5, 0.75, 1.0]
    assert curve.bpb["a"] == pytest.approx([0.1, 0.15, 0.2, 0.25])
    assert math.isnan(bits_per_byte(nats["a"], n_bytes, overlap > 2))
    empty = leakage_curve(np.zeros(0), np.zeros(0), {"a": np.zeros(0)}, alphas=(0.0, 1.0))  # no chunks at all
    assert empty.fraction == [0.0, 0.0] and all(math.isnan(b) for b in empty.bpb["a"])


def test_overlap_by_rank_on_a_hand_made_matrix():
    nan = float("nan")
    o = np.array([[1.0, 0.6, 0.0], [0.2, 0.7, 0.9], [0.1, 0.1, 0.1], [nan, 0.0, 0.0]])  # last row: no next chunk
    ranks = overlap_by_rank(o)
    assert [r["rank"] for r in ranks] == [1, 2, 3]
    assert [r["mean_overlap"] for r in ranks] == pytest.approx([1.3 / 3, 1.4 / 3, 1.0 / 3])
    assert [r["holds"] for r in ranks] == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # row 0's best is rank 1 (1.0 > 0.6), row 1's rank 3, row 2 holds nowhere
    assert [r["best"] for r in ranks] == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert [r["holds_within"] for r in ranks] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert overlap_by_rank(np.full((2, 3), nan)) == []


def test_near_duplicates_by_13gram_jaccard():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5000, 300) for _ in range(20)]
    edited = docs[3].copy()
    edited[150] = 4999  # one token changed: 13 of ~288 n-grams differ, Jaccard ≈ 0.91
    queries = [edited, rng.integers(0, 5000, 300), docs[7][:200]]  # a near-copy, a stranger, a 2/3 excerpt
    found = find_near_duplicates(queries, docs, threshold=0.8)
    assert [(f.query, f.reference) for f in found] == [(0, 3)]
    assert found[0].jaccard == pytest.approx(jaccard(ngram_set(edited), ngram_set(docs[3])))
    assert 0.85 < found[0].jaccard < 0.95
    assert [(f.query, f.reference) for f in find_near_duplicates(queries, docs, threshold=0.6)] == [(0, 3), (2, 7)]
    # pairs just above the threshold are all found (LSH tuned at the threshold itself missed ~40% of these)
    refs = [rng.integers(0, 50000, 1000) for _ in range(100)]
    near = [np.concatenate([r[:915], rng.integers(0, 50000, 85)]) for r in refs]  # Jaccard ≈ 0.84
    found = find_near_duplicates(near, refs, threshold=0.8)
    assert sorted((f.query, f.reference) for f in found) == [(i, i) for i in range(100)]
    assert all(0.8 <= f.jaccard < 0.9 for f in found)


def test_near_duplicates_by_containment_find_excerpts_that_jaccard_misses():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 5000, 2000) for _ in range(30)]
    edited_excerpt = docs[5][:300].copy()
    edited_excerpt[100] = 4999  # 13 of 288 n-grams changed: containment ≈ 0.955
    queries = [docs[9][:300], edited_excerpt, rng.integers(0, 5000, 300), docs[2][:100]]
    assert find_near_duplicates(queries, docs, threshold=0.8) == []  # Jaccard of an excerpt with its whole: ~0.14
    found = find_near_duplicates(queries, docs, threshold=0.8, measure="containment")
    assert [(f.query, f.reference) for f in found] == [(0, 9), (1, 5), (3, 2)]
    assert found[0].jaccard == 1.0
    assert found[1].jaccard == pytest.approx(275 / 288)
    # a query spread over two documents, half in each, is contained in neither
    halves = np.concatenate([docs[0][:150], docs[1][:150]])
    assert find_near_duplicates([halves], docs, threshold=0.6, measure="containment") == []
    assert len(find_near_duplicates([halves], docs, threshold=0.45, measure="containment")) == 2
    # documents of 7-12 tokens: contained where their whole token run appears (they were hashed as one gram of their
    # own length, so only an identical short document matched); generators are read once
    short = [docs[7][500:510], docs[7][500:510].copy(), rng.integers(0, 5000, 12), docs[3][:1]]
    short[1][4] = 4999
    refs = [*docs, short[2], docs[3][:1]]
    found = find_near_duplicates((q for q in short), (d for d in refs), measure="containment")
    # a one-token document is no copy of every document holding its token: only of an identical one
    assert [(f.query, f.reference, f.jaccard) for f in found] == [(0, 7, 1.0), (2, 30, 1.0), (3, 31, 1.0)]
    # a share exactly at the threshold passes: 0.55 × 100 n-grams is 55.000000000000007 in floating point
    at = np.concatenate([docs[4][:67], rng.integers(5001, 9000, 45)])  # 100 13-grams, 55 of them in docs[4]
    assert [f.reference for f in find_near_duplicates([at], docs, threshold=0.55, measure="containment")] == [4]


# --- end to end on a corpus where only retrieval can help ---------------------------------------------------------

WORDS = [f"{a}{b}{c}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("b", "d", "g", "z")
         for c in ("ar", "el", "is", "on", "ux")]  # 160 pseudo-words


def random_doc(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words)) + "."


@pytest.fixture(scope="module")
def copy_world(tmp_path_factory, tiny_encoder):
    """Database documents come in identical pairs (X, X-copy), so RETRO learns to copy what it retrieves; after
    training, a copy of every held-out document is added to the database under another id (a knowledge update, no
    retraining). Text is random words: only the retrieved copy's continuation predicts a held-out document."""
    root = tmp_path_factory.mktemp("copy-world")
    rng = np.random.default_rng(0)
    train, held, copies = [], [], []
    for i in range(48):
        text = random_doc(rng, 60)
        train += [{"id": f"doc{i}", "text": text}, {"id": f"doc{i}-copy", "text": text}]
    for i in range(8):
        text = random_doc(rng, 60)
        held.append({"id": f"held{i}", "text": text, "bucket": "even" if i % 2 == 0 else "odd"})
        copies.append({"id": f"held{i}-copy", "text": text})
    noise = [{"id": f"noise{i}", "text": random_doc(rng, 60)} for i in range(16)]
    db = Database.build([write_jsonl(root / "train.jsonl", train)], root / "db",
                        BuildConfig(encoder=tiny_encoder, tokenizer="train:600", chunk_len=16, batch_size=64),
                        show_progress=False)
    cfg = TrainConfig(db=str(db.path), out_dir=str(root / "retro"), steps=250, batch_size=8, lr=3e-3, min_lr=3e-4,
                      warmup_steps=20, eval_every=250, save_every=250, log_every=50, val_fraction=0.05,
                      tensorboard=False, num_neighbours=2,
                      model=ModelSpec(preset="tiny", seq_len=64, n_layer=2, d_model=64, n_head=4, enc_n_layer=1))
    t = Trainer(cfg)
    t.setup(show_progress=False)
    t.train()
    t.cleanup()
    base = TrainConfig(**{**cfg.__dict__, "out_dir": str(root / "base"), "steps": 50, "eval_every": 50,
                          "save_every": 50, "model": ModelSpec(preset="tiny", seq_len=64, n_layer=2, d_model=64,
                                                               n_head=4, retro_layers=[])})
    t = Trainer(base)
    t.setup(show_progress=False)
    t.train()
    t.cleanup()
    db.add([write_jsonl(root / "copies.jsonl", copies)], show_progress=False)
    return {"root": root, "db": db, "held": write_jsonl(root / "held.jsonl", held),
            "noise": write_jsonl(root / "noise.jsonl", noise)}


def eval_cfg(world, out: str, **kw) -> EvalConfig:
    base = dict(checkpoint=str(world["root"] / "retro"), db=str(world["db"].path), data=[str(world["held"])],
                baselines=[str(world["root"] / "base")], out_dir=str(world["root"] / out))
    return EvalConfig(**{**base, **kw})


def test_retrieval_lowers_bits_per_byte_and_leakage_shows_why(copy_world):
    r = run_eval(eval_cfg(copy_world, "eval", near_dup_threshold=0), show_progress=False)
    on, off = r["summary"][RETRO]["bpb"], r["summary"][RETRO_OFF]["bpb"]
    base = r["summary"]["baseline:base"]["bpb"]
    print(f"bits/byte: retrieval on {on:.3f}, off {off:.3f}, baseline {base:.3f}")
    assert r["software"]["bm25s"] == metadata.version("bm25s")  # the libraries the result was measured with
    assert on < 0.6 * off, (on, off)  # the copy is in the database: retrieval must help a lot
    assert r["exclusion"]["excluded_docs_same_id"] == 0 and r["exclusion"]["eval_docs"] == 8
    # every held-out chunk's text is in the database verbatim: r(C) = 1, nothing is novel
    assert r["leakage"]["fraction"][-1] == 1.0 and r["leakage"]["fraction"][0] == 0.0
    assert r["novel"]["fraction"] == 0.0
    assert r["gain"]["all"] > 0.4 and r["gain"]["vs baseline:base"] > 0.2
    out = copy_world["root"] / "eval"
    for name in ("config.yaml", "eval.json", "report.md", "leakage.png", "per_chunk.npz"):
        assert (out / name).is_file(), name
    per_chunk = np.load(out / "per_chunk.npz")
    assert (per_chunk["overlap"] == 1.0).all()
    # every loss is booked to the chunk whose token it predicts: a document's first token is never predicted,
    # and its last chunk also holds the EOS prediction
    doc = per_chunk["doc"]
    first = np.r_[True, doc[1:] != doc[:-1]]
    last = np.r_[doc[1:] != doc[:-1], True]
    np.testing.assert_array_equal(per_chunk["tokens"], per_chunk["lengths"] - first + last)
    assert per_chunk[f"nats:{RETRO}"].sum() < per_chunk[f"nats:{RETRO_OFF}"].sum()
    assert "## Leakage" in (out / "report.md").read_text()


def test_a_rerun_with_another_config_clears_the_older_results(tmp_path):
    """Results stay next to the config that produced them: a rerun with other settings removes the older results
    first (a rerun that fails midway leaves none of them), one with the same settings keeps them."""
    from retrolm.eval.run import RESULT_FILES, out_dir

    cfg = EvalConfig(checkpoint="run", db="db", data=["held.jsonl"], out_dir=str(tmp_path / "ev"))
    out = out_dir(cfg, RESULT_FILES)
    for name in (*RESULT_FILES, "notes.txt"):
        (out / name).write_text("old")
    out_dir(cfg, RESULT_FILES)
    assert all((out / name).is_file() for name in RESULT_FILES)
    out_dir(EvalConfig(checkpoint="run", db="db", data=["held.jsonl"], out_dir=str(out), neighbours=4), RESULT_FILES)
    assert not any((out / name).exists() for name in RESULT_FILES) and (out / "notes.txt").is_file()
    assert "neighbours: 4" in (out / "config.yaml").read_text()
    # eval and scale share the default folder: a scale run under another config removes eval's results, and the
    # other way round (a strict scale-*.json stayed next to a config saying "previous version allowed")
    from retrolm.eval.run import SCALE_FILES

    def write_all():
        for name in (*RESULT_FILES, *SCALE_FILES):
            (out / name).write_text("old")

    def left():
        return {name for name in (*RESULT_FILES, *SCALE_FILES) if (out / name).exists()}

    common = dict(checkpoint="run", db="db", data=["held.jsonl"], out_dir=str(out))
    by_k = tuple(n for n in SCALE_FILES if "neighbours" in n)
    by_size = tuple(n for n in SCALE_FILES if "db-size" in n)
    out_dir(ScaleConfig(**common, ks=[1, 2]), by_k)
    write_all()
    out_dir(ScaleConfig(**common, ks=[1, 2]), by_k)
    assert left() == set(RESULT_FILES) | set(SCALE_FILES)
    # the same evaluation settings: eval's results stay next to a scale run's config and the other way round, and a
    # scale axis removes only its own results when its own settings change
    out_dir(EvalConfig(**common, device="cpu", batch_size=8), RESULT_FILES)  # where it runs changes no result
    assert left() == set(RESULT_FILES) | set(SCALE_FILES)
    out_dir(ScaleConfig(**common, fractions=[0.5, 1.0]), by_size)
    assert left() == set(RESULT_FILES) | set(by_k)
    # a config.yaml of an older version, without a field added since (it had its default then)
    write_all()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in saved.items() if k != "context_chunks"}))
    out_dir(ScaleConfig(**common, fractions=[0.5, 1.0]), by_size)
    assert left() == set(RESULT_FILES) | set(SCALE_FILES)
    # other evaluation settings: every result goes (a strict scale-*.json stayed next to the other protocol's config)
    out_dir(ScaleConfig(**common, near_dup_threshold=0), by_k)
    assert left() == set()


def test_results_of_older_inputs_go_even_under_the_same_config(tmp_path):
    """`checkpoint: RUN` names the run's newest checkpoint: once the run trained on, eval.json came from the new one
    and scale-neighbours.json stayed from the old one, next to a config claiming both. The same goes for an edited
    database and rewritten held-out files."""
    from retrolm.eval.run import RESULT_FILES, SCALE_FILES, out_dir

    run = tmp_path / "run🎉"  # (JSON escapes it as a surrogate pair, which YAML read back as two lone halves)
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "model.json").write_text("{}")
    db, held = tmp_path / "db", tmp_path / "held.jsonl"
    db.mkdir()
    (db / "meta.json").write_text('{"build_id": "b", "version": 1}')
    held.write_text('{"id": "a", "text": "x"}\n')
    cfg = EvalConfig(checkpoint=str(run), db=str(db), data=[str(held)], out_dir=str(tmp_path / "ev"))

    def rerun_after(change) -> bool:  # whether the results written before the change are gone after it
        out = out_dir(cfg, RESULT_FILES)
        for name in (*RESULT_FILES, *SCALE_FILES):
            (out / name).write_text("old")
        change()
        out_dir(cfg, RESULT_FILES)
        return not any((out / name).exists() for name in (*RESULT_FILES, *SCALE_FILES))

    assert not rerun_after(lambda: None)
    assert rerun_after(lambda: (run / "checkpoints" / "step-000002").mkdir() or
                       (run / "checkpoints" / "step-000002" / "model.json").write_text("{}"))
    assert rerun_after(lambda: (db / "meta.json").write_text('{"build_id": "b", "version": 2}'))
    assert rerun_after(lambda: held.write_text('{"id": "a", "text": "y"}\n'))
    assert not rerun_after(lambda: None)
    # held-out data given as a folder: a file rewritten inside it (the folder's path alone was recorded)
    folder = tmp_path / "held"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"id": "a", "text": "x"}\n')
    cfg = EvalConfig(checkpoint=str(run), db=str(db), data=[str(folder)], out_dir=str(tmp_path / "ev-folder"))
    assert not rerun_after(lambda: None)
    assert rerun_after(lambda: (folder / "a.jsonl").write_text('{"id": "a", "text": "changed"}\n'))


def test_near_duplicate_exclusion_removes_the_copies(copy_world):
    r = run_eval(eval_cfg(copy_world, "eval-dedup", baselines=[]), show_progress=False)
    assert r["exclusion"]["excluded_docs_near_duplicate"] == 8  # each held-out document's copy
    on, off = r["summary"][RETRO]["bpb"], r["summary"][RETRO_OFF]["bpb"]
    assert on > 0.8 * off  # with the copies gone there is nothing useful left to retrieve
    assert r["novel"]["fraction"] > 0.9


def test_neighbours_of_other_documents_never_come_from_the_chunks_own_document():
    doc = np.array([2, 2, 0, 0, 0, 1, 2, 1])  # not sorted: blocks of a document need not be contiguous
    nb = np.arange(len(doc))[:, None] * 10 + np.arange(3)  # row i = [10i, 10i + 1, 10i + 2]
    seen = set()
    for seed in range(200):
        got = neighbours_of_other_documents(nb, doc, seed)
        src = got[:, 0] // 10
        np.testing.assert_array_equal(got, nb[src])  # whole rows move, in order
        assert (doc[src] != doc).all()
        seen.update(zip(range(len(doc)), src.tolist(), strict=True))
    # uniform over the other documents' chunks: every allowed (chunk, source) pair occurs
    assert seen == {(i, j) for i in range(len(doc)) for j in range(len(doc)) if doc[i] != doc[j]}
    with pytest.raises(RetrolmError, match="at least two documents"):
        neighbours_of_other_documents(nb[:2], doc[:2])


def test_shuffled_neighbours_control_removes_the_gain_of_copying(copy_world):
    cfg = eval_cfg(copy_world, "eval-shuffled", baselines=[], near_dup_threshold=0, shuffle_neighbours=True)
    r = run_eval(cfg, show_progress=False)
    assert r["neighbours_read"].startswith("shuffled")
    # the copy-reading model gains > 40% from its own copies (test above); another document's neighbours predict
    # nothing: the gain is gone (trusting them even costs a little)
    assert r["gain"]["all"] < 0.02, r["gain"]
    assert r["novel"]["fraction"] == 0.0  # the leakage analysis still sees each chunk's own neighbours
    assert "control: each chunk reads another document's neighbours" in (copy_world["root"] / "eval-shuffled"
                                                                        / "report.md").read_text()
    # a control of what a model's retrieval layers do: refused where nothing reads RETRO-style neighbours
    for no_reader in ({"retrieval": False}, {"checkpoint": str(copy_world["root"] / "base"), "in_context": True}):
        with pytest.raises(RetrolmError, match="shuffle_neighbours is a control for models with RETRO layers"):
            run_eval(eval_cfg(copy_world, "eval-shuffled-refused", baselines=[], shuffle_neighbours=True,
                              **no_reader), show_progress=False)


def test_next_chunk_overlap_reads_what_follows_the_query_chunk(copy_world):
    ev = Evaluator(eval_cfg(copy_world, "unused", baselines=[], near_dup_threshold=0), show_progress=False)
    try:
        store, n = ev.db.store, ev.source.n_chunks
        toks = store.tokens(np.arange(store.n_chunks))
        copy_of = np.array([np.flatnonzero((toks == ev.source.tokens(np.array([i]))[0]).all(axis=1))[-1]
                            for i in range(n)])  # the database copy of every held-out chunk
        nxt = ev.source.continuation_ids(np.arange(n))
        prev = np.r_[-1, np.arange(n - 1)]
        prev[np.r_[True, ev.source.chunk_doc(np.arange(1, n)) != ev.source.chunk_doc(np.arange(n - 1))]] = -1
        # rank 1: the copy of the chunk that follows (holds it); rank 2: the copy of the one before (holds the query
        # chunk itself, not what follows it)
        nb = np.stack([np.where(nxt >= 0, copy_of[np.maximum(nxt, 0)], -1),
                       np.where(prev >= 0, copy_of[np.maximum(prev, 0)], -1)], axis=1)
        o = ev.next_chunk_overlap(nb)
    finally:
        ev.close()
    last = nxt < 0
    assert last.sum() == 8 and np.isnan(o[last]).all()  # a document's last chunk has nothing to predict
    assert (o[~last, 0] == 1.0).all()
    has_prev = ~last & (prev >= 0)
    assert o[has_prev, 1].mean() < 0.3


def test_scaling_commands(copy_world):
    cfg = eval_cfg(copy_world, "scale", near_dup_threshold=0)
    cfg = ScaleConfig(**{**vars(cfg), "ks": [1, 2, 4], "fractions": [0.25, 1.0], "noise": [str(copy_world["noise"])]})
    by_k = scale_neighbours(ScaleConfig(**{**vars(cfg), "group_by": "bucket"}), show_progress=False)
    assert [row["k"] for row in by_k["rows"]] == [1, 2, 4]
    # the top neighbour is the held-out document's copy: its continuation holds the next chunk; the others are
    # unrelated random words
    first, second, _ = by_k["ranks"][:3]
    assert first["holds"] > 0.8 and first["best"] == first["holds"] and second["holds"] < 0.2
    assert [r["rank"] for r in by_k["ranks"]] == [1, 2, 3, 4]
    # per-group bits/byte at k = 2 (the trained k, what `retrolm eval` scores), from its per-chunk arrays by hand:
    # held-out document i is held{i}, in the "even" bucket when i is even
    run_eval(eval_cfg(copy_world, "scale-eval", baselines=[], near_dup_threshold=0), show_progress=False)
    pc = np.load(copy_world["root"] / "scale-eval" / "per_chunk.npz")
    expected = {g: {key: bits_per_byte(pc[f"nats:{key}"], pc["bytes"], pc["doc"] % 2 == rem)
                    for key in (RETRO, RETRO_OFF)} for g, rem in (("even", 0), ("odd", 1))}
    at2 = by_k["rows"][1]["groups"]
    assert set(at2) == {"even", "odd"} and at2["even"] != at2["odd"]
    for g in at2:
        assert at2[g] == pytest.approx(expected[g][RETRO])
        assert by_k["reference_groups"][RETRO_OFF][g] == pytest.approx(expected[g][RETRO_OFF])
    assert "What each neighbour rank holds" in (copy_world["root"] / "scale" / "scale-neighbours.md").read_text()
    by_size = scale_db_size(ScaleConfig(**{**vars(cfg), "group_by": "bucket"}), show_progress=False)
    small, full, noisy = by_size["rows"]
    for g in ("even", "odd"):  # the full database reads the neighbours `retrolm eval` read
        assert full["groups"][g] == pytest.approx(expected[g][RETRO])
        assert set(small["groups"]) == set(noisy["groups"]) == {"even", "odd"}
    assert small["db_chunks"] < full["db_chunks"] < noisy["db_chunks"] and noisy["noise"]
    assert full["bpb"] < small["bpb"]  # more of the copies are retrievable
    assert abs(noisy["bpb"] - full["bpb"]) < 0.1 * full["bpb"]  # unrelated data changes little
    for name in ("scale-neighbours", "scale-db-size"):
        assert (copy_world["root"] / "scale" / f"{name}.png").is_file()
        assert json.loads((copy_world["root"] / "scale" / f"{name}.json").read_text())["rows"]


def test_what_an_eval_reports_does_not_depend_on_settings_it_should_not(copy_world, tmp_path):
    """group_by was dropped without retrieval or for a baseline; the hybrid retriever's score moved with
    leakage_neighbours (RETRO read the first k of a deeper fused ranking); deleted documents counted as excluded;
    report.md truncated the byte count; scale with retrieval=false reported the scores without retrieval as its axis."""
    import shutil

    off = run_eval(eval_cfg(copy_world, "groups-off", retrieval=False, group_by="bucket", near_dup_threshold=0),
                   show_progress=False)
    assert set(off["groups"]) == {"even", "odd"} and "gain" not in off["groups"]["even"]
    assert off["groups"]["even"]["summary"][RETRO_OFF]["chunks"] == off["groups"]["even"]["chunks"]
    report = (copy_world["root"] / "groups-off" / "report.md").read_text()
    assert "## Per bucket" in report
    total = off["summary"][RETRO_OFF]["bytes"]
    assert f"| {round(total):,} |" in report  # per-chunk shares summed: 2857.9999... was shown as 2,857
    bpb = [run_eval(eval_cfg(copy_world, f"hybrid-{n}", retriever="hybrid", leakage_neighbours=n, baselines=[],
                             near_dup_threshold=0), show_progress=False)["summary"][RETRO]["bpb"] for n in (2, 10)]
    assert bpb[0] == bpb[1]
    with pytest.raises(RetrolmError, match="retrieval=false leaves nothing to scale"):
        scale_neighbours(ScaleConfig(**{**vars(eval_cfg(copy_world, "scale-off")), "retrieval": False, "ks": [1]}),
                         show_progress=False)
    db = Database.open(shutil.copytree(copy_world["db"].path, tmp_path / "db"))
    again = write_jsonl(tmp_path / "again.jsonl", [json.loads(copy_world["held"].read_text().splitlines()[0])])
    db.add([again], show_progress=False)
    db.add([again], replace=True, show_progress=False)  # the first copy is deleted, the second live
    r = run_eval(eval_cfg(copy_world, "deleted", db=str(db.path), baselines=[], near_dup_threshold=0),
                 show_progress=False)
    live = int(db.store.doc_n_chunks[np.flatnonzero(~db.deleted_docs)[-1]])
    assert r["exclusion"]["excluded_docs_same_id"] == 1 and r["exclusion"]["excluded_chunks"] == live


def test_a_group_by_the_data_lacks_fails_before_any_scoring(copy_world, monkeypatch):
    """It failed after every model was scored (hours at scale), writing nothing."""
    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the groups were checked")

    monkeypatch.setattr(Evaluator, "score", no_scoring)
    monkeypatch.setattr(Evaluator, "reference_scores", no_scoring)
    with pytest.raises(RetrolmError, match="has no field 'topic' \\(group_by\\)"):
        run_eval(eval_cfg(copy_world, "no-topic", group_by="topic"), show_progress=False)


def test_eval_cli_and_errors(copy_world, built_db, capsys, tmp_path):
    root = copy_world["root"]
    common = ["--checkpoint", root / "retro", "--db", copy_world["db"].path, "--data", copy_world["held"]]
    rc, out, err = run_cli(["eval", *common, "--out", tmp_path / "e", "--json", "-q", "near_dup_threshold=0"], capsys)
    assert rc == 0, err
    assert json.loads(out)["summary"][RETRO]["bpb"] > 0
    rc, out, err = run_cli(["eval", *common, "--out", tmp_path / "e", "--no-retrieval", "-q"], capsys)
    assert rc == 0 and RETRO_OFF in out and "novel" not in out
    rc, _, err = run_cli(["eval", "--checkpoint", tmp_path / "nope", "--db", copy_world["db"].path, "--data",
                          copy_world["held"]], capsys)
    assert rc == 2 and "no such checkpoint" in err and "Traceback" not in err
    rc, _, err = run_cli(["eval", "--checkpoint", root / "retro", "--db", built_db.path, "--data",
                          copy_world["held"]], capsys)  # a database with another tokenizer
    assert rc == 2 and "another tokenizer" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["scale", "neighbours", *common, "--ks", "1,x"], capsys)
    assert rc == 2 and "--ks" in err
    # a baseline as the main checkpoint: scored without retrieval, no leakage section
    r = run_eval(EvalConfig(checkpoint=str(root / "base"), db=str(copy_world["db"].path),
                            data=[str(copy_world["held"])], out_dir=str(tmp_path / "b")), show_progress=False)
    assert list(r["summary"]) == ["baseline:base"] and "leakage" not in r and r["k"] == 0
    with pytest.raises(RetrolmError, match="baseline checkpoint does not retrieve"):
        scale_neighbours(ScaleConfig(checkpoint=str(root / "base"), db=str(copy_world["db"].path),
                                     data=[str(copy_world["held"])], out_dir=str(tmp_path / "x"), ks=[1]))


def test_context_chunks_reach_the_scored_sequences(copy_world, capsys, tmp_path):
    run_eval(eval_cfg(copy_world, "eval-c0", near_dup_threshold=0, baselines=[]), show_progress=False)
    run_eval(eval_cfg(copy_world, "eval-c1", near_dup_threshold=0, baselines=[], context_chunks=1),
             show_progress=False)
    a, b = (np.load(copy_world["root"] / out / "per_chunk.npz") for out in ("eval-c0", "eval-c1"))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])  # the same targets, each scored once
    # 64-token sequences of 16-token chunks: the first sequence (chunks 0-3) is the same either way; after it each
    # sequence starts one chunk earlier, so a document's first chunk (every 4th: these documents are 4 chunks long)
    # now has the previous document before it and reads that document's neighbours (this copy world's model was
    # trained on documents aligned with its sequences: it reads them worse, a real corpus is not aligned)
    for key in (f"nats:{RETRO}", f"nats:{RETRO_OFF}"):
        np.testing.assert_allclose(a[key][:4], b[key][:4], rtol=1e-6)
        assert not np.allclose(a[key][4::4], b[key][4::4], rtol=1e-3)
    assert yaml.safe_load((copy_world["root"] / "eval-c1" / "config.yaml").read_text())["context_chunks"] == 1
    rc, _, err = run_cli(["eval", "--checkpoint", copy_world["root"] / "retro", "--db", copy_world["db"].path,
                          "--data", copy_world["held"], "--out", tmp_path / "e", "context_chunks=4"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: context_chunks 4: must be below the 4 chunks")
