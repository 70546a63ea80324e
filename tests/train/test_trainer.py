"""The training recipe: it learns, checkpoints are complete folders, and resume is exact."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import REPO, wiki_docs, write_jsonl
from retrolm.core.config import load_config
from retrolm.core.errors import RetrolmError
from retrolm.db import Database, DatabaseView
from retrolm.models.loading import load_model
from retrolm.text.tokenizer import load_tokenizer
from retrolm.train import ModelSpec, TrainConfig, Trainer


def tiny_cfg(db, out, **kw) -> TrainConfig:
    base = dict(db=str(db.path), out_dir=str(out), model=ModelSpec(preset="tiny", seq_len=256), steps=6,
                batch_size=2, eval_every=3, save_every=3, eval_batches=2, log_every=1, warmup_steps=2,
                tensorboard=False, val_fraction=0.2)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig) -> dict:
    t = Trainer(cfg)
    t.setup(show_progress=False)
    metrics = t.train()
    t.cleanup()
    return metrics


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resuming_with_another_number_of_sequences_per_step_is_refused(built_db, tmp_path):
    """The data position is step × sequences per step: resumed with another batch size (or grad_accum, or number of
    processes) a run would re-read or skip sequences, so it stops with one line instead; a step that would read more
    sequences than the training split holds is refused before anything trains."""
    run(tiny_cfg(built_db, tmp_path / "r", steps=3))
    with pytest.raises(RetrolmError, match=r"step-000003: written at 2 sequences per step .*resumed at 4"):
        Trainer(tiny_cfg(built_db, tmp_path / "r", batch_size=4)).setup(show_progress=False)
    t = Trainer(tiny_cfg(built_db, tmp_path / "r", steps=4))  # the same settings resume
    t.setup(show_progress=False)
    assert t.step == 3
    t.cleanup()
    with pytest.raises(RetrolmError, match=r"training sequences of 256 tokens, fewer than one step reads \(4096\)"):
        Trainer(tiny_cfg(built_db, tmp_path / "big", batch_size=4096)).setup(show_progress=False)
    assert not (tmp_path / "big").exists()  # refused before the neighbour search (hours on a large store)


@pytest.mark.parametrize("change", [{"seed": 1}, {"val_fraction": 0.3}, {"data_offset": 2}])
def test_resuming_with_another_data_order_is_refused(built_db, tmp_path, change):
    """Seed, validation share and data offset decide which sequences each step reads and which are held out: a run
    resumed with another one would re-read sequences or train on validation ones, so it stops with one line."""
    run(tiny_cfg(built_db, tmp_path / "r", steps=3))
    (key, value), = change.items()
    with pytest.raises(RetrolmError, match=rf"step-000003: resumed with another data order \({key} .* → {value}\)"):
        Trainer(tiny_cfg(built_db, tmp_path / "r", **change)).setup(show_progress=False)


def test_a_resume_under_other_neighbours_is_refused_and_other_optimiser_settings_apply(built_db, tmp_path, caplog):
    """The optimizer state brought back the checkpoint's weight decay and betas while config.yaml recorded the new
    ones; other neighbour settings (exclude=none: the text to predict) were read from the resumed step on without a
    word; and a refused resume had already dropped the interrupted run's metrics rows after its checkpoint."""
    run(tiny_cfg(built_db, tmp_path / "r", steps=3))
    metrics = tmp_path / "r" / "metrics.jsonl"
    with open(metrics, "a") as f:  # rows of steps the interrupted run logged after its last checkpoint
        f.write(json.dumps({"step": 4, "train/loss": 1.0}) + "\n" + json.dumps({"step": 5, "train/loss": 1.0}) + "\n")
    rows = metrics.read_text()
    for change, shown in (({"neighbour_exclude": "none"}, "neighbour_exclude document → none"),
                          ({"retriever": "bm25"}, "retriever dense → bm25")):
        with pytest.raises(RetrolmError, match=rf"step-000003: resumed with other training neighbours \({shown}\)"):
            Trainer(tiny_cfg(built_db, tmp_path / "r", **change)).setup(show_progress=False)
        assert metrics.read_text() == rows
    with pytest.raises(RetrolmError, match=r"written at 2 sequences per step"):
        Trainer(tiny_cfg(built_db, tmp_path / "r", batch_size=4)).setup(show_progress=False)
    assert metrics.read_text() == rows
    t = Trainer(tiny_cfg(built_db, tmp_path / "r", steps=6, weight_decay=0.0, beta2=0.99))
    with caplog.at_level(logging.WARNING):
        t.setup(show_progress=False)
    assert "resumed with other optimiser settings (steps 3 → 6, weight_decay 0.1 → 0.0, beta2 0.95 → 0.99): they " \
           "apply from step 3 on" in caplog.text
    assert [(g["weight_decay"], g["betas"]) for g in t.opt.param_groups] == [(0.0, (0.9, 0.99)), (0.0, (0.9, 0.99))]
    assert [r["step"] for r in metric_rows(tmp_path / "r") if "train/loss" in r and r["step"] > 3] == []
    t.cleanup()


def test_a_checkpoint_of_an_earlier_release_resumes_under_the_configs_optimiser_settings(built_db, tmp_path,
                                                                                         monkeypatch):
    """trainer.pt of an earlier release records no optimiser settings: the optimizer state's weight decay and betas
    stayed while config.yaml said otherwise."""
    save = torch.save

    def as_before(obj, *args, **kwargs):  # trainer.pt as an earlier release wrote it
        if isinstance(obj, dict) and "optimiser" in obj:
            obj = {k: v for k, v in obj.items() if k not in ("optimiser", "reading")}
        return save(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "save", as_before)
    run(tiny_cfg(built_db, tmp_path / "r", steps=3))
    monkeypatch.setattr(torch, "save", save)
    t = Trainer(tiny_cfg(built_db, tmp_path / "r", steps=6, weight_decay=0.0, beta2=0.99))
    t.setup(show_progress=False)
    assert t.step == 3
    assert [(g["weight_decay"], g["betas"]) for g in t.opt.param_groups] == [(0.0, (0.9, 0.99)), (0.0, (0.9, 0.99))]
    t.cleanup()


def test_resuming_with_another_model_or_database_is_refused(built_db, tmp_path):
    """Same-shaped tensors load into a model with other heads, and a database with another tokenizer feeds other
    token ids: a resumed run went on training either way, and its next checkpoint recorded the new setting."""
    run(tiny_cfg(built_db, tmp_path / "r", steps=3))
    with pytest.raises(RetrolmError, match=r"step-000003: resumed with another model "
                                           r"\(enc_n_head 4 → 2, n_head 4 → 2\)"):
        Trainer(tiny_cfg(built_db, tmp_path / "r", model=ModelSpec(preset="tiny", seq_len=256, n_head=2))).setup(
            show_progress=False)
    other = Path(shutil.copytree(built_db.path, tmp_path / "other-db"))
    tok = json.loads((other / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]  # the same vocabulary, merged in another order
    (other / "tokenizer.json").write_text(json.dumps(tok))  # another tokenizer (another SHA-256)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": {
        **meta["tokenizer"], "sha256": load_tokenizer(str(other / "tokenizer.json")).sha256}}))
    with pytest.raises(RetrolmError, match=r"step-000003: trained with another tokenizer or chunk length than "
                                           r".*other-db has \(another database, or rebuilt since\); resume with"):
        Trainer(tiny_cfg(DatabaseView.open(other), tmp_path / "r")).setup(show_progress=False)
    shutil.copy(built_db.path / "tokenizer.json", other / "tokenizer.json")
    meta["encoder"].update(name="/models/another-encoder", fingerprint="0" * 64)
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RetrolmError, match=r"trained with neighbours from encoder .*--no-resume"):
        Trainer(tiny_cfg(DatabaseView.open(other), tmp_path / "r")).setup(show_progress=False)
    t = Trainer(tiny_cfg(built_db, tmp_path / "r", model=ModelSpec(preset="tiny", seq_len=256, dropout=0.1)))
    t.setup(show_progress=False)  # regularisation may change
    assert t.step == 3
    t.cleanup()


def test_a_step_is_the_mean_over_its_tokens_however_it_is_split(built_db, tmp_path):
    """Sequences hold different numbers of scored tokens (nothing is predicted in the padding after a document's
    end). Two micro-batches of one sequence must give the gradient of one batch of both: the mean over all the
    step's tokens, not the mean of two per-sequence means."""
    whole = Trainer(tiny_cfg(built_db, tmp_path / "whole", batch_size=2, grad_accum=1, steps=2))
    whole.setup(show_progress=False)
    split = Trainer(tiny_cfg(built_db, tmp_path / "split", batch_size=1, grad_accum=2, steps=2))
    split.setup(show_progress=False)
    counts = [int((split.seqs.batch(split._batch_ids(0, micro)).targets != -100).sum()) for micro in (0, 1)]
    assert counts[0] != counts[1]  # the case that matters: otherwise both means agree anyway
    grads = {}

    def record(trainer, name):
        step = trainer.opt.step

        def wrapped(*args, **kwargs):
            if name not in grads:
                grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            return step(*args, **kwargs)

        trainer.opt.step = wrapped

    record(whole, "whole")
    record(split, "split")
    a, b = whole.train(), split.train()
    whole.cleanup()
    split.cleanup()
    loss_a = [r["train/loss"] for r in metric_rows(tmp_path / "whole") if "train/loss" in r]
    loss_b = [r["train/loss"] for r in metric_rows(tmp_path / "split") if "train/loss" in r]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert grads["whole"].keys() == grads["split"].keys()
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["split"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_resume_is_exact(built_db, tmp_path, monkeypatch):
    """A run interrupted right after its step-3 checkpoint and resumed gives, bit for bit, the batches, per-step
    losses, validation metrics and weights of an uninterrupted run. Dropout is on, so the losses depend on the
    restored RNG state, not only on the weights; the learning rate is not in warm-up at step 3, so the schedule must
    resume too (warmup_steps=1)."""
    model = ModelSpec(preset="tiny", seq_len=256, dropout=0.2)
    straight = run(tiny_cfg(built_db, tmp_path / "a", model=model, warmup_steps=1))

    class Interrupted(Exception):
        pass

    save = Trainer.save_checkpoint

    def save_then_stop(self):
        out = save(self)
        if self.step == 3:
            raise Interrupted
        return out

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run(tiny_cfg(built_db, tmp_path / "b", model=model, warmup_steps=1))
    monkeypatch.undo()
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then killed mid-row
        f.write(json.dumps({"step": 4, "train/loss": 9.9}) + "\n" + '{"step": 5, "train/lo')

    fresh = Trainer(tiny_cfg(built_db, tmp_path / "fresh", model=model, warmup_steps=1))  # (setup seeds the RNG)
    fresh.setup(resume=False, show_progress=False)
    # every RNG is back in the state it was saved in (so no later draw can differ)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-000003" / "trainer.pt", weights_only=False)
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    t = Trainer(tiny_cfg(built_db, tmp_path / "b", model=model, warmup_steps=1))
    t.setup(show_progress=False)
    assert t.step == 3
    assert torch.equal(torch.get_rng_state(), state["torch_rng"])
    np_state = np.random.get_state()
    assert np_state[0] == state["numpy_rng"][0] and np.array_equal(np_state[1], state["numpy_rng"][1])
    assert np_state[2:] == state["numpy_rng"][2:]
    assert random.getstate() == state["python_rng"]
    # the next batches are those of the uninterrupted run
    for step in range(3, 6):
        got, want = t.seqs.batch(t._batch_ids(step, 0)), fresh.seqs.batch(fresh._batch_ids(step, 0))
        assert torch.equal(got.idx, want.idx) and torch.equal(got.targets, want.targets), step
        assert torch.equal(got.neighbours, want.neighbours), step
    resumed = t.train()
    t.cleanup()

    # per-step training losses (log_every=1) and validation metrics, bit for bit: resumed steps 4-6 included
    rows_a, rows_b = metric_rows(tmp_path / "a"), metric_rows(tmp_path / "b")
    keys = ("train/loss", "val/loss", "val/bpb", "val_no_retrieval/loss", "val_no_retrieval/bpb")
    trace_a = [(r["step"], k, r[k]) for r in rows_a for k in keys if k in r]
    trace_b = [(r["step"], k, r[k]) for r in rows_b for k in keys if k in r]
    assert [s for s, k, _ in trace_a if k == "train/loss"] == [1, 2, 3, 4, 5, 6]
    assert trace_a == trace_b
    assert straight["train/loss"] == resumed["train/loss"]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000006" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = tmp_path / "a" / "checkpoints" / "step-000006"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.yaml", "model.json", "optimizer.pt",
                                                "trainer.pt", "tokenizer.json", "database.json", "checksums.json"}
    assert {"val/bpb", "val_no_retrieval/bpb"} <= set().union(*rows_a)


def test_data_offset_reads_on_where_the_continued_run_stopped(built_db, tmp_path):
    """A run continued with init_from and data_offset = the first run's sequences reads the batches that the first run
    would have read next (batches are a function of seed and step, so without the offset it replays them), across the
    epoch boundary too."""
    plain = Trainer(tiny_cfg(built_db, tmp_path / "plain"))
    plain.setup(resume=False, show_progress=False)
    per_epoch = len(plain.train_ids)
    first = 3  # steps × batch_size of the run being continued
    on = Trainer(tiny_cfg(built_db, tmp_path / "on", data_offset=first * 2))
    on.setup(resume=False, show_progress=False)
    assert np.array_equal(on.val_ids, plain.val_ids)  # the validation split does not move
    far = per_epoch // 2 + 1  # enough steps to cross into the next epoch's order
    for step in range(far):
        assert np.array_equal(on._batch_ids(step, 0), plain._batch_ids(step + first, 0)), step
    assert not np.array_equal(on._batch_ids(0, 0), plain._batch_ids(0, 0))
    for t in (plain, on):
        t.cleanup()
    with pytest.raises(RetrolmError, match="data_offset"):
        tiny_cfg(built_db, tmp_path / "x", data_offset=-1)


def test_neighbour_swap_changes_what_training_reads_and_resumes_exactly(built_db, tmp_path):
    """With neighbour_swap the chunks of a training batch read other sequences' neighbours (the first step's loss
    differs from the plain run's, same weights and batch), drawn from (seed, step): a resumed run swaps the same
    chunks as an uninterrupted one. Bad settings are refused."""
    def losses(name: str) -> list[float]:
        return [r["train/loss"] for r in metric_rows(tmp_path / name) if "train/loss" in r]

    run(tiny_cfg(built_db, tmp_path / "plain", steps=2))
    run(tiny_cfg(built_db, tmp_path / "swap", steps=4, neighbour_swap=1.0))
    assert losses("swap")[0] != losses("plain")[0]
    run(tiny_cfg(built_db, tmp_path / "resumed", steps=2, neighbour_swap=1.0, save_every=2))
    run(tiny_cfg(built_db, tmp_path / "resumed", steps=4, neighbour_swap=1.0, save_every=2))
    assert losses("resumed") == losses("swap") and len(losses("swap")) == 4
    for bad, match in (({"neighbour_swap": 1.5}, "neighbour_swap"), ({"neighbour_swap": 0.5, "batch_size": 1},
                                                                       "batch_size")):
        with pytest.raises(RetrolmError, match=match):
            tiny_cfg(built_db, tmp_path / "x", **bad)


def test_checkpoint_loads_back_and_baseline_has_no_retrieval(built_db, tmp_path):
    run(tiny_cfg(built_db, tmp_path / "base", steps=2, model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[])))
    loaded = load_model(tmp_path / "base")
    model, folder = loaded.model, loaded.folder
    assert model.config.retro_layers == () and model.encoder is None and folder.name == "step-000002"
    assert not model.training
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["retro_layers"] == []
    assert load_tokenizer(str(tmp_path / "base")).sha256 == built_db.tokenizer.sha256  # saved inside the checkpoint
    assert not (tmp_path / "base" / "neighbours").exists()  # the baseline needs no retrieval at all


def test_training_lowers_loss(built_db, tmp_path):
    cfg = tiny_cfg(built_db, tmp_path / "l", steps=30, eval_every=30, save_every=30, lr=3e-3, val_fraction=0.1)
    t = Trainer(cfg)
    t.setup(show_progress=False)
    before = t.evaluate()["val/loss"]
    after = t.train()["val/loss"]
    assert after < before - 0.5, (before, after)  # measured: 6.93 → 6.08 in 30 steps


def test_config_from_yaml_with_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("db: some/db\nsteps: 10\nmodel:\n  preset: tiny\n  retro_layers: [4]\n")
    cfg = load_config(TrainConfig, y, ["lr=0.01", "model.d_model=32"])
    assert cfg.steps == 10 and cfg.lr == 0.01 and cfg.model.retro_layers == [4] and cfg.model.d_model == 32
    with pytest.raises(RetrolmError, match="steps"):
        load_config(TrainConfig, y, ["steps=abc"])
    with pytest.raises(RetrolmError, match="nonexistent"):
        load_config(TrainConfig, y, ["nonexistent=1"])


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith(
    "retrofit")), ids=lambda p: p.name)
def test_shipped_train_configs_build_models(path):
    cfg = load_config(TrainConfig, path)
    model = cfg.model.build(vocab_size=32000, chunk_len=64, num_neighbours=cfg.num_neighbours)
    assert model.seq_len % 64 == 0
    if "baseline" in path.name:
        assert model.retro_layers == ()
    else:
        assert model.retro_layers


def test_activation_checkpointing_is_a_model_override(tmp_path):
    """model.checkpoint_activations=encoder reaches the model config (the memory target's switch); a bad mode is one
    clear error."""
    cfg = load_config(TrainConfig, None, ["model.checkpoint_activations=encoder"])
    assert cfg.model.build(vocab_size=512, chunk_len=64, num_neighbours=2).checkpoint_activations == "encoder"
    assert TrainConfig().model.build(vocab_size=512, chunk_len=64, num_neighbours=2).checkpoint_activations == "none"
    bad = load_config(TrainConfig, None, ["model.checkpoint_activations=decoder"])
    with pytest.raises(RetrolmError, match="checkpoint_activations"):
        bad.model.build(vocab_size=512, chunk_len=64, num_neighbours=2)


@pytest.mark.slow
def test_torchrun_ddp_on_two_cpu_processes(built_db, tmp_path):
    """The multi-GPU path (torchrun + DDP) run on CPU with the gloo backend: both ranks train, rank 0 writes, and
    two processes of 2 sequences train as one process of 4 (the same sequences; every token weighs the same)."""
    out = tmp_path / "ddp"
    args = ["-m", "retrolm.cli", "train", "-q", f"db={built_db.path}", "model.seq_len=256", "steps=3",
            "eval_every=3", "save_every=3", "eval_batches=1", "log_every=1", "warmup_steps=1", "tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args, f"out_dir={out}",
           "batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, *args, f"out_dir={tmp_path / 'one'}", "batch_size=4"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    losses = [[r["train/loss"] for r in metric_rows(d) if "train/loss" in r] for d in (out, tmp_path / "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert (out / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3]  # written once, by rank 0
    assert proc.stdout.count("train/loss") == 1  # one summary line
    train_rows = [x for x in lines if "train/loss" in x]
    assert "train/tokens_per_s" in train_rows[0] and math.isfinite(lines[-1]["val/loss"])
    assert sum("setup/neighbour_seconds" in x for x in lines) == 1  # the neighbour search, by rank 0 alone


def test_neighbours_follow_a_rebuilt_database_and_tombstones_are_refused(tmp_path, tiny_db_config):
    db = Database.build([write_jsonl(tmp_path / "a.jsonl", wiki_docs(20))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    run(tiny_cfg(db, tmp_path / "run", steps=1))
    # the same folder rebuilt from another corpus starts again at version 1: old neighbours must not be reused
    db = Database.build([write_jsonl(tmp_path / "b.jsonl", wiki_docs(24, start=50))], tmp_path / "db",
                        tiny_db_config, overwrite=True, show_progress=False)
    # resuming the run would read other token ids (refused); a new run sharing its neighbours folder searches again
    with pytest.raises(RetrolmError, match=r"step-000001: trained with another tokenizer or chunk length than .*db has "
                                           r"\(another database, or rebuilt since\)"):
        run(tiny_cfg(db, tmp_path / "run", steps=2))
    run(tiny_cfg(db, tmp_path / "run2", steps=2, neighbours_dir=str(tmp_path / "run" / "neighbours")))
    saved = json.loads((tmp_path / "run" / "neighbours" / "neighbours.json").read_text())
    assert saved["db_identity"]["build_id"] == db.meta["build_id"] and saved["n_chunks"] == db.store.n_chunks
    db.delete(doc_ids=[db.store.doc_ids[0]])
    t = Trainer(tiny_cfg(db, tmp_path / "run3"))
    with pytest.raises(RetrolmError, match="compact"):
        t.setup(show_progress=False)


def test_validation_bits_per_byte_is_nats_over_ln2_over_utf8_bytes(built_db, tiny_db_config, tmp_path):
    """The trainer's validation bits-per-byte, checked against a computation by hand (cross-entropy summed in nats,
    / ln 2, / the UTF-8 bytes of the predicted text) and against ``Evaluator`` (``retrolm eval``) on the same text.

    Every document is exactly one validation sequence (two chunks), so both count the same predictions and bytes."""
    from retrolm.eval import EvalConfig
    from retrolm.eval.evaluator import Evaluator

    tok, m = built_db.tokenizer, built_db.chunk_len
    docs = []
    for d in wiki_docs(60, start=200):  # cut to ~100 tokens: more than one chunk, at most two
        ids = tok.encode(d["text"])
        if len(ids) >= 100 and len(docs) < 40:
            docs.append({"id": d["id"], "text": tok.decode(ids[:100]).strip()})
    config = dataclasses.replace(tiny_db_config, tokenizer=str(built_db.path / "tokenizer.json"))
    db = Database.build([write_jsonl(tmp_path / "docs.jsonl", docs)], tmp_path / "db", config, show_progress=False)
    store = db.store
    assert (store.doc_n_chunks == 2).all()  # document d = chunks 2d, 2d+1 = sequence d
    cfg = tiny_cfg(db, tmp_path / "run", model=ModelSpec(preset="tiny", seq_len=2 * m), steps=1, eval_every=1,
                   save_every=1, batch_size=3, eval_batches=3, val_fraction=0.2)
    t = Trainer(cfg)
    t.setup(show_progress=False)
    t.train()
    t.cleanup()
    val = [int(s) for s in t.val_ids]
    assert len(val) == 8 and len(set(val)) == 8
    logged = metric_rows(tmp_path / "run")[-1]

    model = t.model.eval()
    nats = {True: 0.0, False: 0.0}
    n_bytes = 0
    for d in val:
        ids = store.doc_tokens(d).tolist()
        text = docs[d]["text"]
        assert tok.decode(ids) == text
        targets = torch.tensor([*ids[1:], tok.eos_id])  # every token after the first, then EOS
        item = t.seqs.sequence(d)
        for retrieval in (True, False):
            nb = torch.from_numpy(item["neighbours"])[None] if retrieval else None
            mask = torch.from_numpy(item["neighbour_mask"])[None] if retrieval else None
            idx = torch.tensor(ids + [tok.pad_id] * (2 * m - len(ids)))[None]
            with torch.no_grad():
                logits = model(idx, nb, mask).logits[0, : len(ids)]
            nats[retrieval] += float(F.cross_entropy(logits.double(), targets, reduction="sum"))
        n_bytes += len(text.encode()) - len(tok.decode(ids[:1]).encode())  # the first token is never predicted
    assert logged["val/bpb"] == pytest.approx(nats[True] / math.log(2) / n_bytes, rel=1e-5)
    assert logged["val_no_retrieval/bpb"] == pytest.approx(nats[False] / math.log(2) / n_bytes, rel=1e-5)

    # `retrolm eval` with retrieval off on held-out documents that are exactly the validation sequences' text
    held = write_jsonl(tmp_path / "held.jsonl", [{"id": f"held-{d}", "text": docs[d]["text"]} for d in val])
    ev = Evaluator(EvalConfig(checkpoint=str(tmp_path / "run"), db=str(db.path), data=[str(held)], retrieval=False,
                              near_dup_threshold=0), show_progress=False)
    try:
        summary = ev.summary(ev.score(ev.main))
    finally:
        ev.close()
    assert summary["bytes"] == n_bytes
    assert logged["val_no_retrieval/bpb"] == pytest.approx(summary["bpb"], rel=1e-5)


def test_retrofitting_a_baseline_starts_at_it_and_trains_only_the_new_tensors(built_db, tmp_path):
    """init_from + model.retro_layers: the RETRO-fitted model predicts exactly as the baseline before training (CCA
    output projections at zero), and with freeze_init every loaded tensor is bit for bit unchanged after training
    while the encoder and CCA moved."""
    base_dir = tmp_path / "base"
    run(tiny_cfg(built_db, base_dir, steps=2, model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[])))
    baseline = load_model(base_dir).model
    fit = tiny_cfg(built_db, tmp_path / "fit", steps=3, lr=1e-2, init_from=str(base_dir), freeze_init=True,
                   model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[2, 4]))
    t = Trainer(fit)
    t.setup(show_progress=False)
    V, m = t.model.config.vocab_size, t.model.config.chunk_len
    ids = torch.randint(0, V, (2, 4 * m))
    nb = torch.randint(0, V, (2, 4, 2, 2 * m))  # (batch, chunks, k, chunk + continuation)
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(t.model(ids, neighbours=nb).logits, baseline(ids).logits)
    t.model.train()
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("encoder.") or "cca" in n.split(".")[2] for n in trained), sorted(trained)[:5]
    t.train()
    t.cleanup()
    after = load_model(tmp_path / "fit").model
    before = baseline.state_dict()
    for name, tensor in after.state_dict().items():
        if name in before:
            assert torch.equal(tensor, before[name]), name
    assert after.blocks[1].cca.attn.proj.weight.abs().sum() > 0  # the new tensors trained

    unfrozen = tiny_cfg(built_db, tmp_path / "unfrozen", steps=1, init_from=str(base_dir),
                        model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[2]))
    t = Trainer(unfrozen)
    t.setup(show_progress=False)
    assert all(p.requires_grad for p in t.model.parameters())
    t.cleanup()

    # continued training of the RETRO-fitted model itself: its trained cross-attention is loaded, not reset to zero
    again = tiny_cfg(built_db, tmp_path / "again", steps=1, init_from=str(tmp_path / "fit"),
                     model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[2, 4]))
    t = Trainer(again)
    t.setup(show_progress=False)
    t.model.eval()
    after.eval()
    with torch.no_grad():
        assert torch.equal(t.model(ids, neighbours=nb).logits, after(ids, neighbours=nb).logits)
    t.cleanup()

    # the frozen fitting continued with freeze_init (e.g. under other settings): what it froze stays frozen, through
    # a chain of continuations, and the rest trains on from the fitted weights
    run(TrainConfig(**{**vars(again), "freeze_init": True, "steps": 2, "out_dir": str(tmp_path / "fit2")}))
    fit3 = TrainConfig(**{**vars(again), "freeze_init": True, "init_from": str(tmp_path / "fit2"),
                          "out_dir": str(tmp_path / "fit3")})
    t = Trainer(fit3)
    t.setup(show_progress=False)
    assert {n for n, p in t.model.named_parameters() if p.requires_grad} == trained
    t.cleanup()
    fit2 = load_model(tmp_path / "fit2").model.state_dict()
    for name, tensor in after.state_dict().items():
        assert torch.equal(tensor, fit2[name]) == (name in before), name  # base kept, the fitted tensors moved on
    # each checkpoint records what it kept frozen, so the chain holds without the checkpoint it started from
    records = sorted((tmp_path / "fit2").glob("checkpoints/*/frozen.json"))
    assert records and set(json.loads(records[-1].read_text())) == set(before)
    assert not list((tmp_path / "again").glob("checkpoints/*/frozen.json"))  # nothing frozen, no record
    shutil.rmtree(base_dir)
    t = Trainer(fit3)
    t.setup(show_progress=False)
    assert {n for n, p in t.model.named_parameters() if p.requires_grad} == trained
    t.cleanup()
    # the fitting itself resumes without the baseline it started from: its own checkpoints hold every tensor
    t = Trainer(TrainConfig(**{**vars(fit), "steps": 4}))
    t.setup(show_progress=False)
    assert t.step == 3 and {n for n, p in t.model.named_parameters() if p.requires_grad} == trained
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(t.model(ids, neighbours=nb).logits, after(ids, neighbours=nb).logits)
    t.cleanup()
    # a checkpoint written before the record existed is answered from its config, back to the first checkpoint
    for record in [*(tmp_path / "fit").glob("checkpoints/*/frozen.json"), *records]:
        record.unlink()
    with pytest.raises(RetrolmError, match=r"continues a frozen RETRO-fitting of .*no longer a checkpoint"):
        Trainer(fit3).setup(show_progress=False)
    records[-1].write_text('{"not": "a list"}')
    with pytest.raises(RetrolmError, match=r"frozen\.json: expected a list of tensor names"):
        Trainer(fit3).setup(show_progress=False)


def test_init_from_errors_are_one_line(built_db, tmp_path):
    with pytest.raises(RetrolmError, match="freeze_init needs init_from"):
        tiny_cfg(built_db, tmp_path / "x", freeze_init=True)
    with pytest.raises(RetrolmError, match=r"no model\.json"):
        Trainer(tiny_cfg(built_db, tmp_path / "x", init_from=str(tmp_path))).setup(show_progress=False)
    run(tiny_cfg(built_db, tmp_path / "base", steps=1, model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[])))
    same = tiny_cfg(built_db, tmp_path / "same", init_from=str(tmp_path / "base"), freeze_init=True,
                    model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[]))
    with pytest.raises(RetrolmError, match=r"nothing to train; add model\.retro_layers"):
        Trainer(same).setup(show_progress=False)
    # unfrozen, the same shape is continued training: it starts as the checkpoint and every tensor trains
    t = Trainer(TrainConfig(**{**vars(same), "freeze_init": False, "out_dir": str(tmp_path / "continued")}))
    t.setup(show_progress=False)
    base = load_model(tmp_path / "base").model
    ids = torch.randint(0, base.config.vocab_size, (2, 128))
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(t.model(ids).logits, base(ids).logits)
    assert all(p.requires_grad for p in t.model.parameters())
    t.cleanup()
    wider = tiny_cfg(built_db, tmp_path / "wider", init_from=str(tmp_path / "base"),
                     model=ModelSpec(preset="tiny", seq_len=256, d_model=128))
    with pytest.raises(RetrolmError, match=r"init_from holds another decoder \(d_model 64 → 128, d_ff 256 → 512\)"):
        Trainer(wider).setup(show_progress=False)
    # same-shaped tensors of another decoder (other heads, an extra block) loaded without a word
    for spec, change in [(dict(n_head=2), "n_head 4 → 2"), (dict(n_layer=5, retro_layers=[5]), "n_layer 4 → 5")]:
        other = tiny_cfg(built_db, tmp_path / "other", init_from=str(tmp_path / "base"), freeze_init=True,
                         model=ModelSpec(preset="tiny", seq_len=256, **spec))
        with pytest.raises(RetrolmError, match=rf"init_from holds another decoder \({change}\); give model"):
            Trainer(other).setup(show_progress=False)


def test_runs_share_one_neighbours_folder(built_db, tmp_path, monkeypatch, caplog):
    """neighbours_dir: the second run on the same database and settings reuses the first run's neighbours instead of
    searching again; other settings (k, exclusion rule) compute their own set next to it without replacing it, and a
    run that finds another searching the folder waits for it and reuses its set."""
    import retrolm.train.trainer as trainer_module

    calls = []
    real = trainer_module.compute_neighbours
    monkeypatch.setattr(trainer_module, "compute_neighbours", lambda *a, **k: calls.append(k) or real(*a, **k))
    shared = str(tmp_path / "shared")
    run(tiny_cfg(built_db, tmp_path / "a", steps=1, neighbours_dir=shared))
    # a set saved before a setting existed (here near_dup_threshold) was made with its default: still reused
    meta = tmp_path / "shared" / "neighbours.json"
    saved = json.loads(meta.read_text())
    del saved["config"]["near_dup_threshold"]
    meta.write_text(json.dumps(saved))
    run(tiny_cfg(built_db, tmp_path / "b", steps=1, neighbours_dir=shared))
    assert len(calls) == 1 and not (tmp_path / "b" / "neighbours").exists()
    # the near-duplicate threshold is read by the near-duplicate rule only: under another rule the set is reused
    run(tiny_cfg(built_db, tmp_path / "e", steps=1, neighbours_dir=shared, neighbour_near_dup=0.5))
    assert len(calls) == 1
    run(tiny_cfg(built_db, tmp_path / "c", steps=1, neighbours_dir=shared, num_neighbours=1))
    assert len(calls) == 2 and json.loads(meta.read_text())["config"]["k"] == 2  # the first set stays
    (k1,) = (tmp_path / "shared" / "by-settings").glob("*/neighbours.json")
    assert json.loads(k1.read_text())["config"]["k"] == 1
    run(tiny_cfg(built_db, tmp_path / "d", steps=1, neighbours_dir=shared, neighbour_exclude="near_duplicate",
                 neighbour_near_dup=0.9))
    assert len(calls) == 3
    sets = [json.loads(m.read_text())["config"] for m in (tmp_path / "shared").glob("**/neighbours.json")]
    assert sorted((c["k"], c["exclude"]) for c in sets) == [(1, "document"), (2, "document"), (2, "near_duplicate")]
    # back to the first settings and to k = 1: both sets are still there, nothing is searched again
    run(tiny_cfg(built_db, tmp_path / "f", steps=1, neighbours_dir=shared))
    run(tiny_cfg(built_db, tmp_path / "g", steps=1, neighbours_dir=shared, num_neighbours=1))
    assert len(calls) == 3
    # a set saved under the older exclusion rule (the next chunk's document not excluded) is searched again
    saved = json.loads(meta.read_text())
    del saved["exclusion_rule"]
    meta.write_text(json.dumps(saved))
    run(tiny_cfg(built_db, tmp_path / "r", steps=1, neighbours_dir=shared))
    assert len(calls) == 4 and json.loads(meta.read_text())["exclusion_rule"] == 2

    # another process searching the folder (its lock held here for a moment): the run waits, then reuses the set
    import threading

    from retrolm.core.io import exclusive_lock

    held, release = threading.Event(), threading.Event()

    def searching() -> None:
        with exclusive_lock(tmp_path / "shared", what="neighbour folder"):
            held.set()
            release.wait(10)

    other = threading.Thread(target=searching)
    other.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    with caplog.at_level("WARNING", logger="retrolm.core.io"):
        run(tiny_cfg(built_db, tmp_path / "h", steps=1, neighbours_dir=shared))
    other.join()
    assert "waiting for another retrolm process writing to this neighbour folder" in caplog.text
    assert len(calls) == 4
    for bad, match in (({"neighbour_exclude": "copies"}, "^neighbour_exclude must be one of none, document, "
                        "near_duplicate, sequence, got 'copies'$"),
                       ({"neighbour_near_dup": 0.0}, r"^neighbour_near_dup must be in \(0, 1\], got 0.0$")):
        with pytest.raises(RetrolmError, match=match):
            tiny_cfg(built_db, tmp_path / "x", **bad)


def test_neighbour_search_torch_matches_faiss_and_its_cost_is_logged(built_db, tmp_path):
    """neighbour_search=torch (exact matrix-multiply search, here on the CPU) finds the same training neighbours as the
    index's FAISS search; auto picks FAISS without CUDA; the search time lands in metrics.jsonl."""
    from retrolm.retrieval.neighbours import load_neighbours

    got = {}
    for search in ("auto", "torch"):
        run(tiny_cfg(built_db, tmp_path / search, steps=1, neighbour_search=search))
        saved = json.loads((tmp_path / search / "neighbours" / "neighbours.json").read_text())
        assert saved["config"]["search"] == ("faiss" if search == "auto" else "torch")
        got[search] = load_neighbours(tmp_path / search / "neighbours", built_db)
        setup = [r for r in metric_rows(tmp_path / search) if "setup/neighbour_seconds" in r]
        assert len(setup) == 1 and setup[0]["setup/neighbour_chunks"] == built_db.store.n_chunks
        assert setup[0]["setup/neighbour_seconds"] > 0
    a, b = got["auto"], got["torch"]
    assert a.shape == b.shape and (a >= 0).mean() > 0.9
    assert (a == b).mean() > 0.99  # near-tied keys may swap places
    with pytest.raises(RetrolmError, match="neighbour_search"):
        tiny_cfg(built_db, tmp_path / "x", neighbour_search="gpu")


def test_loop_settings_that_cannot_train_are_refused_with_the_config(built_db, tmp_path):
    """Each was a ZeroDivisionError after the first step, an optimizer traceback, or silently wrong training."""
    for override, message in [({"eval_every": 0}, "eval_every must be >= 1"), ({"log_every": 0}, "log_every"),
                              ({"save_every": -1}, "save_every"), ({"eval_batches": 0}, "eval_batches"),
                              ({"lr": -1.0}, "lr must be > 0"), ({"warmup_steps": -3}, "warmup_steps"),
                              ({"beta1": 1.5}, "beta1 and beta2 must be in"), ({"grad_clip": -1.0}, "grad_clip")]:
        with pytest.raises(RetrolmError, match=message):
            tiny_cfg(built_db, tmp_path / "x", **override)


def test_grad_clip_zero_clips_nothing_and_no_validation_split_reports_no_validation(built_db, tmp_path):
    """grad_clip=0 (nanoGPT's "no clipping") zeroed every gradient: the run trained nothing. val_fraction=0 logged a
    perfect validation loss of 0.0."""
    t = Trainer(tiny_cfg(built_db, tmp_path / "run", steps=2, grad_clip=0.0, val_fraction=0.0, eval_every=1))
    t.setup(show_progress=False)
    before = [p.detach().clone() for _, p in t.trainable_parameters()]
    metrics = t.train()
    moved = max(float((p.detach() - b).abs().max()) for (_, p), b in zip(t.trainable_parameters(), before,
                                                                          strict=True))
    t.cleanup()
    assert moved > 1e-4 and metrics["train/grad_norm"] > 1.0  # unclipped: the logged norm is the real one
    rows = metric_rows(tmp_path / "run")
    assert not any(k.startswith("val") for r in rows for k in r) and t.evaluate() == {}


def test_each_rank_draws_its_own_random_numbers_after_the_model_is_built(built_db, tmp_path, monkeypatch):
    """Under torchrun every rank seeded alike and drew the same dropout masks on its own batch; the model they build
    stays the same, and rank 0 goes on as a single process does."""
    draws, weights = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        t = Trainer(tiny_cfg(built_db, tmp_path / f"rank{rank}", steps=0))
        t.setup(show_progress=False)
        weights.append([p.detach().clone() for p in t.model.parameters()])
        draws.append(torch.rand(4))
        t.cleanup()
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert not torch.equal(draws[0], draws[1])
    monkeypatch.delenv("RANK")
    t = Trainer(tiny_cfg(built_db, tmp_path / "single", steps=0))
    t.setup(show_progress=False)
    assert torch.equal(torch.rand(4), draws[0])
    t.cleanup()


def test_a_continuation_under_another_split_is_warned_about(built_db, tmp_path, caplog):
    """init_from trained under another seed (or val_fraction, or sequence length): its training sequences may be this
    run's validation ones. Resuming refuses that; a continuation is told."""
    base_dir = tmp_path / "base"
    run(tiny_cfg(built_db, base_dir, steps=1, model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[])))
    for seed, warned in ((0, False), (1, True)):
        caplog.clear()
        t = Trainer(tiny_cfg(built_db, tmp_path / f"c{seed}", steps=1, seed=seed, init_from=str(base_dir),
                             model=ModelSpec(preset="tiny", seq_len=256, retro_layers=[])))
        with caplog.at_level(logging.WARNING, logger="retrolm.train.trainer"):
            t.setup(show_progress=False)
        t.cleanup()
        assert ("trained on a split made with other settings (seed 0 → 1)" in caplog.text) == warned, caplog.text


def test_two_runs_never_write_to_one_folder_at_once(built_db, tmp_path):
    """A second train into the same out_dir wrote every metrics row twice (the same settings) or saved over the
    other's checkpoints (another model); it is refused while the first holds the folder, which it gives up when
    its training ends or its setup fails."""
    first = Trainer(tiny_cfg(built_db, tmp_path / "r", steps=2))
    first.setup(show_progress=False)
    with pytest.raises(RetrolmError, match="another retrolm process is still writing to this training run"):
        Trainer(tiny_cfg(built_db, tmp_path / "r", steps=2)).setup(show_progress=False)
    first.train()
    second = Trainer(tiny_cfg(built_db, tmp_path / "r", steps=3))
    second.setup(show_progress=False)  # the first run's training ended: the folder can be resumed
    assert second.step == 2
    second.cleanup()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    # a training that fails gives the folder up too (a retry in the same process), and the neighbour folder may be
    # the run's own (its lock is another file: the same one waited for itself forever)
    crashing = Trainer(tiny_cfg(built_db, tmp_path / "n", steps=3, neighbours_dir=str(tmp_path / "n")))
    crashing.setup(show_progress=False)
    crashing._train = lambda: (_ for _ in ()).throw(RetrolmError("non-finite training loss"))
    with pytest.raises(RetrolmError, match="non-finite"):
        crashing.train()
    retry = Trainer(tiny_cfg(built_db, tmp_path / "n", steps=3, neighbours_dir=str(tmp_path / "n")))
    retry.setup(show_progress=False)
    retry.train()
    retry.cleanup()
