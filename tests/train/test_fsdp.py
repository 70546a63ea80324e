"""Sharded training (``distributed=fsdp``): the same steps as one process, the single-process checkpoint format, and
an exact resume — run for real under torchrun on two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from retrolm.core.errors import RetrolmError
from retrolm.models import RetroConfig, RetroModel
from retrolm.models.weights import tied_aliases, write_checksums
from retrolm.train import ModelSpec, TrainConfig
from retrolm.train.distributed import shard_units


def test_units_are_the_outermost_module_lists_and_tied_weights_are_stored_once(tmp_path):
    model = RetroModel(RetroConfig.preset("tiny", vocab_size=300, chunk_len=8, num_neighbours=2, seq_len=32))
    units = shard_units(model)
    assert units == [*model.blocks, *model.encoder.layers]

    class Nested(nn.Module):  # a list inside a unit is part of that unit
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])) for _ in range(3))
            self.head = nn.Linear(2, 2)

    nested = Nested()
    assert shard_units(nested) == list(nested.layers)

    # what a sharded run writes from its gathered tensors is the file a single process writes
    assert tied_aliases(model) == {"wte.weight": "lm_head.weight"}
    model.save_pretrained(tmp_path / "own")
    model.save_pretrained(tmp_path / "gathered", state={n: t.detach().clone() for n, t in model.state_dict().items()})
    own, gathered = (load_file(tmp_path / d / "model.safetensors") for d in ("own", "gathered"))
    assert own.keys() == gathered.keys() and "wte.weight" not in own
    assert all(torch.equal(own[n], gathered[n]) for n in own)


def test_distributed_must_be_ddp_or_fsdp(tmp_path):
    with pytest.raises(RetrolmError, match="distributed must be ddp or fsdp"):
        TrainConfig(db=str(tmp_path), distributed="zero3", model=ModelSpec())


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _rows(run_dir) if "train/loss" in r}


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_as_one_process_and_resumes_exactly(built_db, tmp_path):
    """Two processes with sharded weights, gradients and AdamW state take the steps one process takes on the same
    sequences (micro-batches accumulated without a reduce-scatter in between), write the single-process checkpoint
    format, and a run resumed from its step-2 checkpoint takes step 3 as the uninterrupted run did."""
    args = ["-m", "retrolm.cli", "train", "-q", f"db={built_db.path}", "model.seq_len=256", "steps=3",
            "eval_every=3", "save_every=1", "keep_checkpoints=3", "eval_batches=1", "log_every=1", "warmup_steps=1",
            "tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fsdp = tmp_path / "fsdp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args, f"out_dir={fsdp}",
                "batch_size=2", "grad_accum=2", "distributed=fsdp"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, *args, f"out_dir={one}", "batch_size=4", "grad_accum=2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    assert list(_losses(fsdp)) == [1, 2, 3]
    assert list(_losses(fsdp).values()) == pytest.approx(list(_losses(one).values()), rel=1e-5)
    val = [[r["val/loss"] for r in _rows(d) if "val/loss" in r] for d in (fsdp, one)]
    assert val[0] == pytest.approx(val[1], rel=1e-5)

    step3 = "checkpoints/step-000003"
    weights = [load_file(d / step3 / "model.safetensors") for d in (fsdp, one)]
    assert weights[0].keys() == weights[1].keys()
    for name, t in weights[0].items():
        assert torch.allclose(t, weights[1][name], atol=2e-5), name
    opts = [torch.load(d / step3 / "optimizer.pt", weights_only=False) for d in (fsdp, one)]
    assert opts[0]["param_groups"] == opts[1]["param_groups"]  # parameters numbered as one process numbers them
    assert opts[0]["state"].keys() == opts[1]["state"].keys()
    for i, moments in opts[0]["state"].items():
        assert torch.allclose(moments["exp_avg"], opts[1]["state"][i]["exp_avg"], atol=1e-6)

    # the sharded run is interrupted after step 2 and resumed: its step 3 is the uninterrupted one's
    first = dict(_losses(fsdp))
    shutil.rmtree(fsdp / step3)
    (fsdp / "metrics.jsonl").write_text("")
    again = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(_losses(fsdp)) == [3]
    assert _losses(fsdp)[3] == pytest.approx(first[3], rel=1e-6)
    resumed = load_file(fsdp / step3 / "model.safetensors")
    for name, t in resumed.items():
        assert torch.allclose(t, weights[0][name], atol=1e-6), name

    # a checkpoint that lacks a tensor is refused, as one process refuses it (not filled in from the model)
    shutil.rmtree(fsdp / step3)
    step2 = fsdp / "checkpoints" / "step-000002"
    tensors = load_file(step2 / "model.safetensors")
    del tensors["blocks.0.mlp.proj.weight"]
    save_file(tensors, step2 / "model.safetensors")
    write_checksums(step2)
    refused = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "misses tensors of the model: blocks.0.mlp.proj.weight" in refused.stderr
    # ... and so is one of another shape (a [2] vector would broadcast into a [64] shard without a word)
    tensors["blocks.0.mlp.proj.weight"] = weights[0]["blocks.0.mlp.proj.weight"]
    tensors["blocks.0.norm1.weight"] = torch.ones(2)
    save_file(tensors, step2 / "model.safetensors")
    write_checksums(step2)
    refused = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "blocks.0.norm1.weight has shape (2,)" in refused.stderr

    # a checkpoint rank 0 cannot read (no checksums, a truncated optimizer.pt) is skipped by every rank alike: the run
    # resumes from step 1 and trains steps 2 and 3 again, as the uninterrupted run did
    (step2 / "checksums.json").unlink()
    data = (step2 / "optimizer.pt").read_bytes()
    (step2 / "optimizer.pt").write_bytes(data[: len(data) // 2])
    (fsdp / "metrics.jsonl").write_text("")
    again = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "damaged checkpoint skipped" in again.stderr
    assert list(_losses(fsdp)) == [2, 3] and _losses(fsdp)[3] == pytest.approx(first[3], rel=1e-6)


@pytest.mark.slow
def test_fsdp_checkpoint_before_the_first_step_has_no_optimizer_state(built_db, tmp_path):
    """steps=0 writes the model as built; its optimizer has no state yet (torch's sharded getter would make one up
    by a zero step, which a resume would then count as a step taken)."""
    out = tmp_path / "zero"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "retrolm.cli", "train", "-q",
           f"db={built_db.path}", "model.seq_len=256", "steps=0", "tensorboard=false", "distributed=fsdp",
           f"out_dir={out}", "batch_size=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "step-000000" / "optimizer.pt", weights_only=False)
    assert state["state"] == {} and len(state["param_groups"]) == 2
