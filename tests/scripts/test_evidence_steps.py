"""scripts/evidence_incontext.py's Steps: wall times of scripts sharing a work folder do not overwrite each other, and
a finished step is reused only by the command that made it."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO


def load_module(tmp_path):
    """The script as a module, its record of which command made each output kept in ``tmp_path``."""
    spec = importlib.util.spec_from_file_location("evidence_incontext", REPO / "scripts" / "evidence_incontext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.STAMPS = tmp_path / "step-commands.json"
    return mod


def step_cmd(out, sleep: float, text: str = "x") -> list:
    """A command that takes ~sleep seconds and makes the file its step is done by."""
    code = f"import time, pathlib; time.sleep({sleep}); pathlib.Path({str(out)!r}).write_text({text!r})"
    return [sys.executable, "-c", code]


def test_same_step_name_in_two_scripts_keeps_both_times_and_old_files_still_read(tmp_path):
    Steps = load_module(tmp_path).Steps
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
    again("eval retro-small previous", step_cmd(b, 1.2), b)  # the command that made it
    assert again.seconds == {"eval retro-small previous": second.seconds_of("eval retro-small previous")}
    # a step another script ran (a shared training run) is found by its name alone
    assert Steps(tmp_path).seconds_of("eval retro-small previous") > 0
    # a timings file from before steps were keyed by their file: read by bare name
    (tmp_path / "timings.json").write_text(json.dumps({"baseline-small": 42.0}))
    assert Steps(tmp_path).seconds_of("baseline-small") == 42.0
    assert Steps(tmp_path).seconds_of("missing") == 0.0


def test_a_finished_step_is_reused_by_its_own_command_and_redone_by_another(tmp_path):
    """The evidence scripts reused an output made with other flags (``--per-bucket``, ``--retrofit-steps``, an eval
    made before every baseline existed): now the command that made it is recorded and another one redoes it."""
    mod = load_module(tmp_path)
    out = tmp_path / "eval.json"
    first, other = step_cmd(out, 0, "first"), step_cmd(out, 0, "other")
    mod.Steps(tmp_path)("eval", first, out)
    assert mod.is_done(first, out) and not mod.is_done(other, out)
    mod.Steps(tmp_path)("eval", first, out)  # the same command: skipped
    assert out.read_text() == "first"
    mod.Steps(tmp_path)("eval", other, out)  # another command: made again, and recorded as its
    assert out.read_text() == "other" and mod.is_done(other, out) and not mod.is_done(first, out)
    # an output from before commands were recorded is taken as the asking command's (and recorded)
    old = tmp_path / "old.json"
    old.write_text("old")
    mod.Steps(tmp_path)("old", step_cmd(old, 0, "new"), old)
    assert old.read_text() == "old" and not mod.is_done(step_cmd(old, 0, "newer"), old)


def test_a_step_whose_input_was_made_again_is_made_again(tmp_path):
    """A held-out file drawn again (another --per-bucket) made the evaluation that reads it stale, though its own
    command did not change: a step is redone when a path it names holds another step's output made since."""
    mod = load_module(tmp_path)
    data, out = tmp_path / "kernel" / "heldout.jsonl", tmp_path / "eval" / "eval.json"
    data.parent.mkdir()
    out.parent.mkdir()
    reads = [sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(out)!r}).write_text("
             f"(pathlib.Path(sys.argv[1]) / 'heldout.jsonl').read_text())", data.parent]
    mod.run(step_cmd(data, 0, "6 per bucket"), [], data)
    mod.run(reads, [], out)
    assert out.read_text() == "6 per bucket" and mod.run(reads, [], out) == 0  # up to date: skipped
    mod.run(step_cmd(data, 0.05, "3 per bucket"), [], data)  # another command: the input is made again
    assert not mod.is_done(reads, out)
    mod.run(reads, [], out)
    assert out.read_text() == "3 per bucket" and mod.is_done(reads, out)


def test_a_step_reading_another_file_its_input_step_wrote_is_made_again(tmp_path):
    """`corpus versions` is done by heldout.jsonl but writes rest.jsonl too: the database built from rest.jsonl was
    kept when the sample was drawn again (it named rest.jsonl, not heldout.jsonl). Files given as ``also`` are
    recorded as the step's outputs."""
    mod = load_module(tmp_path)
    kernel, db = tmp_path / "kernel", tmp_path / "db.txt"
    kernel.mkdir()
    held, rest = kernel / "heldout.jsonl", kernel / "rest.jsonl"

    def draw(n: int) -> list:
        code = f"import pathlib; k = pathlib.Path({str(kernel)!r}); (k / 'rest.jsonl').write_text('rest {n}'); " \
               f"(k / 'heldout.jsonl').write_text('held {n}')"
        return [sys.executable, "-c", code]

    build = [sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(db)!r}).write_text("
             "pathlib.Path(sys.argv[1]).read_text())", rest]
    mod.run(draw(6), [], held, also=(rest,))
    mod.run(build, [], db)
    assert db.read_text() == "rest 6" and mod.is_done(build, db)
    mod.run(draw(3), [], held, also=(rest,))  # the sample drawn again
    assert not mod.is_done(build, db)
    mod.run(build, [], db)
    assert db.read_text() == "rest 3"


def test_a_database_made_by_another_command_is_rebuilt_with_overwrite(tmp_path):
    """`db build` refuses an existing folder, and a training run would resume from its last checkpoint (training
    nothing): the step redone adds --overwrite / --no-resume (recorded without it)."""
    mod = load_module(tmp_path)
    fake = tmp_path / "fake_retrolm.py"  # stands for `python -m retrolm.cli`: writes its arguments to meta.json
    fake.write_text("import json, pathlib, sys\n"
                    "pathlib.Path(sys.argv[sys.argv.index('--out') + 1]).write_text(json.dumps(sys.argv[1:]))\n")
    mod.RETROLM = [sys.executable, str(fake)]
    meta = tmp_path / "meta.json"
    first = [*mod.RETROLM, "db", "build", "a.jsonl", "--out", meta]
    assert mod.run(first, [], meta) > 0
    assert json.loads(meta.read_text()) == ["db", "build", "a.jsonl", "--out", str(meta)]
    assert mod.run(first, [], meta) == 0  # made by this command: skipped
    other = [*mod.RETROLM, "db", "build", "b.jsonl", "--out", meta]
    mod.run(other, [], meta)
    assert json.loads(meta.read_text()) == ["db", "build", "b.jsonl", "--out", str(meta), "--overwrite"]
    assert mod.is_done(other, meta) and mod.run(other, [], meta) == 0
    weights = tmp_path / "weights"
    mod.run([*mod.RETROLM, "train", "lr=1", "--out", weights], [], weights)
    mod.run([*mod.RETROLM, "train", "lr=2", "--out", weights], [], weights)
    assert json.loads(weights.read_text()) == ["train", "lr=2", "--out", str(weights), "--no-resume"]
