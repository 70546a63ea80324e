"""scripts/evidence_incontext.py's Steps: wall times of scripts sharing a work folder do not overwrite each other."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO


def load_steps():
    spec = importlib.util.spec_from_file_location("evidence_incontext", REPO / "scripts" / "evidence_incontext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Steps


def step_cmd(out, sleep: float) -> list:
    """A command that takes ~sleep seconds and makes the file its step is done by."""
    code = f"import time, pathlib; time.sleep({sleep}); pathlib.Path({str(out)!r}).write_text('x')"
    return [sys.executable, "-c", code]


def test_same_step_name_in_two_scripts_keeps_both_times_and_old_files_still_read(tmp_path):
    Steps = load_steps()
    first, second = Steps(tmp_path), Steps(tmp_path)  # two scripts on one work folder
    a, b = tmp_path / "results-a", tmp_path / "results-b"
    first("eval retro-small previous", step_cmd(a, 0.3), a)
    second("eval retro-small previous", step_cmd(b, 1.2), b)
    saved = json.loads((tmp_path / "timings.json").read_text())
    assert len(saved) == 2  # one name, two steps: before, the second time replaced the first
    assert second.seconds_of("eval retro-small previous") >= 1.2
    assert first.seconds_of("eval retro-small previous") < 1.2

    # a later invocation skips the finished step and still reports the time it took
    again = Steps(tmp_path)
    again("eval retro-small previous", step_cmd(b, 5.0), b)
    assert again.seconds == {"eval retro-small previous": second.seconds_of("eval retro-small previous")}
    # a step another script ran (a shared training run) is found by its name alone
    assert Steps(tmp_path).seconds_of("eval retro-small previous") > 0
    # a timings file from before steps were keyed by their file: read by bare name
    (tmp_path / "timings.json").write_text(json.dumps({"baseline-small": 42.0}))
    assert Steps(tmp_path).seconds_of("baseline-small") == 42.0
    assert Steps(tmp_path).seconds_of("missing") == 0.0
