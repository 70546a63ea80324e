"""Checkpoint folders of a run: written atomically with checksums, rotated, resumed with a fallback.

``out_dir/checkpoints/step-000100/`` holds what the recipe writes (weights, ``model.json``, ``config.yaml``, the
tokenizer, ``optimizer.pt``, ``trainer.pt``, and ``frozen.json`` when some weights were frozen) plus
``checksums.json``. A folder is written under a temporary name and renamed when complete, so a crash never leaves
a half-written checkpoint under a real name. Resuming takes the newest checkpoint whose files match their checksums
and load; a damaged one is skipped with a warning (and kept, for inspection). Rotation keeps the newest ``keep``
checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from retrolm.core.errors import RetrolmError, first_line
from retrolm.core.hub import step_folders
from retrolm.core.io import fsync_dir, fsync_tree
from retrolm.models.weights import CHECKSUMS, verify_checksums, write_checksums

logger = logging.getLogger(__name__)


def aside_path(path: Path, stamp: str) -> Path:
    """Where ``path`` is set aside: ``NAME.before-<stamp>`` (a file keeps its suffix last), numbered when two fresh
    starts fall in the same second."""
    for n in range(1000):
        tag = stamp if n == 0 else f"{stamp}-{n}"
        target = path.with_name(f"{path.stem}.before-{tag}{path.suffix}" if path.is_file() else
                                f"{path.name}.before-{tag}")
        if not target.exists():
            return target
    raise RetrolmError(f"{path}: too many earlier runs set aside at {stamp}")


def set_aside(out: Path, names: Sequence[str], why: str, stamp: str | None = None) -> list[str]:
    """Move the earlier run's ``names`` in run folder ``out`` (checkpoints, logs, models) to ``NAME.before-<time>``
    (``pretrain.before-<time>.json`` for a file), so that a fresh start neither resumes from nor reads as them.
    Returns the new names (logged with ``why``)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in names:
        path = out / name
        if path.exists():
            target = aside_path(path, stamp)
            path.rename(target)
            moved.append(target.name)
    if moved:
        logger.warning("%s: starting afresh (%s); the earlier run is kept in %s", out, why, ", ".join(moved))
    return moved


class ResumeRefused(RetrolmError):
    """An intact checkpoint of another run (another model or database): resuming from it is refused as it is."""


class CheckpointManager:
    """The ``checkpoints/`` folder of a run."""

    def __init__(self, folder: Path, keep: int = 3) -> None:
        self.folder, self.keep = folder, keep

    def all(self) -> list[Path]:
        """Checkpoint folders, oldest first."""
        return step_folders(self.folder)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Create ``step-NNNNNN/`` with ``write(tmp_folder)``, record checksums, rename into place, rotate.

        If writing fails (a full disk), the partial folder is removed and the earlier checkpoints are untouched.
        Rotation deletes only checkpoints older than the new one: a newer folder is one that resuming skipped as
        damaged (kept for inspection) and must not push the good ones out.
        """
        final = self.folder / f"step-{step:06d}"
        tmp = self.folder / f".step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            write_checksums(tmp)
            fsync_tree(tmp)  # on disk before rotation deletes the older checkpoints that a power loss would need
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            where = e.filename if isinstance(e, OSError) and e.filename else final
            raise RetrolmError(f"{where}: cannot write checkpoint ({_reason(e, self.folder)}); earlier checkpoints "
                               "are intact") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.folder)
        found = self.all()
        older = found[: found.index(final)]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self, load: Callable[[Path], None]) -> Path | None:
        """``load`` the newest checkpoint that is intact; returns it (None if the run has none)."""
        found = self.all()
        for ckpt in reversed(found):
            errors = (RetrolmError, RuntimeError, EOFError, OSError, KeyError, ValueError)
            try:
                verify_checksums(ckpt)
            except errors as e:
                logger.warning("%s: damaged checkpoint skipped (%s)", ckpt, first_line(e))
                continue
            try:
                load(ckpt)
                return ckpt
            except ResumeRefused:  # the checkpoint is fine and says why this run cannot go on from it
                raise
            except errors as e:
                if (ckpt / CHECKSUMS).is_file() and not isinstance(e, (OSError, EOFError)):
                    # every file is as written: this run's settings (another model shape, freeze_init, lora) or
                    # software do not fit it, and every older checkpoint would most likely fail the same way
                    raise RetrolmError(f"{ckpt}: intact, but does not load into this run ({first_line(e)}); resume "
                                       "with the settings and software it was written with, or start afresh "
                                       "(--no-resume)") from None
                logger.warning("%s: damaged checkpoint skipped (%s)", ckpt, first_line(e))
        if found:
            raise RetrolmError(f"{self.folder}: no intact checkpoint to resume from (pass --no-resume to restart)")
        return None


def _reason(e: Exception, folder: Path) -> str:
    """Why a write failed, in a few words (torch.save's message on a full disk is only "unexpected pos ...")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    with contextlib.suppress(OSError):
        text += f"; {shutil.disk_usage(folder).free / 1e6:.0f} MB free on the device"
    return text
