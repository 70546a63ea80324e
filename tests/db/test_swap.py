"""Replacing a database folder (``build --overwrite``): a crash between the two renames is finished or undone on the
next open or build, never left as a missing database."""

from __future__ import annotations

import logging
import shutil

import pytest

from retrolm.core.errors import RetrolmError
from retrolm.db import Database
from retrolm.db.meta import recover_interrupted_swap, swap_into_place


def folder(path, marker: str, meta: bool = True, plan: bool = False):
    path.mkdir(parents=True)
    (path / "marker").write_text(marker)
    if meta:
        (path / "meta.json").write_text("{}")
    if plan:
        (path / "plan.json").write_text("{}")
    return path


def names(root) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_swap_replaces_the_folder_and_removes_the_old_one(tmp_path):
    out = folder(tmp_path / "db", "old")
    swap_into_place(folder(tmp_path / "db.partial", "new"), out)
    assert (out / "marker").read_text() == "new" and names(tmp_path) == {"db"}
    swap_into_place(folder(tmp_path / "db.partial", "newer"), out)
    assert (out / "marker").read_text() == "newer" and names(tmp_path) == {"db"}
    shutil.rmtree(out)  # a first build: nothing to replace
    swap_into_place(folder(tmp_path / "db.partial", "first"), out)
    assert (out / "marker").read_text() == "first" and names(tmp_path) == {"db"}


def test_crash_after_the_old_folder_was_moved_aside_finishes_a_complete_replacement(tmp_path, caplog):
    folder(tmp_path / "db.old", "old")
    folder(tmp_path / "db.partial", "new")  # finished: meta.json written, no build plan left
    with caplog.at_level(logging.WARNING):
        recover_interrupted_swap(tmp_path / "db")
    assert names(tmp_path) == {"db"} and (tmp_path / "db" / "marker").read_text() == "new"
    assert "finishing a replacement interrupted by a crash" in caplog.text


@pytest.mark.parametrize("staging", ["missing", "no meta", "unfinished plan"])
def test_crash_with_an_unfinished_replacement_brings_the_old_database_back(tmp_path, caplog, staging):
    folder(tmp_path / "db.old", "old")
    if staging != "missing":
        folder(tmp_path / "db.partial", "new", meta=staging != "no meta", plan=staging == "unfinished plan")
    with caplog.at_level(logging.WARNING):
        recover_interrupted_swap(tmp_path / "db")
    assert (tmp_path / "db" / "marker").read_text() == "old" and not (tmp_path / "db.old").exists()
    if staging != "missing":  # an unfinished build is kept: re-running it resumes
        assert (tmp_path / "db.partial" / "marker").read_text() == "new"
    assert "the previous database is back" in caplog.text


def test_nothing_to_recover_changes_nothing(tmp_path, caplog):
    recover_interrupted_swap(tmp_path / "db")  # no database at all
    assert names(tmp_path) == set()
    folder(tmp_path / "db", "current")
    folder(tmp_path / "db.old", "old")  # a leftover next to a database in place is not touched
    folder(tmp_path / "db.partial", "new")
    with caplog.at_level(logging.WARNING):
        recover_interrupted_swap(tmp_path / "db")
    assert names(tmp_path) == {"db", "db.old", "db.partial"}
    assert (tmp_path / "db" / "marker").read_text() == "current" and not caplog.text


def test_open_recovers_a_real_database(built_db, tmp_path):
    shutil.copytree(built_db.path, tmp_path / "db.old")  # crashed after `db` was moved aside, nothing new yet
    db = Database.open(tmp_path / "db")
    assert db.store.n_chunks == built_db.store.n_chunks and names(tmp_path) == {"db"}
    shutil.move(tmp_path / "db", tmp_path / "db.partial")  # crashed after moving aside, with the new one complete
    folder(tmp_path / "db.old", "old")
    db = Database.open(tmp_path / "db")
    assert db.store.doc_ids == built_db.store.doc_ids and names(tmp_path) == {"db"}


def test_build_after_a_crashed_replacement_sees_the_old_database(built_db, tmp_path, tiny_db_config, wiki_corpus):
    # crashed after `db` was moved aside, before the new build finished: a plain build (no --overwrite) must find
    # the old database back in place and refuse, not silently build a second one next to the leftover
    from retrolm.db.build import build_database

    shutil.copytree(built_db.path, tmp_path / "db.old")
    with pytest.raises(RetrolmError, match="already exists"):
        build_database([wiki_corpus], tmp_path / "db", tiny_db_config, show_progress=False)
    assert names(tmp_path) == {"db"} and Database.open(tmp_path / "db").store.n_chunks == built_db.store.n_chunks


def test_a_finished_build_left_unswapped_is_installed_only_for_its_own_inputs(tmp_path, tiny_db_config, monkeypatch):
    """A crash after a build finished (its plan.json removed) but before it was moved into place: the next build with
    the same inputs installs it, one with other inputs builds anew instead of installing the stale one."""
    import retrolm.db.build as build
    from conftest import wiki_docs, write_jsonl

    first = write_jsonl(tmp_path / "first.jsonl", wiki_docs(6))
    second = write_jsonl(tmp_path / "second.jsonl", wiki_docs(4, start=100))

    def crash(staging, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        build.build_database([first], tmp_path / "db", tiny_db_config, show_progress=False)
    assert not (tmp_path / "db.partial" / "plan.json").exists() and (tmp_path / "db.partial" / "meta.json").is_file()
    monkeypatch.undo()
    build.build_database([second], tmp_path / "db", tiny_db_config, show_progress=False)
    assert Database.open(tmp_path / "db").store.doc_ids == [d["id"] for d in wiki_docs(4, start=100)]
    monkeypatch.setattr(build, "swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        build.build_database([first], tmp_path / "db2", tiny_db_config, show_progress=False)
    monkeypatch.undo()
    staged = (tmp_path / "db2.partial" / "meta.json").read_text()
    build.build_database([first], tmp_path / "db2", tiny_db_config, show_progress=False)  # the same inputs: installed
    assert (tmp_path / "db2" / "meta.json").read_text() == staged
