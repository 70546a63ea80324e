"""Checkpoints survive damage and bad runs: a damaged newest checkpoint is skipped (and kept) on resume, rotation never
pushes good checkpoints out for a damaged one, a failed write leaves the earlier ones intact, and a non-finite loss or
gradient stops the run before anything is saved (issue 9, "a clean bad-input record", items 5, 6 and 8)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from retrolm.core import io as core_io
from retrolm.core.errors import RetrolmError
from retrolm.core.hub import find_checkpoint
from retrolm.train import ModelSpec, TrainConfig, Trainer
from retrolm.train.checkpoints import CheckpointManager


# ------------------------------------------------------------------------------------------------ the manager alone
def write_state(value: int):
    def write(folder: Path) -> None:
        (folder / "state.txt").write_text(str(value))
        (folder / "weights.bin").write_bytes(bytes(range(256)) * 16)

    return write


def saved_steps(manager: CheckpointManager) -> list[int]:
    return [int(p.name.split("-")[1]) for p in manager.all()]


def test_resume_skips_a_damaged_checkpoint_and_keeps_it(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=3)
    for step in (1, 2, 3):
        manager.save(step, write_state(step))
    newest = manager.all()[-1] / "weights.bin"
    with open(newest, "r+b") as f:  # random bytes inside, same size
        f.seek(1000)
        f.write(np.random.default_rng(0).bytes(2000))
    loaded: list[str] = []
    with caplog.at_level(logging.WARNING, logger="retrolm.train.checkpoints"):
        got = manager.resume(lambda p: loaded.append((p / "state.txt").read_text()))
    assert got.name == "step-000002" and loaded == ["2"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{newest.parent}: damaged checkpoint skipped ({newest}: corrupt (checksum mismatch with "
        f"{newest.parent / 'checksums.json'}))"]
    assert saved_steps(manager) == [1, 2, 3]  # nothing deleted


def test_rotation_never_pushes_good_checkpoints_out_for_a_damaged_one(tmp_path):
    """keep=1, a damaged step-10 that resuming skipped, and a run that now saves at steps 4 and 8: the new checkpoints
    must survive (rotation by name deleted every one of them: the damaged folder sorted last)."""
    earlier = CheckpointManager(tmp_path / "checkpoints", keep=2)  # a longer earlier run
    earlier.save(3, write_state(3))
    earlier.save(10, write_state(10))
    (earlier.all()[-1] / "weights.bin").write_bytes(b"truncated")
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1)
    assert manager.resume(lambda p: None).name == "step-000003"
    manager.save(4, write_state(4))
    assert saved_steps(manager) == [4, 10]
    manager.save(8, write_state(8))
    assert saved_steps(manager) == [8, 10]
    assert manager.resume(lambda p: None).name == "step-000008"


def test_steps_past_999999_are_ordered_by_number(tmp_path):
    """``step-1000000`` sorts before ``step-999999`` as text: by name, resuming took the older checkpoint and rotation
    deleted the newer one."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)

    def write(folder: Path) -> None:
        (folder / "model.json").write_text("{}")

    for step in (999_998, 999_999, 1_000_000):
        manager.save(step, write)
    assert saved_steps(manager) == [999_999, 1_000_000]
    assert manager.resume(lambda p: None).name == "step-1000000"
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1000000"  # what eval/generate load


@pytest.mark.parametrize("failure", ["enospc", "torch"])
def test_a_failed_checkpoint_write_leaves_the_earlier_ones(tmp_path, failure):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1)
    manager.save(1, write_state(1))

    def write(folder: Path) -> None:
        (folder / "state.txt").write_text("2")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "optimizer.pt"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save's

    with pytest.raises(RetrolmError) as exc:
        manager.save(2, write)
    message = str(exc.value)
    assert "cannot write checkpoint" in message and "earlier checkpoints are intact" in message
    assert "\n" not in message
    assert ("No space left on device" in message) == (failure == "enospc")
    assert saved_steps(manager) == [1] and [p.name for p in manager.folder.iterdir()] == ["step-000001"]


# ------------------------------------------------------------------------------------------------ with the trainer
def tiny_cfg(db, out, **kw) -> TrainConfig:
    base = dict(db=str(db.path), out_dir=str(out), model=ModelSpec(preset="tiny", seq_len=128, retro_layers=[]),
                steps=4, batch_size=2, eval_every=100, save_every=2, eval_batches=1, log_every=1, warmup_steps=1,
                tensorboard=False, val_fraction=0.2, keep_checkpoints=3)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig) -> Trainer:
    t = Trainer(cfg)
    t.setup(show_progress=False)
    t.train()
    t.cleanup()
    return t


@pytest.fixture(scope="module")
def two_checkpoints(built_db, tmp_path_factory) -> Path:
    """A finished run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    run(tiny_cfg(built_db, out))
    return out


def test_checkpoint_files_get_the_umask_mode(two_checkpoints):
    files = [p for p in (two_checkpoints / "checkpoints").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.pt", "trainer.pt", "checksums.json"}
    assert {p.relative_to(two_checkpoints).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != core_io.FILE_MODE} == {}  # safetensors made model.safetensors 0600


@pytest.mark.parametrize("damage", ["random bytes in model.safetensors", "truncated trainer.pt",
                                    "truncated model.safetensors"])
def test_resume_falls_back_to_the_previous_checkpoint(built_db, two_checkpoints, tmp_path, damage, caplog):
    import shutil

    out = Path(shutil.copytree(two_checkpoints, tmp_path / "run"))
    newest = out / "checkpoints" / "step-000004"
    name = damage.rsplit(" ", 1)[1]
    data = (newest / name).read_bytes()
    if damage.startswith("random"):
        (newest / name).write_bytes(data[:1000] + np.random.default_rng(0).bytes(2000) + data[3000:])
    else:
        (newest / name).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="retrolm.train.checkpoints"):
        t = Trainer(tiny_cfg(built_db, out, steps=6))
        t.setup(show_progress=False)
    assert t.step == 2  # resumed from step-000002
    assert [r.getMessage() for r in caplog.records if r.name == "retrolm.train.checkpoints"] == [
        f"{newest}: damaged checkpoint skipped ({newest / name}: corrupt (checksum mismatch with "
        f"{newest / 'checksums.json'}))"]
    assert newest.is_dir() and (out / "checkpoints" / "step-000002").is_dir()  # neither deleted


def test_lr_1e30_stops_before_saving_and_keeps_the_last_good_checkpoint(built_db, two_checkpoints, tmp_path,
                                                                        capsys):
    """Resume at step 4 with lr=1e30: step 5 ruins the weights, step 6's gradients are not finite. The run must stop
    with one line before saving step 6 (NaN weights) and rotating the good step-000004 out (keep_checkpoints=1)."""
    import shutil

    out = Path(shutil.copytree(two_checkpoints, tmp_path / "run"))
    rc, _, err = run_cli(["train", f"db={built_db.path}", f"out_dir={out}", "model.preset=tiny", "model.seq_len=128",
                          "model.retro_layers=[]", "steps=8", "batch_size=2", "save_every=2", "eval_every=100",
                          "eval_batches=1", "warmup_steps=1", "tensorboard=false", "val_fraction=0.2",
                          "keep_checkpoints=1", "lr=1e30", "min_lr=1e30", "-q"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "non-finite training" in lines[0] and "at step 6; nothing was saved" in lines[0]
    assert "step-000004" in lines[0]  # named as the last good checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert all(torch.isfinite(t).all() for t in _weights(out / "checkpoints" / "step-000004").values())


def test_non_finite_loss_stops_before_saving(built_db, two_checkpoints, tmp_path):
    import shutil

    out = Path(shutil.copytree(two_checkpoints, tmp_path / "run"))
    t = Trainer(tiny_cfg(built_db, out, steps=8, save_every=1, keep_checkpoints=1))
    t.setup(show_progress=False)
    t.model.norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(RetrolmError, match=r"non-finite training loss at step 5; nothing was saved \(last good "
                                           r"checkpoint: .*step-000004\)"):
        t.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_non_finite_gradient_stops_before_the_step(built_db, tmp_path):
    """A finite loss with an infinite gradient (e.g. an overflow in backward): the update would make every weight NaN,
    and the next checkpoint would save them."""
    t = Trainer(tiny_cfg(built_db, tmp_path / "run", save_every=1))
    t.setup(show_progress=False)
    t.model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(RetrolmError, match="non-finite training gradient norm at step 1; nothing was saved"):
        t.train()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_non_finite_weights_are_never_saved(built_db, tmp_path):
    t = Trainer(tiny_cfg(built_db, tmp_path / "run"))
    t.setup(show_progress=False)
    with torch.no_grad():
        t.model.norm.weight.fill_(float("inf"))
    with pytest.raises(RetrolmError, match="non-finite weights at step 0; not saved"):
        t.save_checkpoint()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no partial folder either


def test_no_resume_keeps_earlier_checkpoints_aside(built_db, tmp_path):
    """A fresh start (--no-resume) must not leave a higher-step checkpoint behind for a later resume to pick up."""
    out = tmp_path / "run"
    run(tiny_cfg(built_db, out))  # steps 2 and 4
    bad = Trainer(tiny_cfg(built_db, out, steps=2, model=ModelSpec(preset="tiny", seq_len=100, retro_layers=[])))
    with pytest.raises(RetrolmError, match="not a multiple"):  # a fresh start that fails its checks moves nothing
        bad.setup(resume=False, show_progress=False)
    assert not list(out.glob("*.before-*")) and len((out / "metrics.jsonl").read_text().splitlines()) > 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a row torn by a crash: the fresh run's rows start on a line of their own
    t = Trainer(tiny_cfg(built_db, out, steps=2))
    t.setup(resume=False, show_progress=False)
    t.train()
    t.cleanup()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    (aside,) = out.glob("checkpoints.before-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000002", "step-000004"]  # nothing lost
    # the fresh run's curve is its own; the earlier one is kept beside it
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    (old,) = out.glob("metrics.before-*.jsonl")
    assert old.read_text().endswith('"train/lo\n')
    assert old.name.removeprefix("metrics.") == aside.name.removeprefix("checkpoints.") + ".jsonl"
    assert [json.loads(x)["step"] for x in old.read_text().splitlines() if "train/loss" in x] == [1, 2, 3, 4]
    t = Trainer(tiny_cfg(built_db, out, steps=2))
    t.setup(show_progress=False)  # a later resume continues the fresh run, not the old step 4
    assert t.step == 2


def test_resuming_with_settings_that_do_not_fit_says_so_instead_of_calling_every_checkpoint_damaged(
        built_db, two_checkpoints, tmp_path, caplog):
    """Intact checkpoints of another model shape were each skipped as "damaged", then the run was told to start
    afresh; the files are fine, the settings differ."""
    import shutil

    out = Path(shutil.copytree(two_checkpoints, tmp_path / "run"))
    wider = tiny_cfg(built_db, out, model=ModelSpec(preset="tiny", seq_len=256, d_model=128))
    t = Trainer(wider)
    with caplog.at_level(logging.WARNING), pytest.raises(RetrolmError, match=r"step-000004: resumed with another "
                                                                            r"model \(.*d_model 64 → 128.*\); resume"):
        t.setup(show_progress=False)
    assert "damaged" not in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
