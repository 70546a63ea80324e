"""Crash-safe file io and the writers' lock: a second writer waits, then gives up with one clear line."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from retrolm.core.errors import RetrolmError
from retrolm.core.io import atomic_path, exclusive_lock, read_json, write_json


class Holder:
    """Holds ``exclusive_lock(folder)`` in another thread until ``release()``."""

    def __init__(self, folder):
        self.taken, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(folder,), daemon=True)
        self.thread.start()
        assert self.taken.wait(10)

    def _hold(self, folder):
        with exclusive_lock(folder, timeout=5):
            self.taken.set()
            self.done.wait(10)

    def release(self):
        self.done.set()
        self.thread.join(10)


def test_second_writer_times_out_with_one_line_naming_the_folder(tmp_path, caplog):
    folder = tmp_path / "db"  # created by the lock
    holder = Holder(folder)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(RetrolmError) as exc, \
                exclusive_lock(folder, timeout=0.5, what="database"):
            pytest.fail("the lock was taken twice")
        waited = time.monotonic() - t0
    finally:
        holder.release()
    msg = str(exc.value)
    assert 0.5 <= waited < 3
    assert msg.startswith(f"{folder}: another retrolm process is still writing to this database")
    assert "\n" not in msg
    waits = [r.getMessage() for r in caplog.records if "waiting for another retrolm process" in r.getMessage()]
    assert waits == [f"{folder}: waiting for another retrolm process writing to this database"]  # said once
    assert (folder / ".lock").is_file()


def test_a_waiting_writer_gets_the_lock_when_the_first_one_finishes(tmp_path):
    folder = tmp_path / "db"
    order = []
    holder = Holder(folder)
    threading.Timer(0.4, lambda: (order.append("first done"), holder.release())).start()
    t0 = time.monotonic()
    with exclusive_lock(folder, timeout=10):
        order.append("second in")
        waited = time.monotonic() - t0
    assert order == ["first done", "second in"] and waited >= 0.3
    # released on exit, and also when the body raises
    with pytest.raises(ValueError), exclusive_lock(folder, timeout=0):
        raise ValueError("boom")
    with exclusive_lock(folder, timeout=0):
        pass


def test_a_lock_whose_folder_was_moved_away_meanwhile_is_taken_again(tmp_path):
    """A build swaps its staging folder, lock file included, into place while it holds the lock: a writer that was
    waiting must not end up holding the moved file (it guards nothing there, and a second handle on it in the same
    process would wait for itself), but a fresh lock on the folder's own .lock."""
    folder, moved = tmp_path / "db.partial", tmp_path / "db"
    got = threading.Event()
    release = threading.Event()

    def waiter() -> None:
        with exclusive_lock(folder, timeout=30):
            got.set()
            release.wait(30)

    with exclusive_lock(folder, timeout=1):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        assert not got.is_set()
        folder.rename(moved)  # the swap, under the lock
    assert got.wait(30)
    assert (folder / ".lock").is_file()  # it took the folder's own lock again
    with exclusive_lock(moved, timeout=0):  # ... and holds nothing on the moved one
        pass
    release.set()
    t.join(30)


def test_lock_timeout_from_the_environment(tmp_path):
    """RETROLM_LOCK_TIMEOUT sets how long another process waits (the default is 600 s)."""
    folder = tmp_path / "db"
    code = (
        "import sys\nfrom pathlib import Path\nfrom retrolm.core.errors import RetrolmError\n"
        "from retrolm.core.io import exclusive_lock\n"
        "try:\n    with exclusive_lock(Path(sys.argv[1])):\n        print('got it')\n"
        "except RetrolmError as e:\n    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)\n"
    )
    env = {**os.environ, "RETROLM_LOCK_TIMEOUT": "1"}
    holder = Holder(folder)
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env,
                              timeout=60)
        waited = time.monotonic() - t0
    finally:
        holder.release()
    assert proc.returncode == 2 and "got it" not in proc.stdout
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: {folder}: another retrolm process is still writing to this database after 1s; "
                     "try again when it has finished"]
    assert 1 <= waited < 30  # waited its second, not the default 600
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "got it"  # free again once the holder is done


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"v": 1})
    assert read_json(path) == {"v": 1}
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("{ torn")
        raise RuntimeError("crash while writing")
    assert read_json(path) == {"v": 1}  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # and no temporary file is left behind
    path.write_text("{ torn")
    with pytest.raises(RetrolmError, match=r"a.json: corrupt JSON file"):
        read_json(path)
    with pytest.raises(RetrolmError, match=r"missing.json: thing not found"):
        read_json(tmp_path / "missing.json", "thing")


def test_a_failed_write_names_the_file_not_its_hidden_temporary(tmp_path):
    """A writer that opens the temporary file itself (np.save, safetensors) reports errors with the temporary's name
    (``.a.npy.x1y2.tmp``, deleted by then); the message must name the file the user asked for."""
    path = tmp_path / "a.npy"
    with pytest.raises(OSError) as raised, atomic_path(path) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert raised.value.filename == str(path) and raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as raised, atomic_path(path):
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "other"))
    assert raised.value.filename == str(tmp_path / "other")  # another file's error keeps its own name


def test_json_files_are_strict_json_with_null_for_a_missing_number(tmp_path):
    """A bucket without novel chunks has no gain (NaN in memory): the file says null, which jq and JavaScript read,
    instead of Python's NaN token, which they reject; the caller's object keeps its NaN."""
    import json
    import math

    import numpy as np

    def strict(token: str):
        raise ValueError(f"not JSON: {token}")

    result = {"gain": {"all": 0.25, "novel": float("nan")}, "ci": (np.float64("-inf"), math.inf),
              "groups": [{"gain": np.float64("nan"), "chunks": 3}], "name": "x"}
    write_json(tmp_path / "eval.json", result)
    back = json.loads((tmp_path / "eval.json").read_text(), parse_constant=strict)
    assert back == {"gain": {"all": 0.25, "novel": None}, "ci": [None, None],
                    "groups": [{"gain": None, "chunks": 3}], "name": "x"}
    assert math.isnan(result["gain"]["novel"])


def test_dir_size_counts_what_is_there_while_a_writer_removes_files(tmp_path, monkeypatch):
    """/api/info answered 500 when a writer's staging folder vanished between the listing and the stat."""
    from retrolm.core import io

    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    (tmp_path / "sub" / "gone.tmp").write_bytes(b"z" * 7)
    assert io.dir_size(tmp_path) == 22
    real = os.stat

    def racing(path, *args, **kwargs):
        if str(path).endswith("gone.tmp"):  # listed, then removed by the writer before it is measured
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "stat", racing)
    assert io.dir_size(tmp_path) == 15
