"""The compute multiplier: fits of no-retrieval baselines (log-linear for bits per byte, bounded sigmoid for accuracy)
recovered from synthetic points, inverted, with and without test-time FLOPs charged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from conftest import run_cli
from retrolm.core.errors import RetrolmError
from retrolm.eval.multiplier import Point, fit_loglinear, fit_sigmoid, load_points, multiplier, multiplier_report


def bpb(f: float) -> float:
    return 3.0 - 0.1 * math.log10(f)


def acc(f: float, chance: float = 0.25, k: float = 2.0, x0: float = 18.0) -> float:
    return chance + (1 - chance) / (1 + math.exp(-k * (math.log10(f) - x0)))


def test_loglinear_fit_and_inversion():
    pts = [Point(f"b{e}", 10.0**e, bpb(10.0**e)) for e in (15, 16, 17, 18)]
    fit = fit_loglinear(pts)
    assert fit.params["a"] == pytest.approx(3.0) and fit.params["b"] == pytest.approx(-0.1)
    assert fit.invert(bpb(3e16)) == pytest.approx(3e16, rel=1e-9)
    assert fit.predict(1e20) == pytest.approx(1.0)
    # a system pretrained with 1e16 FLOPs that reaches the bits per byte of 1e17: 10× without test-time FLOPs;
    # charging 1e14 FLOPs for each of 100 questions doubles its cost (5×); break-even after 900 questions
    m = multiplier(fit, Point("rag", 1e16, bpb(1e17), test_flops_per_question=1e14), queries=100)
    assert m["multiplier"] == pytest.approx(10.0) and m["multiplier_with_test_time"] == pytest.approx(5.0)
    assert m["break_even_queries"] == pytest.approx(900.0) and m["extrapolated"] is False
    far = multiplier(fit, Point("far", 1e16, bpb(1e20)))
    assert far["multiplier"] == pytest.approx(1e4) and far["extrapolated"] is True
    assert far["break_even_queries"] is None and far["multiplier_with_test_time"] == far["multiplier"]


def test_sigmoid_fit_and_inversion():
    pts = [Point(f"b{e}", 10.0**e, acc(10.0**e)) for e in (16.5, 17.5, 18.0, 18.5, 19.5)]
    fit = fit_sigmoid(pts, floor=0.25, ceiling=1.0)
    assert fit.params["k"] == pytest.approx(2.0, rel=1e-6) and fit.params["x0"] == pytest.approx(18.0, rel=1e-6)
    assert fit.invert(acc(4e18)) == pytest.approx(4e18, rel=1e-6)
    assert fit.invert(0.25) is None and fit.invert(0.2) is None and fit.invert(1.0) is None  # unreachable
    assert np.allclose(fit.predict(np.array([1e18])), [0.625])
    m = multiplier(fit, Point("sys", 1e17, acc(1e18)))
    assert m["multiplier"] == pytest.approx(10.0, rel=1e-6)
    below = multiplier(fit, Point("chance", 1e17, 0.25))
    assert below["multiplier"] is None and "never reaches" in below["note"]
    # points at a bound are pulled inside it instead of breaking the logit
    clipped = fit_sigmoid([Point("a", 1e16, 0.25), Point("b", 1e18, 0.625), Point("c", 1e20, 1.0)], 0.25, 1.0)
    assert clipped.params["k"] > 0 and 17 < clipped.params["x0"] < 19


def test_report_points_and_errors(tmp_path):
    base = [Point("s", 1e15, 2.0), Point("l", 1e17, 1.8)]
    r = multiplier_report(base, [Point("x", 1e15, 1.9, 1e12)], "bpb", queries=10)
    assert r["fit"]["kind"] == "loglinear" and r["systems"]["x"]["multiplier"] == pytest.approx(10.0)
    assert [b["fitted"] for b in r["baselines"]] == pytest.approx([2.0, 1.8])
    with pytest.raises(RetrolmError, match="two or more"):
        fit_loglinear([Point("a", 1e15, 2.0), Point("b", 1e15, 1.9)])
    with pytest.raises(RetrolmError, match="bpb or accuracy"):
        multiplier_report(base, [], "perplexity")
    with pytest.raises(RetrolmError, match="chance < ceiling"):
        fit_sigmoid(base, 0.5, 0.5)
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump([{"name": "tiny", "params": 1e6, "tokens": 2e6, "metric": 1.8},
                                 {"name": "big", "flops": 5e13, "metric": 1.7, "test_flops_per_question": 3}]))
    pts = load_points(f)
    assert [(p.name, p.flops, p.metric) for p in pts] == [("tiny", 1.2e13, 1.8), ("big", 5e13, 1.7)]
    assert pts[1].test_flops_per_question == 3
    f.write_text(yaml.safe_dump([{"name": "x", "metric": 1.0}]))
    with pytest.raises(RetrolmError, match="entry 0"):
        load_points(f)
    with pytest.raises(RetrolmError, match="not found"):
        load_points(tmp_path / "missing.yaml")
    for bad, msg in (({"name": "z", "flops": 0, "metric": 1.0}, "FLOPs must be positive"),
                     ({"name": "z", "flops": 1e15, "metric": 1.0, "test_flops_per_question": -1}, ">= 0"),
                     ({"name": "tiny", "flops": 1e15, "metric": 1.0}, "'tiny' is used twice")):
        f.write_text(yaml.safe_dump([{"name": "tiny", "flops": 1e14, "metric": 1.8}, bad]))
        with pytest.raises(RetrolmError, match=rf"b\.yaml: entry 1: .*{msg}"):
            load_points(f)


def test_curves_a_multiplier_cannot_be_read_off_and_bad_systems_are_refused():
    base = [Point("s", 1e15, 2.0), Point("l", 1e17, 1.8)]
    with pytest.raises(RetrolmError, match="do not fall with pretraining FLOPs"):  # bigger baselines worse
        fit_loglinear([Point("s", 1e15, 1.8), Point("l", 1e17, 1.82)])
    with pytest.raises(RetrolmError, match="does not rise with pretraining FLOPs"):
        fit_sigmoid([Point("s", 1e15, 0.6), Point("l", 1e17, 0.4)], 0.25, 1.0)
    # equal baselines: the fitted slope is rounding noise (-8e-19 for four at 0.7), which passed as a fit
    flat = [Point(f"b{i}", f, 0.7) for i, f in enumerate([1e18, 1e19, 1e20, 1e21])]
    for fit in (fit_loglinear, fit_sigmoid):
        with pytest.raises(RetrolmError, match=r"all score 0\.7: a metric that does not change"):
            fit(flat)
    below_chance = [Point("s", 1e18, 0.19), Point("m", 1e19, 0.228), Point("l", 1e20, 0.18)]
    with pytest.raises(RetrolmError, match=r"all score at or below chance \(0\.25\)"):
        fit_sigmoid(below_chance, 0.25, 1.0)
    with pytest.raises(RetrolmError, match=r"'s' has accuracy 30, above the ceiling 1 .*percent"):
        fit_sigmoid([Point("s", 1e15, 30.0), Point("l", 1e17, 40.0)], 0.0, 1.0)
    # a metric far past the fit: no equivalent compute instead of an overflow
    fit = fit_loglinear([Point(f"b{i}", 10.0 ** (15 + i), 1.2 - 0.1 * i) for i in range(3)])
    assert fit.invert(-40.0) is None and multiplier(fit, Point("x", 1e15, -40.0))["multiplier"] is None
    with pytest.raises(RetrolmError, match=r"system names must differ: \['x'\]"):
        multiplier_report(base, [Point("x", 1e15, 1.9), Point("x", 1e16, 1.85)], "bpb")
    with pytest.raises(RetrolmError, match="system 'y': pretraining FLOPs must be positive"):
        multiplier_report(base, [Point("y", 0.0, 1.9)], "bpb")
    for queries in (-5, float("nan"), float("inf")):  # NaN dropped the charge from the report, inf gave 0
        with pytest.raises(RetrolmError, match="questions charged must be a finite number >= 0"):
            multiplier_report(base, [Point("x", 1e15, 1.9, 1e12)], "bpb", queries=queries)
    with pytest.raises(RetrolmError, match=r"system 'z': .* test-time FLOPs >= 0 \(finite\)"):
        multiplier_report(base, [Point("z", 1e15, 1.9, float("inf"))], "bpb", queries=1)


def test_multiplier_cli(tmp_path, capsys):
    b, s = tmp_path / "baselines.yaml", tmp_path / "systems.yaml"
    b.write_text(yaml.safe_dump([{"name": f"b{e}", "flops": 10.0**e, "metric": bpb(10.0**e)} for e in (15, 16, 17)]))
    s.write_text(yaml.safe_dump([{"name": "rag", "flops": 1e15, "metric": bpb(1e16), "test_flops_per_question": 1e12}]))
    rc, out, err = run_cli(["rag-multiplier", "--baselines", b, "--systems", s, "--out", tmp_path / "m",
                            "--queries", "1000", "--json"], capsys)
    assert rc == 0, err
    r = json.loads(out)
    assert r["systems"]["rag"]["multiplier"] == pytest.approx(10.0)
    assert r["systems"]["rag"]["multiplier_with_test_time"] == pytest.approx(5.0)
    assert (tmp_path / "m" / "multiplier.png").stat().st_size > 0
    assert json.loads((tmp_path / "m" / "multiplier.json").read_text()) == r
