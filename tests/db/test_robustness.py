"""A database survives what users and machines do to it: two writers, a replaced encoder folder, a build killed between
the index and meta.json, damaged files, a full disk (issue 9, "a clean bad-input record", items 1, 2, 3, 5, 6, 8)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FullFile, no_space, search, wiki_docs, write_jsonl
from retrolm.core import io as core_io
from retrolm.core.errors import RetrolmError
from retrolm.core.hub import weights_fingerprint
from retrolm.db import BuildConfig, Database, DatabaseView


@pytest.fixture(scope="module")
def small_db(tmp_path_factory, tiny_db_config) -> Path:
    """12 documents; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("robust")
    Database.build([write_jsonl(root / "c.jsonl", wiki_docs(12))], root / "db", tiny_db_config, show_progress=False)
    return root / "db"


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory, tiny_encoder) -> str:
    """Another random BERT of the same width and vocabulary as ``tiny_encoder`` (different weights)."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("other-encoder")
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_encoder)).save_pretrained(folder)
    for f in Path(tiny_encoder).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, folder / f.name)
    return str(folder)


def copy_db(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def damage(path: Path, n: int = 2000, seed: int = 0) -> None:
    """Overwrite ``n`` bytes in the middle of a file with random bytes (same size: only checksums can tell)."""
    size = path.stat().st_size
    assert size > n, path
    with open(path, "r+b") as f:
        f.seek((size - n) // 2)
        f.write(np.random.default_rng(seed).bytes(n))


# ------------------------------------------------------------------------------------------------ 1. two writers
def test_delete_waiting_on_its_blocklist_sees_a_concurrent_add(small_db, tmp_path):
    """The issue's scenario: ``db delete --blocklist FIFO`` opens the database, then blocks reading the FIFO; another
    writer adds documents; the delete then goes on. It must act on the database as it is now (its orphan cleanup once
    deleted the other writer's segment and index, and every later open failed)."""
    path = copy_db(small_db, tmp_path / "db")
    more = write_jsonl(tmp_path / "more.jsonl", wiki_docs(4, start=26))
    term = "pollock"  # only in one of the added documents
    victims = [d["id"] for d in wiki_docs(4, start=26) if term in d["text"].lower()]
    assert len(victims) == 1 and all(term not in d["text"].lower() for d in wiki_docs(12))
    fifo = tmp_path / "blocklist"
    os.mkfifo(fifo)
    stale = Database.open(path)  # what `retrolm db delete` does before reading the blocklist
    result: dict = {}

    def delete() -> None:
        try:
            result["deleted"] = stale.delete(blocklist=fifo, show_progress=False)
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    worker = threading.Thread(target=delete, daemon=True)
    worker.start()
    time.sleep(0.2)
    Database.open(path).add([more], show_progress=False)  # the second writer
    deadline = time.monotonic() + 30
    while True:  # open the FIFO for writing once the delete is reading it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline and worker.is_alive(), result
            time.sleep(0.05)
    os.write(fd, f"{term}\n".encode())
    os.close(fd)
    worker.join(60)
    assert "error" not in result, result
    assert result["deleted"] == victims  # the delete saw the added documents
    db = Database.open(path)
    assert db.store.n_docs == 16 and db.info()["num_docs"] == 15 and len(db.meta["segments"]) == 2
    assert db.verify() > 0
    assert search(db, db.chunk_texts([db.store.n_chunks - 1])[0], k=1)  # the added chunks are searchable


def test_stale_python_object_after_a_cli_add(small_db, tmp_path, capsys):
    """A long-lived ``Database.open()`` object, a ``retrolm db add`` meanwhile, then ``delete`` and ``add`` on the old
    object: nothing the CLI added is lost and every open succeeds."""
    from conftest import run_cli

    path = copy_db(small_db, tmp_path / "db")
    stale = Database.open(path)
    added = wiki_docs(3, start=40)
    rc, _, err = run_cli(["db", "add", path, write_jsonl(tmp_path / "b.jsonl", added), "-q"], capsys)
    assert rc == 0, err
    assert stale.delete(doc_ids=[added[0]["id"]], show_progress=False) == [added[0]["id"]]  # found: state re-read
    stale.add([write_jsonl(tmp_path / "c.jsonl", wiki_docs(2, start=50))], show_progress=False)
    db = Database.open(path)
    assert db.store.n_docs == 17 and db.info()["num_docs"] == 16 and len(db.meta["segments"]) == 3
    assert set(db.live_doc_ids()) >= {d["id"] for d in added[1:]}
    assert db.index.ntotal == db.store.n_chunks and db.verify() > 0


def test_an_open_reader_follows_other_processes_deletes_and_keeps_its_chunks_through_an_add(small_db, tmp_path,
                                                                                            caplog):
    """A reader opened before another process writes (a serving or evaluation process): a document deleted elsewhere
    is never returned again (it was, forever). An add renumbers nothing but changes what a run holds (masks sized to
    the store, neighbours): the reader keeps its chunks and says so, unless opened with ``follow`` (a process that
    only serves searches), which then finds the new document; neither fails on the replaced BM25 index, and a
    document replaced and then compacted away (its id live again) stays hidden."""
    from retrolm.retrieval import get_retriever

    path = copy_db(small_db, tmp_path / "db")
    writer = Database.open(path)
    writer.store_bm25(show_progress=False)
    reader, follower = DatabaseView.open(path), DatabaseView.open(path, follow=True)
    lazy = DatabaseView.open(path)  # has not loaded its BM25 index when the add replaces it
    doc = wiki_docs(12)[3]
    query = doc["text"][:200]
    retrievers = [get_retriever(v, kind) for v in (reader, follower) for kind in ("dense", "bm25")]
    assert all(r.search([query], 1).hits(0)[0].doc_id == doc["id"] for r in retrievers)
    writer.delete(doc_ids=[doc["id"]], show_progress=False)
    for retriever in retrievers:
        assert doc["id"] not in {h.doc_id for h in retriever.search([query], 12).hits(0)}
    new = wiki_docs(1, start=60)[0]
    n_chunks = reader.store.n_chunks
    writer.add([write_jsonl(tmp_path / "new.jsonl", [new])], show_progress=False)
    with caplog.at_level(logging.WARNING):
        kept = [r.search([new["text"][:200]], 3).hits(0) for r in retrievers[:2]]
    assert reader.store.n_chunks == n_chunks and all(h.doc_id != new["id"] for hits in kept for h in hits)
    assert doc["id"] not in {h.doc_id for r in retrievers[:2] for h in r.search([query], 12).hits(0)}
    # deletions after the add, a replacement and a compaction still reach the view that kept its chunks
    later, replaced = wiki_docs(12)[5], wiki_docs(12)[7]
    writer.delete(doc_ids=[later["id"]], show_progress=False)
    writer.add([write_jsonl(tmp_path / "replace.jsonl", [{**replaced, "text": "Rewritten entirely."}])], replace=True,
               show_progress=False)
    for gone in (later, replaced):
        assert gone["id"] not in {h.doc_id for r in retrievers[:2] for h in r.search([gone["text"][:200]], 12).hits(0)}
    survivor = wiki_docs(12)[9]
    writer.delete(doc_ids=[survivor["id"]], show_progress=False)
    writer.compact(show_progress=False)
    for gone in (survivor, replaced, later, doc):  # ids still live after a compaction, but not these documents
        assert gone["id"] not in {h.doc_id for r in retrievers[:2] for h in r.search([gone["text"][:200]], 12).hits(0)}
    assert reader.store.n_chunks == n_chunks
    assert caplog.text.count("changed by another process") == 1  # once, not at every write or search
    for retriever in retrievers[2:]:
        assert retriever.search([new["text"][:200]], 1).hits(0)[0].doc_id == new["id"]
    # a view behind the database that had not loaded BM25 reads its own chunks, not the stored index of the new ones
    kept = get_retriever(lazy, "bm25").search([wiki_docs(12)[1]["text"][:200]], 3).hits(0)
    assert kept[0].doc_id == wiki_docs(12)[1]["id"] and lazy.lexical.n_chunks == n_chunks


def test_opening_while_another_process_commits_reads_the_new_version(small_db, tmp_path, monkeypatch):
    """A writer's commit removes the version before it (tombstones, index): a database opened in between failed with
    '... missing, restore it or rebuild' although nothing was wrong."""
    from retrolm.db import view

    path = copy_db(small_db, tmp_path / "db")
    Database.open(path).delete(doc_ids=[wiki_docs(12)[0]["id"]], show_progress=False)  # version 2 has tombstones
    real, commits = view.verify_files, []

    def racing(folder, meta, *args, **kwargs):
        if not commits:  # meta.json read; another process commits the next version before the files are opened
            commits.append(meta["version"])
            Database.open(folder).delete(doc_ids=[wiki_docs(12)[1]["id"]], show_progress=False)
        return real(folder, meta, *args, **kwargs)

    monkeypatch.setattr(view, "verify_files", racing)
    opened = DatabaseView.open(path)
    assert opened.meta["version"] == commits[0] + 1 and opened.deleted_docs.sum() == 2
    monkeypatch.setattr(view, "verify_files", real)
    (path / opened.meta["tombstones"]).unlink()  # missing without a commit: said as it is
    with pytest.raises(RetrolmError, match=r"tombstones-v.*missing"):
        DatabaseView.open(path)


def test_a_second_writer_waits_for_the_lock_then_proceeds(small_db, tmp_path, monkeypatch, caplog):
    path = copy_db(small_db, tmp_path / "db")
    victim = Database.open(path).store.doc_ids[0]
    monkeypatch.setattr(core_io, "LOCK_TIMEOUT_S", 0.3)
    with core_io.exclusive_lock(path), pytest.raises(RetrolmError, match="another retrolm process is still writing"):
        Database.open(path).delete(doc_ids=[victim], show_progress=False)  # another process is writing
    monkeypatch.setattr(core_io, "LOCK_TIMEOUT_S", 60)
    caplog.clear()
    result: dict = {}
    with caplog.at_level(logging.WARNING, logger="retrolm.core.io"), core_io.exclusive_lock(path):
        worker = threading.Thread(
            target=lambda: result.update(deleted=Database.open(path).delete(doc_ids=[victim], show_progress=False)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting, not failed
    worker.join(60)
    assert result["deleted"] == [victim]
    assert sum("waiting for another retrolm process" in r.message for r in caplog.records) == 1


def test_overwrite_waits_for_a_writer_of_the_database_it_replaces(small_db, tmp_path, tiny_db_config, monkeypatch):
    path = copy_db(small_db, tmp_path / "db")
    corpus = write_jsonl(tmp_path / "new.jsonl", wiki_docs(3, start=60))
    monkeypatch.setattr(core_io, "LOCK_TIMEOUT_S", 0.3)
    with core_io.exclusive_lock(path), pytest.raises(RetrolmError, match="another retrolm process is still writing"):
        Database.build([corpus], path, tiny_db_config, overwrite=True, show_progress=False)
    assert Database.open(path).store.n_docs == 12  # not swapped away under the other writer
    assert Database.build([corpus], path, tiny_db_config, overwrite=True, show_progress=False).store.n_docs == 3


def test_a_build_that_waited_for_another_build_of_the_folder_does_not_replace_it(small_db, tmp_path, tiny_db_config,
                                                                                  monkeypatch):
    """Two builds of one new folder started together: the second waits for the first's build lock, and when the
    first has put its database in place the second stops (no --overwrite) instead of silently replacing it."""
    out = tmp_path / "race"
    corpus = write_jsonl(tmp_path / "second.jsonl", wiki_docs(3, start=60))
    monkeypatch.setattr(core_io, "LOCK_TIMEOUT_S", 60)
    result: dict = {}

    def second() -> None:
        try:
            Database.build([corpus], out, tiny_db_config, show_progress=False)
        except RetrolmError as e:
            result["error"] = str(e)

    with core_io.exclusive_lock(out.with_name("race.partial"), what="build"):  # the first build, still running
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting for the first build
        copy_db(small_db, out)  # ... which finishes and puts its database in place
    worker.join(60)
    assert "database already exists" in result["error"]
    assert Database.open(out).store.n_docs == 12  # the first build's database, untouched


# ------------------------------------------------------------------------------------------------ 2. encoder identity
def test_encoder_is_recorded_by_resolved_path_and_weights(tmp_path, tiny_encoder, monkeypatch):
    """A relative --encoder path is recorded absolute (the database opens from any directory); ``/p/``, ``/p`` and a
    copy with the same weights are the same encoder; another model of the same width is not."""
    enc = Path(tiny_encoder)
    monkeypatch.chdir(enc.parent)
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(4))
    db = Database.build([corpus], tmp_path / "db", BuildConfig(encoder=enc.name, tokenizer="train:300"),
                        show_progress=False)
    assert db.meta["encoder"]["name"] == str(enc.resolve())
    assert db.meta["encoder"]["fingerprint"] == weights_fingerprint(enc)
    monkeypatch.chdir(tmp_path)
    db = Database.open(tmp_path / "db")
    assert search(db, db.chunk_texts([2])[0], k=1)[0].chunk_id == 2  # the encoder is found from another directory
    copy = shutil.copytree(enc, tmp_path / "copy")
    for same in (str(enc) + "/", str(enc), str(copy), "./copy"):
        db.check_compatible(encoder=same)


def test_replaced_encoder_folder_is_refused(tmp_path, tiny_encoder, other_encoder, capsys):
    from conftest import run_cli

    enc = shutil.copytree(tiny_encoder, tmp_path / "enc")
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(4))
    Database.build([corpus], tmp_path / "db", BuildConfig(encoder=str(enc), tokenizer="train:300"),
                   show_progress=False)
    with pytest.raises(RetrolmError, match="built with encoder"):
        Database.open(tmp_path / "db").check_compatible(encoder=other_encoder)
    rc, _, err = run_cli(["db", "add", tmp_path / "db", write_jsonl(tmp_path / "m.jsonl", wiki_docs(1, start=9)),
                          "--encoder", other_encoder, "-q"], capsys)
    assert rc == 2 and err.count("error: ") == 1 and "built with encoder" in err

    shutil.rmtree(enc)
    shutil.copytree(other_encoder, enc)  # same width, same path, other weights
    db = Database.open(tmp_path / "db")
    with pytest.raises(RetrolmError, match="encoder weights differ"):
        search(db, "anything at all", k=1)
    with pytest.raises(RetrolmError, match="encoder weights differ"):
        db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(2, start=20))], show_progress=False)
    assert Database.open(tmp_path / "db").store.n_docs == 4 and not (tmp_path / "db" / ".staging-add").exists()

    shutil.rmtree(enc)  # a missing local encoder: a line naming the folder, no hub lookup
    with pytest.raises(RetrolmError) as exc:
        search(Database.open(tmp_path / "db"), "anything", k=1)
    assert str(enc) in str(exc.value) and "not found" in str(exc.value) and "huggingface" not in str(exc.value)
    for missing in (f"{enc}/", "./no-such-encoder"):
        rc, _, err = run_cli(["db", "build", corpus, "--out", tmp_path / "other", "--encoder", missing], capsys)
        assert rc == 2 and err.strip() == f"error: {missing}: encoder folder not found", err


def test_reloaded_view_drops_an_encoder_of_a_rebuilt_database(tmp_path, tiny_encoder, other_encoder):
    """A long-lived object that loaded the encoder, then the folder is rebuilt with another one: its next add must not
    embed with the old encoder (two embedding spaces in one index)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(4))
    stale = Database.build([corpus], tmp_path / "db", BuildConfig(encoder=tiny_encoder, tokenizer="train:300"),
                           show_progress=False)
    search(stale, "load the encoder", k=1)
    Database.build([corpus], tmp_path / "db", BuildConfig(encoder=other_encoder, tokenizer="train:300"),
                   overwrite=True, show_progress=False)
    stale.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(1, start=30))], show_progress=False)
    assert stale.encoder.path == str(Path(other_encoder).resolve())
    db = Database.open(tmp_path / "db")
    last = db.store.n_chunks - 1
    assert search(db, db.chunk_texts([last])[0], k=1)[0].chunk_id == last


# ------------------------------------------------------------------------------------------------ 3. build resume
class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler tidies up."""


def test_build_killed_between_index_and_meta_resumes_identically(tmp_path, tiny_db_config, monkeypatch):
    import retrolm.db.build as build

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(10))
    out, staging = tmp_path / "db", tmp_path / "db.partial"
    real = build.save_config

    def killed(*a, **k):  # build.yaml is written after the index and before meta.json
        raise Killed

    monkeypatch.setattr(build, "save_config", killed)
    with pytest.raises(Killed):
        Database.build([corpus], out, tiny_db_config, show_progress=False)
    assert (staging / "index-v1.faiss").is_file() and not (staging / "meta.json").exists()
    assert (staging / "tokenizer.name.json").is_file()  # needed by the resume (deleting it early broke every rerun)
    with pytest.raises(RetrolmError, match="unfinished build staging folder"):
        DatabaseView.open(staging)

    monkeypatch.setattr(build, "save_config", real)
    monkeypatch.setattr(build, "swap_into_place", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # killed once more, after meta.json: a finished staging folder
        Database.build([corpus], out, tiny_db_config, show_progress=False)
    assert (staging / "meta.json").is_file()
    with pytest.raises(RetrolmError, match="unfinished build staging folder") as exc:
        DatabaseView.open(staging)
    assert "\n" not in str(exc.value)

    monkeypatch.undo()
    resumed = Database.build([corpus], out, tiny_db_config, show_progress=False)
    ref = Database.build([corpus], tmp_path / "ref", tiny_db_config, show_progress=False)
    assert not staging.exists()
    n = ref.store.n_chunks
    assert resumed.store.n_chunks == n and resumed.store.doc_ids == ref.store.doc_ids
    np.testing.assert_array_equal(resumed.store.tokens(np.arange(n)), ref.store.tokens(np.arange(n)))
    np.testing.assert_array_equal(resumed.index.reconstruct(np.arange(n)), ref.index.reconstruct(np.arange(n)))
    assert resumed.meta["tokenizer"] == ref.meta["tokenizer"] and resumed.meta["files"] == ref.meta["files"]


def test_build_killed_while_embedding_resumes_without_tokenizing_or_embedding_twice(tmp_path, tiny_db_config,
                                                                                     monkeypatch):
    """The pre-tokenization stage has its own files and resume point: killed after the first embedding shard, a
    re-run tokenizes no shard twice and embeds only the missing shards, and gives the uninterrupted build's vectors.
    Its statistics count every chunk text the encoder's max_length cut."""
    import dataclasses

    import retrolm.db.build as build
    from retrolm.text.encoder import SentenceEncoder

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))
    cfg = dataclasses.replace(tiny_db_config, encoder_max_length=24, shard_size=16)
    staging = tmp_path / "db.partial"
    calls = {"tokenize": [], "embed": 0}
    real_tokenize, real_encode = build.pretokenize_shard, SentenceEncoder.encode_prepared

    def tokenize(*a, **k):
        calls["tokenize"].append(a[-1])
        return real_tokenize(*a, **k)

    def encode(self, prepared):
        calls["embed"] += 1
        if calls["embed"] == 2:
            raise Killed
        return real_encode(self, prepared)

    monkeypatch.setattr(build, "pretokenize_shard", tokenize)
    monkeypatch.setattr(SentenceEncoder, "encode_prepared", encode)
    with pytest.raises(Killed):
        Database.build([corpus], tmp_path / "db", cfg, show_progress=False)
    done_ids = sorted(p.name for p in (staging / "encoder-ids").glob("*.lengths.npy"))
    assert [p.name for p in (staging / "embeddings").glob("*.npy")] == ["00000.npy"] and len(done_ids) >= 2
    first = list(calls["tokenize"])
    calls["embed"] = -10**6  # no more kills
    db = Database.build([corpus], tmp_path / "db", cfg, show_progress=False)
    n_shards = -(-db.store.n_chunks // cfg.shard_size)
    assert sorted(calls["tokenize"]) == sorted(first) == [f"{i:05d}" for i in range(n_shards)]  # each one once
    assert calls["embed"] == -10**6 + n_shards - 1  # shard 0 was not embedded again
    assert not (tmp_path / "db" / "encoder-ids").exists() and not staging.exists()

    monkeypatch.undo()
    ref = Database.build([corpus], tmp_path / "ref", cfg, show_progress=False)
    n = ref.store.n_chunks
    np.testing.assert_array_equal(db.index.reconstruct(np.arange(n)), ref.index.reconstruct(np.arange(n)))
    stats = db.meta["build_stats"]["encoder_tokens"]
    hf = SentenceEncoder(cfg.encoder, device="cpu").tokenizer  # counted independently, without truncation
    full = [len(x) for x in hf(db.store.texts(np.arange(n), db.tokenizer))["input_ids"]]
    assert stats["chunks"] == n and stats["max"] == stats["max_length"] == 24
    assert stats["truncated"] == sum(f > 24 for f in full) and 0 < stats["truncated"] < n


def test_pretokenizing_in_worker_processes_gives_the_same_database(tmp_path, tiny_db_config, monkeypatch):
    """tokenize_workers=2 (spawned processes, as on a GPU machine) writes the same encoder ids as the in-process
    thread, and the same vectors; the staging stage is gone once the build is done."""
    import dataclasses

    import retrolm.db.build as build

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))
    kept = {}
    real_rmtree = build.shutil.rmtree

    def keep_ids(path, *a, **k):  # keep a copy of the stage's files before the build removes them
        if Path(path).name == "encoder-ids":
            shutil.copytree(path, tmp_path / f"ids-{len(kept)}")
            kept[len(kept)] = tmp_path / f"ids-{len(kept)}"
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(build.shutil, "rmtree", keep_ids)
    runs = {}
    for workers in (0, 2):
        cfg = dataclasses.replace(tiny_db_config, shard_size=16, tokenize_workers=workers)
        assert cfg.pretokenize_processes("cpu") == workers
        runs[workers] = Database.build([corpus], tmp_path / f"db{workers}", cfg, show_progress=False)
    a, b = (sorted(kept[i].iterdir()) for i in (0, 1))
    assert [p.name for p in a] == [p.name for p in b] and len(a) >= 4
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.load(x), np.load(y))
    n = runs[0].store.n_chunks
    np.testing.assert_array_equal(runs[0].index.reconstruct(np.arange(n)), runs[2].index.reconstruct(np.arange(n)))
    assert runs[2].meta["build_stats"]["encoder_tokens"] == runs[0].meta["build_stats"]["encoder_tokens"]


def test_resume_sorts_the_missing_shards_together_and_writes_each_its_own_vectors(tmp_path, tiny_db_config,
                                                                                   monkeypatch):
    """Resumed with shards 1 and 2 embedded but 0 missing (non-contiguous), sort_shards=3 embeds shards 0, 3 and 4
    in one window and splits the vectors back into their own shard files: the uninterrupted build's vectors."""
    import dataclasses

    from retrolm.text.encoder import SentenceEncoder

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))
    cfg = dataclasses.replace(tiny_db_config, encoder_max_length=24, shard_size=8)
    real_encode, calls = SentenceEncoder.encode_prepared, []

    def encode(self, prepared):
        calls.append(prepared.n)
        if len(calls) == 4:
            raise Killed
        return real_encode(self, prepared)

    monkeypatch.setattr(SentenceEncoder, "encode_prepared", encode)
    with pytest.raises(Killed):
        Database.build([corpus], tmp_path / "db", cfg, show_progress=False)
    (tmp_path / "db.partial" / "embeddings" / "00000.npy").unlink()
    calls.clear()
    db = Database.build([corpus], tmp_path / "db", dataclasses.replace(cfg, sort_shards=3), show_progress=False)
    assert db.store.n_chunks > 32 and calls[0] == 3 * 8  # shards 0, 3 and 4 in the first window
    monkeypatch.undo()
    ref = Database.build([corpus], tmp_path / "ref", cfg, show_progress=False)
    n = ref.store.n_chunks
    np.testing.assert_allclose(db.index.reconstruct(np.arange(n)), ref.index.reconstruct(np.arange(n)), atol=1e-5)


def test_resume_makes_a_damaged_staged_index_again(tmp_path, tiny_db_config, monkeypatch):
    """A staged index left truncated (a full disk that FAISS only printed about) is made again, not loaded forever."""
    import retrolm.db.build as build

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(6))
    monkeypatch.setattr(build, "save_config", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        Database.build([corpus], tmp_path / "db", tiny_db_config, show_progress=False)
    monkeypatch.undo()
    staged = tmp_path / "db.partial" / "index-v1.faiss"
    staged.write_bytes(staged.read_bytes()[:200])
    db = Database.build([corpus], tmp_path / "db", tiny_db_config, show_progress=False)
    assert db.index.ntotal == db.store.n_chunks and db.verify() > 0


# ------------------------------------------------------------------------------------------------ 5. integrity
@pytest.mark.parametrize("name", ["index", "segments/seg-000000/tokens.bin"])
def test_random_bytes_inside_a_file_are_caught_on_open(small_db, tmp_path, name):
    path = copy_db(small_db, tmp_path / "db")
    meta = json.loads((path / "meta.json").read_text())
    target = path / (meta["index"]["file"] if name == "index" else name)
    damage(target)
    with pytest.raises(RetrolmError) as exc:
        DatabaseView.open(path)
    assert str(exc.value).startswith(f"{target}: corrupt") and "\n" not in str(exc.value)


def test_format_1_database_still_opens_and_dense_search_refuses_impossible_scores(small_db, tmp_path):
    """A format-1 database (no checksums) opens; a damaged index then shows itself by impossible scores (4.7e37)."""
    path = copy_db(small_db, tmp_path / "db")
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    meta["format_version"] = 1
    meta["encoder"].pop("fingerprint")
    (path / "meta.json").write_text(json.dumps(meta))
    db = DatabaseView.open(path)
    assert db.verify() == 0
    text = db.chunk_texts([3])[0]
    assert search(db, text, k=1)[0].chunk_id == 3
    damage(path / meta["index"]["file"], n=2000)
    with pytest.raises(RetrolmError, match="impossible results"):
        search(DatabaseView.open(path), text, k=3)


# ------------------------------------------------------------------------------------------------ 6. a full disk
@pytest.mark.parametrize("where", ["segment", "shard", "index", "meta"])
def test_full_disk_during_add_loses_nothing(small_db, tmp_path, monkeypatch, where):
    """ENOSPC at each write of an add: the error names the file, the database keeps what it had and still opens, and
    the same add succeeds once there is room (resuming from the embeddings when they were done)."""
    import retrolm.db.chunks as chunks
    import retrolm.db.index as index_module

    path = copy_db(small_db, tmp_path / "db")
    before = Database.open(path)
    n_docs, files = before.store.n_docs, before.meta["files"]
    more = write_jsonl(tmp_path / "more.jsonl", wiki_docs(3, start=40))
    if where == "segment":
        monkeypatch.setattr(chunks, "open", FullFile, raising=False)
        expected = "/tokens.bin"
    elif where == "shard":
        monkeypatch.setattr(core_io._Unbuffered, "write", no_space)
        expected = "/encoder-ids/00000.ids.npy"  # the first shard written: the pre-tokenization stage's
    elif where == "index":
        monkeypatch.setattr(index_module, "open", FullFile, raising=False)
        expected = f"/.staging-add/index-v{before.meta['version'] + 1}.faiss"
    else:  # the commit point, after the new segment and index were moved in
        real = Path.write_bytes
        monkeypatch.setattr(Path, "write_bytes",
                            lambda self, data: no_space() if self.name.startswith(".meta.json.") else real(self, data))
        expected = f"{path}/meta.json"
    with pytest.raises(OSError) as exc:
        Database.open(path).add([more], show_progress=False)
    assert str(exc.value.filename).endswith(expected) and exc.value.strerror == "No space left on device"
    monkeypatch.undo()
    db = Database.open(path)  # still opens, with everything it had
    assert db.store.n_docs == n_docs and db.meta["files"] == files and db.verify() > 0
    assert not [p for p in path.rglob("*") if p.name.endswith(".tmp")]
    assert (path / ".staging-add").exists() == (where in ("index", "meta"))  # kept only when embeddings were done
    assert Database.open(path).add([more], show_progress=False)["docs_added"] == 3
    db = Database.open(path)
    assert db.store.n_docs == n_docs + 3 and not (path / ".staging-add").exists()
    assert sorted(p.name for p in (path / "segments").iterdir()) == db.meta["segments"]


def test_full_disk_during_compact_leaves_nothing_behind(small_db, tmp_path, monkeypatch):
    import retrolm.db.chunks as chunks

    path = copy_db(small_db, tmp_path / "db")
    db = Database.open(path)
    db.delete(doc_ids=db.store.doc_ids[:2], show_progress=False)
    meta = Database.open(path).meta
    monkeypatch.setattr(chunks, "open", FullFile, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        Database.open(path).compact(show_progress=False)
    monkeypatch.undo()
    assert not (path / ".staging-compact").exists()  # the partial copy would hold the space the user needs
    assert Database.open(path).meta == meta
    assert Database.open(path).compact(show_progress=False)["docs"] == 10


def test_search_on_a_database_with_nothing_left(tmp_path, tiny_db_config):
    """Every document deleted, then compacted away: every retriever answers "nothing", none raises."""
    db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(3))], tmp_path / "db", tiny_db_config,
                        show_progress=False)
    db.delete(match=".", show_progress=False)
    for retriever in ("dense", "bm25", "hybrid"):
        assert search(db, "a query", k=3, retriever=retriever) == []
    db.compact(show_progress=False)
    db = Database.open(tmp_path / "db")
    assert db.store.n_chunks == 0
    for retriever in ("dense", "bm25", "hybrid"):
        assert search(db, "a query", k=3, retriever=retriever) == [], retriever


# ------------------------------------------------------------------------------------------------ 8. smaller
def test_every_database_file_gets_the_umask_mode(tmp_path, tiny_db_config, monkeypatch):
    """Files are created with the mode ``open()`` would give (0644 under umask 022), not mkstemp's 0600."""
    monkeypatch.setattr(core_io, "FILE_MODE", 0o644)
    old = os.umask(0o022)
    try:
        db = Database.build([write_jsonl(tmp_path / "c.jsonl", wiki_docs(6))], tmp_path / "db", tiny_db_config,
                            show_progress=False)
        db.add([write_jsonl(tmp_path / "more.jsonl", wiki_docs(2, start=30))], show_progress=False)
        db.delete(doc_ids=[db.store.doc_ids[0]], show_progress=False)
        db.store_bm25(show_progress=False)
    finally:
        os.umask(old)
    files = [p for p in db.path.rglob("*") if p.is_file()]
    assert len(files) > 15
    assert {p.relative_to(db.path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o644} == {}


def test_exact_length_batches_change_the_batches_not_the_vectors(tmp_path, tiny_db_config, monkeypatch):
    """The build's default exact-length batches run mask-free forward passes (exact_length_batches=false runs none),
    sorting several shards together (sort_shards) changes the batches again, and every build stores the same
    vectors in the same shards."""
    import dataclasses

    from retrolm.text.encoder import SentenceEncoder

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(12))
    real = SentenceEncoder.embed_features
    seen: list[tuple[bool, int]] = []

    def spy(self, features, *a, **k):
        seen.append(("attention_mask" in features, len(features["input_ids"])))
        return real(self, features, *a, **k)

    monkeypatch.setattr(SentenceEncoder, "embed_features", spy)
    vecs, batches = {}, {}
    for exact, window in ((True, 1), (False, 1), (True, 3)):
        seen.clear()
        # encoder texts cut at 24 WordPieces: many chunks of one length, so full batches of one length exist
        cfg = dataclasses.replace(tiny_db_config, batch_size=4, shard_size=8, encoder_max_length=24,
                                  exact_length_batches=exact, exact_batch_min=2, sort_shards=window)
        db = Database.build([corpus], tmp_path / f"db-{exact}-{window}", cfg, show_progress=False)
        vecs[exact, window], batches[exact, window] = db.index.reconstruct(np.arange(db.store.n_chunks)), list(seen)
        assert db.store.n_chunks > 32  # at least 5 shards
    masked = {key: [m for m, _ in b] for key, b in batches.items()}
    assert not all(masked[True, 1]) and all(masked[False, 1])
    padded_rows = {key: sum(n for m, n in b if m) for key, b in batches.items()}
    assert padded_rows[True, 1] < padded_rows[False, 1] and batches[True, 3] != batches[True, 1]
    for key in ((False, 1), (True, 3)):
        np.testing.assert_allclose(vecs[key], vecs[True, 1], atol=1e-5)
