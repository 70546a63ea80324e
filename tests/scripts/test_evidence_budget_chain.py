"""scripts/evidence_budget.py's chains of rounds: names, warm restarts, and which rounds get the swap settings."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

from conftest import REPO


def load_budget():
    sys.path.insert(0, str(REPO / "scripts"))  # it imports its sibling evidence scripts
    try:
        spec = importlib.util.spec_from_file_location("evidence_budget", REPO / "scripts" / "evidence_budget.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return mod


def chain(rounds: int, n_last: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(name, extra settings) of every round ``continued`` asks to train, swapping in the last ``n_last``."""
    mod = load_budget()
    p = mod.PROFILES["smoke"]
    calls: list[tuple[str, list[str]]] = []

    def train_run(name: str, shape: list[str], extra: list[str]) -> Path:
        calls.append((name, extra))
        return Path("runs") / name

    mod.continued(train_run, p, "retro", p["retro"][0], seed, rounds, ["neighbour_swap=0.5"], "swap50", n_last)
    return calls


def test_only_the_last_round_swaps_and_each_round_continues_the_one_before():
    calls = chain(rounds=2, n_last=1)
    names = [n for n, _ in calls]
    assert names[0] == "retro-small" and names[2].endswith("-swap50") and not names[1].endswith("-swap50")
    assert [("neighbour_swap=0.5" in e) for _, e in calls] == [False, False, True]
    assert not any(x.startswith("init_from") for x in calls[0][1])
    for (prev, _), (_, extra) in itertools.pairwise(calls):
        assert f"init_from={Path('runs') / prev}" in extra
    offsets = [x for _, e in calls for x in e if x.startswith("data_offset")]
    assert len(offsets) == 2 and offsets[0] != offsets[1]  # each round reads on


def test_swapping_every_round_starts_from_the_initialisation_with_the_swap():
    calls = chain(rounds=2, n_last=3, seed=1)
    assert all("neighbour_swap=0.5" in e for _, e in calls)
    assert calls[0][0] == "retro-small-seed1-swap50" and "seed=1" in calls[0][1]
    assert not any(x.startswith("init_from") for x in calls[0][1])
    # the first round keeps the full peak lr; later rounds restart at half of it
    lrs = [float(x.split("=")[1]) for _, e in calls for x in e if x.startswith("lr=")]
    assert lrs[1] == lrs[2] and abs(lrs[0] / lrs[1] - 2) < 0.01
