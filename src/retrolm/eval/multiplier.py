"""The compute multiplier (SPEC T5): how much pretraining compute a no-retrieval model would need to match a system
that retrieves at test time, divided by what that system actually cost.

1. Fit the metric of no-retrieval baselines against their pretraining FLOPs ``F``:

   * bits per byte (lower is better): log-linear, ``bpb = a + b · log10 F``;
   * accuracy (exact match, multiple-choice accuracy; higher is better): a sigmoid in ``log10 F`` bounded below by
     chance and above by a ceiling, ``acc = chance + (ceiling − chance) · σ(k · (log10 F − x0))``, fitted by least
     squares on ``logit((acc − chance) / (ceiling − chance))``, which is linear in ``log10 F`` (points at or beyond a
     bound are pulled just inside it).

2. Invert the fit at each system's metric → the equivalent pretraining FLOPs ``F_eq`` (None when the metric lies
   outside what the fit can reach, e.g. at or below chance), and report

   * ``multiplier = F_eq / F_pretrain`` (the paper's number: test-time compute left out), and
   * ``multiplier_with_test_time = F_eq / (F_pretrain + Q · f_test)`` with ``f_test`` the system's FLOPs per question
     and ``Q`` the number of questions charged (by default those evaluated); ``break_even_queries`` is the ``Q`` at
     which that multiplier falls to 1.

An equivalent compute outside the baselines' FLOPs range is an extrapolation and flagged as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from retrolm.core.errors import RetrolmError

EPS = 1e-3
"""How far inside the bounds an accuracy at a bound is pulled (as a fraction of ceiling − chance)."""


@dataclass
class Point:
    """A model: its name, pretraining FLOPs and metric."""

    name: str
    flops: float
    metric: float
    test_flops_per_question: float = 0.0
    """Systems only: FLOPs spent per question at test time."""


@dataclass
class Fit:
    """A fitted metric-vs-pretraining-FLOPs curve."""

    kind: str
    """loglinear (bits per byte) or sigmoid (accuracy)."""
    params: dict
    flops_range: tuple[float, float]
    """Smallest and largest baseline FLOPs."""

    def predict(self, flops: float | np.ndarray) -> float | np.ndarray:
        x = np.log10(flops)
        p = self.params
        if self.kind == "loglinear":
            return p["a"] + p["b"] * x
        return p["floor"] + (p["ceiling"] - p["floor"]) / (1 + np.exp(-p["k"] * (x - p["x0"])))

    def invert(self, metric: float) -> float | None:
        """The pretraining FLOPs at which the fit reaches ``metric`` (None if it never does)."""
        p = self.params
        if self.kind == "loglinear":
            x = (metric - p["a"]) / p["b"] if p["b"] else math.inf
            return 10**x if x < 300 else None  # beyond 1e300 FLOPs: the fit never gets there
        if p["k"] == 0 or not p["floor"] < metric < p["ceiling"]:
            return None
        y = (metric - p["floor"]) / (p["ceiling"] - p["floor"])
        x = p["x0"] + math.log(y / (1 - y)) / p["k"]
        return 10**x if x < 300 else None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: float(v) for k, v in self.params.items()},
                "flops_range": list(self.flops_range)}


def _xy(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    if len(points) < 2 or len({p.flops for p in points}) < 2:
        raise RetrolmError("the multiplier needs baselines at two or more different pretraining FLOPs")
    if any(p.flops <= 0 for p in points):
        raise RetrolmError("baseline pretraining FLOPs must be positive")
    y = np.asarray([p.metric for p in points], dtype=float)
    if np.ptp(y) <= 1e-9 * max(1.0, float(np.abs(y).max())):  # a fitted slope would be rounding noise of either sign
        raise RetrolmError(f"the baselines all score {y[0]:g}: a metric that does not change with pretraining FLOPs "
                           "gives no compute multiplier")
    return np.log10([p.flops for p in points]), y


def fit_loglinear(points: Sequence[Point]) -> Fit:
    """Least-squares ``metric = a + b · log10 F`` (bits per byte)."""
    x, y = _xy(points)
    b, a = np.polyfit(x, y, 1)
    if b >= 0:  # the curve a multiplier is read off must improve with compute
        raise RetrolmError(f"the baselines' bits per byte do not fall with pretraining FLOPs (fitted slope "
                           f"{b:+.3g} per decade): no compute multiplier can be read off them")
    return Fit("loglinear", {"a": float(a), "b": float(b)}, (10 ** x.min(), 10 ** x.max()))


def fit_sigmoid(points: Sequence[Point], floor: float = 0.0, ceiling: float = 1.0) -> Fit:
    """Least-squares bounded sigmoid in ``log10 F`` (accuracy; ``floor`` = chance)."""
    if not floor < ceiling:
        raise RetrolmError(f"accuracy bounds must have chance < ceiling, got {floor} and {ceiling}")
    x, y = _xy(points)
    above = [p for p in points if p.metric > ceiling]
    if above:
        raise RetrolmError(f"baseline {above[0].name!r} has accuracy {above[0].metric:g}, above the ceiling "
                           f"{ceiling:g} (accuracies in percent need a ceiling of 100)")
    span = ceiling - floor
    u = np.clip((y - floor) / span, EPS, 1 - EPS)
    if np.ptp(u) == 0:  # all at or below chance (or at the ceiling): as flat as equal scores
        raise RetrolmError(f"the baselines all score at or below chance ({floor:g}) or at the ceiling "
                           f"({ceiling:g}): no compute multiplier can be read off them")
    k, c = np.polyfit(x, np.log(u / (1 - u)), 1)
    if k <= 0:
        raise RetrolmError(f"the baselines' accuracy does not rise with pretraining FLOPs (fitted slope {k:+.3g} per "
                           "decade): no compute multiplier can be read off them")
    x0 = -c / k
    return Fit("sigmoid", {"floor": floor, "ceiling": ceiling, "k": float(k), "x0": float(x0)},
               (10 ** x.min(), 10 ** x.max()))


def fit_metric(points: Sequence[Point], kind: str, chance: float = 0.0, ceiling: float = 1.0) -> Fit:
    """``kind`` bpb → :func:`fit_loglinear`; accuracy → :func:`fit_sigmoid`."""
    if kind == "bpb":
        return fit_loglinear(points)
    if kind == "accuracy":
        return fit_sigmoid(points, chance, ceiling)
    raise RetrolmError(f"multiplier metric kind must be bpb or accuracy, got {kind!r}")


def multiplier(fit: Fit, system: Point, queries: float = 0.0) -> dict:
    """The compute multiplier of ``system`` (see the module docstring)."""
    eq = fit.invert(system.metric)
    test = system.test_flops_per_question * queries
    out: dict = {"metric": system.metric, "pretraining_flops": system.flops,
                 "test_flops_per_question": system.test_flops_per_question, "queries": queries,
                 "equivalent_flops": eq, "multiplier": None, "multiplier_with_test_time": None,
                 "break_even_queries": None, "extrapolated": None}
    if eq is None:
        out["note"] = "the baselines' fit never reaches this metric"
        return out
    lo, hi = fit.flops_range
    out.update(multiplier=eq / system.flops, multiplier_with_test_time=eq / (system.flops + test),
               extrapolated=not lo <= eq <= hi)
    if system.test_flops_per_question > 0 and eq > system.flops:
        out["break_even_queries"] = (eq - system.flops) / system.test_flops_per_question
    return out


def multiplier_report(baselines: Sequence[Point], systems: Sequence[Point], kind: str, chance: float = 0.0,
                      ceiling: float = 1.0, queries: float = 0.0) -> dict:
    """Fit the baselines, then the multiplier of every system."""
    if not (queries >= 0 and math.isfinite(queries)):  # NaN passed and dropped the charge; inf gave 0
        raise RetrolmError(f"the questions charged must be a finite number >= 0, got {queries:g}")
    names = [s.name for s in systems]
    if len(set(names)) < len(names):
        raise RetrolmError(f"system names must differ: {sorted({n for n in names if names.count(n) > 1})} repeat")
    bad = [s.name for s in systems if not (0 < s.flops < math.inf and 0 <= s.test_flops_per_question < math.inf)]
    if bad:
        raise RetrolmError(f"system {bad[0]!r}: pretraining FLOPs must be positive and test-time FLOPs >= 0 (finite)")
    fit = fit_metric(baselines, kind, chance, ceiling)
    return {"kind": kind, "fit": fit.to_dict(),
            "baselines": [{"name": p.name, "flops": p.flops, "metric": p.metric,
                           "fitted": float(fit.predict(p.flops))} for p in baselines],
            "systems": {s.name: multiplier(fit, s, queries) for s in systems}}


def load_points(path: str | Path, what: str = "baselines") -> list[Point]:
    """Models from a YAML or JSON list: ``{name, metric, flops}`` or ``{name, metric, params, tokens}`` (FLOPs = 6·N·D),
    optionally ``test_flops_per_question``."""
    path = Path(path)
    if not path.is_file():
        raise RetrolmError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RetrolmError(f"{path}: invalid YAML/JSON ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise RetrolmError(f"{path}: not a UTF-8 text file") from None
    if isinstance(data, dict):
        data = data.get(what, data.get("models"))
    if not isinstance(data, list) or not data:
        raise RetrolmError(f"{path}: expected a non-empty list of models")
    out = []
    for i, d in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(d, dict) or "metric" not in d:
            raise RetrolmError(f"{where}: needs 'metric' and 'flops' (or 'params' and 'tokens')")
        try:
            flops = float(d["flops"]) if "flops" in d else 6.0 * float(d["params"]) * float(d["tokens"])
            point = Point(str(d.get("name", f"{what}-{i}")), flops, float(d["metric"]),
                          float(d.get("test_flops_per_question", 0.0)))
        except (KeyError, TypeError, ValueError):
            raise RetrolmError(f"{where}: needs numeric 'metric' and 'flops' (or 'params' and 'tokens')") from None
        if not (point.flops > 0 and math.isfinite(point.flops) and math.isfinite(point.metric)):
            raise RetrolmError(f"{where}: pretraining FLOPs must be positive and the metric finite")
        if not point.test_flops_per_question >= 0:
            raise RetrolmError(f"{where}: test_flops_per_question must be >= 0")
        if any(q.name == point.name for q in out):
            raise RetrolmError(f"{where}: the name {point.name!r} is used twice (every model needs its own)")
        out.append(point)
    return out


def plot_multiplier(path: str | Path, report: dict, systems: Sequence[Point], ylabel: str) -> None:
    """Baselines, their fit, and each system at its pretraining FLOPs (filled) and with its test-time FLOPs added
    (hollow), joined to its equivalent compute on the fit."""
    from retrolm.eval.report import _figure, _save

    plt = _figure()
    fit = Fit(report["fit"]["kind"], {k: v for k, v in report["fit"].items() if k not in ("kind", "flops_range")},
              tuple(report["fit"]["flops_range"]))
    xs = [b["flops"] for b in report["baselines"]] + [s.flops for s in systems]
    xs += [m["equivalent_flops"] for m in report["systems"].values() if m["equivalent_flops"]]
    xs += [s.flops + s.test_flops_per_question * m["queries"] for s, m in zip(systems, report["systems"].values(),
                                                                             strict=True)]
    grid = np.logspace(np.log10(min(xs)) - 0.3, np.log10(max(xs)) + 0.3, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(grid, fit.predict(grid), color="gray", label=f"{fit.kind} fit of the baselines")
    ax.plot([b["flops"] for b in report["baselines"]], [b["metric"] for b in report["baselines"]], "o", color="k",
            label="no-retrieval baselines")
    for i, s in enumerate(systems):
        m = report["systems"][s.name]
        color = f"C{i}"
        ax.plot([s.flops], [s.metric], "*", markersize=11, color=color, label=s.name)
        if s.test_flops_per_question and m["queries"]:
            ax.plot([s.flops + s.test_flops_per_question * m["queries"]], [s.metric], "*", markersize=11,
                    markerfacecolor="none", color=color)
        if m["equivalent_flops"]:
            ax.plot([s.flops, m["equivalent_flops"]], [s.metric, s.metric], ":", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("pretraining FLOPs (hollow: + test-time FLOPs of the questions)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, Path(path))
    plt.close(fig)


__all__ = ["Fit", "Point", "fit_loglinear", "fit_metric", "fit_sigmoid", "load_points", "multiplier",
           "multiplier_report", "plot_multiplier"]
