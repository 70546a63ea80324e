"""Everything a user can pass wrong: one line ``error: <file or option>: <problem>``, exit status 2, no traceback, and
nothing already written lost (issue 9, "a clean bad-input record", items 4 to 8, through the command line)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FullFile, assert_one_line_error, no_space, run_cli, wiki_docs, write_jsonl
from retrolm.db import DatabaseView


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def db_copy(built_db, tmp_path) -> Path:
    return Path(shutil.copytree(built_db.path, tmp_path / "db"))


@pytest.fixture(scope="module")
def retro_checkpoint(built_db, tmp_path_factory) -> Path:
    """An untrained tiny RETRO checkpoint that records ``built_db`` as its training database."""
    from retrolm.core.io import write_json
    from retrolm.models import RetroModel
    from retrolm.models.retro import RetroConfig
    from retrolm.train.trainer import database_record

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = RetroConfig.preset("tiny", vocab_size=built_db.tokenizer.vocab_size, chunk_len=built_db.chunk_len,
                             seq_len=2 * built_db.chunk_len, num_neighbours=2)
    RetroModel(cfg).save_pretrained(folder)
    built_db.tokenizer.save(folder / "tokenizer.json")
    write_json(folder / "database.json", database_record(built_db))
    return folder


# ------------------------------------------------------------------------------------------------ 4. corpus paths
def test_the_same_corpus_file_twice_is_refused(tmp_path, tiny_encoder, db_copy, capsys):
    docs = wiki_docs(3)
    a = write_jsonl(tmp_path / "c" / "a.jsonl", docs)
    out = tmp_path / "new"
    common = ["--out", out, "--encoder", tiny_encoder, "--tokenizer", "train:300", "-q"]
    for corpus in ([a, a], [a, tmp_path / "c" / ".." / "c" / "a.jsonl"], [tmp_path / "c", a]):
        rc, _, err = run_cli(["db", "build", *corpus, *common], capsys)
        assert_one_line_error(rc, err, "a.jsonl", "corpus file given twice")
    # the same ids in two different files: refused like duplicates within one file
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": docs[1]["id"], "text": "Another text under a taken id."}])
    rc, _, err = run_cli(["db", "build", a, b, *common], capsys)
    assert_one_line_error(rc, err, f"{b}:1", "duplicate document id", repr(docs[1]["id"]))
    assert not out.exists() and not (tmp_path / "new.partial").exists()
    for spec in ("train:299", "train:abc", f"train:{2**64}"):  # the last was an OverflowError after the corpus read
        rc, _, err = run_cli(["db", "build", a, "--out", out, "--encoder", tiny_encoder, "--tokenizer", spec], capsys)
        assert_one_line_error(rc, err, repr(spec), "vocabulary size 300 <= N <= 16,777,216")

    more = write_jsonl(tmp_path / "more.jsonl", wiki_docs(2, start=300))
    before = snapshot(db_copy)
    rc, _, err = run_cli(["db", "add", db_copy, more, more, "-q"], capsys)
    assert_one_line_error(rc, err, "more.jsonl", "corpus file given twice")
    rc, _, err = run_cli(["db", "add", db_copy, more, write_jsonl(tmp_path / "m2.jsonl", wiki_docs(1, start=300)),
                          "-q"], capsys)
    assert_one_line_error(rc, err, "m2.jsonl:1", "duplicate document id")
    after = snapshot(db_copy)
    after.pop(".lock", None)
    before.pop(".lock", None)
    assert after == before  # and no .staging-add/ left behind


# ------------------------------------------------------------------------------------------------ 5. integrity
def test_damaged_files_are_one_line_errors(db_copy, capsys):
    rc, out, err = run_cli(["db", "info", db_copy, "--verify", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["verified_files"] == len(json.loads((db_copy / "meta.json").read_text())["files"])
    meta = json.loads((db_copy / "meta.json").read_text())
    for rel in (meta["index"]["file"], "segments/seg-000000/tokens.bin"):
        target = db_copy / rel
        good = target.read_bytes()
        with open(target, "r+b") as f:  # 2,000 random bytes inside, same size
            f.seek(len(good) // 3)
            f.write(np.random.default_rng(0).bytes(2000))
        for cmd in (["db", "search", db_copy, "some query"], ["db", "info", db_copy, "--verify"]):
            rc, out, err = run_cli(cmd, capsys)
            assert_one_line_error(rc, err, f"{target}: corrupt")
            assert out == ""
        target.write_bytes(good)


# ------------------------------------------------------------------------------------------------ 6. tracebacks
def test_disk_full_during_build_names_the_file_and_keeps_the_old_database(db_copy, tmp_path, monkeypatch, capsys):
    import retrolm.db.chunks as chunks

    n_docs = DatabaseView.open(db_copy).store.n_docs
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(5, start=100))
    monkeypatch.setattr(chunks, "open", FullFile, raising=False)
    rc, _, err = run_cli(["db", "build", corpus, "--out", db_copy, "--overwrite", "--encoder",
                          DatabaseView.open(db_copy).meta["encoder"]["name"], "--tokenizer", "train:300", "-q"], capsys)
    line = assert_one_line_error(rc, err, "tokens.bin: No space left on device")
    assert line.startswith(f"error: {tmp_path}/db.partial/")
    monkeypatch.undo()
    assert DatabaseView.open(db_copy).store.n_docs == n_docs  # the database being replaced is intact
    assert not (tmp_path / "db.partial").exists()  # nothing half-made left to fill the disk


def test_disk_full_during_add_names_the_file_and_loses_nothing(db_copy, tmp_path, monkeypatch, capsys):
    from retrolm.core import io as core_io

    before = DatabaseView.open(db_copy)
    more = write_jsonl(tmp_path / "more.jsonl", wiki_docs(3, start=100))

    monkeypatch.setattr(core_io._Unbuffered, "write", no_space)  # the embedding shard's write
    rc, _, err = run_cli(["db", "add", db_copy, more, "-q"], capsys)
    assert_one_line_error(rc, err, f"{db_copy}/.staging-add/encoder-ids/00000.ids.npy: No space left on device")
    monkeypatch.undo()
    after = DatabaseView.open(db_copy)
    assert after.meta == before.meta and after.verify() > 0 and not (db_copy / ".staging-add").exists()
    rc, out, err = run_cli(["db", "add", db_copy, more, "-q"], capsys)
    assert rc == 0 and "added 3 documents" in out, err


def test_bm25_search_of_a_database_with_nothing_left(tmp_path, tiny_encoder, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(2))
    db = tmp_path / "db"
    assert run_cli(["db", "build", corpus, "--out", db, "--encoder", tiny_encoder, "--tokenizer", "train:300",
                    "-q"], capsys)[0] == 0
    assert run_cli(["db", "delete", db, "--match", ".", "-q"], capsys)[0] == 0
    for step in ("deleted", "compacted"):
        for flags in (["--bm25"], ["--retriever", "hybrid"], ["--retriever", "dense"]):
            rc, out, err = run_cli(["db", "search", db, "number", *flags], capsys)
            assert (rc, out.strip()) == (0, "no results"), (step, flags, err)
        assert run_cli(["db", "compact", db, "-q"], capsys)[0] == 0


# ------------------------------------------------------------------------------------------------ 7. nonsense
@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_search_query_is_refused(built_db, query, capsys):
    rc, out, err = run_cli(["db", "search", built_db.path, query], capsys)
    assert_one_line_error(rc, err, "query is empty")
    assert out == ""


@pytest.mark.parametrize(("args", "message"), [
    (["-k", "0", "--prompt", "Hello"], "neighbours must be in 1..1000, got 0"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "  \n"], "prompt is empty"),
])
def test_generate_refuses_nonsense_options(retro_checkpoint, built_db, args, message, capsys):
    rc, out, err = run_cli(["generate", "--checkpoint", retro_checkpoint, "--db", built_db.path, *args], capsys)
    assert_one_line_error(rc, err, message)
    assert out == ""


@pytest.fixture
def other_encoder_db(built_db, tmp_path) -> Path:
    """A copy of ``built_db`` that says another encoder made its keys (what check_trained_with compares)."""
    path = Path(shutil.copytree(built_db.path, tmp_path / "other-db"))
    meta = json.loads((path / "meta.json").read_text())
    meta["encoder"].update(name="/models/another-encoder", fingerprint="0" * 64)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_generate_and_eval_refuse_a_database_of_another_encoder(retro_checkpoint, other_encoder_db, tmp_path,
                                                                 capsys):
    rc, out, err = run_cli(["generate", "--checkpoint", retro_checkpoint, "--db", other_encoder_db,
                            "--prompt", "Hello"], capsys)
    assert_one_line_error(rc, err, str(other_encoder_db), "trained with neighbours from encoder")
    assert out == ""
    held_out = write_jsonl(tmp_path / "held.jsonl", wiki_docs(2, start=300))
    rc, _, err = run_cli(["eval", "--checkpoint", retro_checkpoint, "--db", other_encoder_db, "--data", held_out,
                          "--out", tmp_path / "eval", "-q"], capsys)
    assert_one_line_error(rc, err, str(other_encoder_db), "encoder")


def test_outputs_never_go_into_a_database_a_checkpoint_or_a_run(retro_checkpoint, db_copy, tmp_path, capsys):
    """eval --out CHECKPOINT replaced its config.yaml (its checksums then failed and training could not resume);
    --out DB wrote reports into the database; train out_dir=DB put checkpoints where db build --overwrite deletes
    them; an empty out_dir wrote into the working directory."""
    held_out = write_jsonl(tmp_path / "held.jsonl", wiki_docs(2, start=300))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    before = {p: p.read_bytes() for p in Path(retro_checkpoint).iterdir()}
    for out, holds in ((retro_checkpoint, "a model checkpoint"), (db_copy, "a retrolm database"),
                       (run, "a training run")):
        rc, _, err = run_cli(["eval", "--checkpoint", retro_checkpoint, "--db", db_copy, "--data", held_out,
                              "--out", out, "-q"], capsys)
        assert_one_line_error(rc, err, f"{out}: {holds}; eval / scale would write its files into it")
    assert {p: p.read_bytes() for p in Path(retro_checkpoint).iterdir()} == before
    rc, _, err = run_cli(["train", f"db={db_copy}", f"out_dir={db_copy}"], capsys)
    assert_one_line_error(rc, err, f"{db_copy}: a retrolm database; train would write its files into it")
    rc, _, err = run_cli(["train", f"db={db_copy}", "out_dir="], capsys)
    assert_one_line_error(rc, err, "train: no output folder given (out_dir is empty)")
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(["rag-eval", "--db", db_copy, "--data", held_out, "--out", tmp_path / "afile"], capsys)
    assert_one_line_error(rc, err, "afile: rag-eval writes a folder here, and this is a file")


# ------------------------------------------------------------------------------------------------ 8. smaller
def test_bm25_search_is_read_only_and_quiet(db_copy, capsys, caplog):
    before = snapshot(db_copy)
    with caplog.at_level(logging.DEBUG):
        rc, out, err = run_cli(["db", "search", db_copy, "the number zero", "--bm25", "-k", "2", "--json"], capsys)
    assert rc == 0 and len(json.loads(out)) == 2, err
    assert snapshot(db_copy) == before  # no cache, no lock file, nothing written
    assert "DEBUG" not in err and not [r for r in caplog.records if r.name.startswith("bm25s")]


def test_ingestion_warnings_print_once_with_a_trained_tokenizer(tmp_path, tiny_encoder, capsys, caplog):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, wiki_docs(3))
    with open(corpus, "a") as f:
        f.write("{not json\n" + json.dumps({"id": "no-text"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="retrolm.text.corpus"):
        rc, _, err = run_cli(["db", "build", corpus, "--out", tmp_path / "db", "--encoder", tiny_encoder,
                              "--tokenizer", "train:300", "-q"], capsys)
    assert rc == 0, err
    messages = [r.getMessage() for r in caplog.records if r.name == "retrolm.text.corpus"]
    assert sorted(messages) == sorted([f"skipping {corpus}:4: invalid JSON (Expecting property name enclosed in "
                                       "double quotes)",
                                       f"skipping {corpus}:5: record has no string 'text' or 'contents' field"])


def test_corrupt_index_error_comes_first(db_copy, capsys, caplog):
    """A format-1 database (no checksums) with a truncated index: the error is the first thing said (the fallback
    from a memory-mapped read used to print an INFO line first)."""
    meta = json.loads((db_copy / "meta.json").read_text())
    del meta["files"]
    meta["format_version"] = 1
    (db_copy / "meta.json").write_text(json.dumps(meta))
    index = db_copy / meta["index"]["file"]
    index.write_bytes(index.read_bytes()[:3000])
    with caplog.at_level(logging.INFO):
        rc, _, err = run_cli(["db", "search", db_copy, "the number zero"], capsys)
    assert_one_line_error(rc, err, str(index), "corrupt")
    assert err.splitlines()[0].startswith("error: ")
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("retrolm")]


def test_failed_add_leaves_no_staging_folder(db_copy, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "text": "one"}, {"id": "x", "text": "two"}])
    rc, _, err = run_cli(["db", "add", db_copy, bad, "-q"], capsys)
    assert_one_line_error(rc, err, "bad.jsonl:2", "duplicate document id")
    taken = write_jsonl(tmp_path / "taken.jsonl", wiki_docs(1))
    rc, _, err = run_cli(["db", "add", db_copy, taken, "-q"], capsys)
    assert_one_line_error(rc, err, "already in", "--replace")
    assert not (db_copy / ".staging-add").exists()


def test_a_long_single_line_document_is_tokenized_in_pieces(built_db, monkeypatch):
    """A one-line document of megabytes reaches the Rust tokenizer (and the BPE trainer) in pieces of at most
    PIECE_CHARS characters (a 20 MB one took 3.4 GB to encode whole and 1.7 GB to train on), with the same ids."""
    from retrolm.text import tokenizer as tok_module

    text = " ".join(d["text"] for d in wiki_docs(400)).replace("\n", " ")
    assert len(text) > 3 * tok_module.PIECE_CHARS
    lm = built_db.tokenizer
    whole = lm.tok.encode(text, add_special_tokens=False).ids
    seen: list[int] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(lm.tok, name)

        def encode(self, t, **kw):
            seen.append(len(t))
            return lm.tok.encode(t, **kw)

        def encode_batch(self, ts, **kw):
            seen.extend(map(len, ts))
            return lm.tok.encode_batch(ts, **kw)

    spied = tok_module.LMTokenizer(lm.tok, lm.name)
    spied.tok = Spy()
    short = "A short one."
    got = spied.encode_batch([short, text])
    assert list(got[1]) == whole and list(got[0]) == lm.encode(short) and spied.encode(text) == whole
    assert max(seen) <= tok_module.PIECE_CHARS and len(seen) > 6

    trained_on: list[int] = []
    real_pieces = tok_module._pieces

    def spy_pieces(t: str, *args) -> list[str]:
        out = real_pieces(t, *args)
        trained_on.extend(map(len, out))
        return out

    monkeypatch.setattr(tok_module, "_pieces", spy_pieces)
    pieces = tok_module.train_bpe([text], 400)
    assert trained_on and max(trained_on) <= tok_module.PIECE_CHARS
    assert pieces.sha256 == train_bpe_whole(text, 400).sha256  # the same vocabulary and merges as on the whole text


def test_a_tokenizer_that_marks_the_start_of_a_text_encodes_a_long_one_whole():
    """A Llama-2-style tokenizer.json prepends "▁" to the text it is given: encoded in pieces, a long text gained a
    space at every cut. Such a tokenizer gets the text whole (a byte-level one still gets pieces, test above)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    from retrolm.text import tokenizer as tok_module

    text = " ".join(d["text"] for d in wiki_docs(400)).replace("\n", " ")
    assert len(text) > 3 * tok_module.PIECE_CHARS
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator([text[:100_000]], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                                                  show_progress=False))
    lm = tok_module.LMTokenizer(tok, "llama-style")
    whole = tok.encode(text, add_special_tokens=False).ids
    assert lm.encode(text) == whole and list(lm.encode_batch(["short", text])[1]) == whole
    from retrolm.eval.incontext import encode_with_offsets

    ids, starts = encode_with_offsets(lm, text)  # the in-context scorer's encoding: the same ids, in order
    assert ids == whole and starts == sorted(starts) and len(starts) == len(ids)


def train_bpe_whole(text: str, vocab_size: int):
    """``train_bpe`` as it was: the trainer gets the text whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from retrolm.text.tokenizer import EOS_TOKEN, PAD_TOKEN, LMTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return LMTokenizer(tok, f"bpe-trained-{vocab_size}")


# ------------------------------------------------------------------------------- configs, overrides, side files
def test_config_files_and_overrides_that_are_not_settings(tmp_path, built_db, capsys):
    """A YAML that is a list, a number or not text, and an override whose value is not YAML: one line each."""
    common = ["train", f"db={built_db.path}", f"out_dir={tmp_path / 'run'}"]
    for name, content, message in [("list.yaml", b"- a\n", "expected a mapping of settings"),
                                   ("number.yaml", b"42\n", "expected a mapping of settings"),
                                   ("binary.yaml", b"\xff\xfe\x00\x01", "not a UTF-8 text file")]:
        (tmp_path / name).write_bytes(content)
        rc, _, err = run_cli([*common, "--config", tmp_path / name], capsys)
        assert_one_line_error(rc, err, name, message)
    for bad in ("model.retro_layers=[1,", "steps={"):
        rc, _, err = run_cli([*common, bad], capsys)
        assert_one_line_error(rc, err, f"override {bad!r}: invalid value")
    assert not (tmp_path / "run").exists()


def test_db_build_takes_key_value_overrides_after_the_corpus(tmp_path, tiny_encoder, monkeypatch, capsys):
    """The corpus list took every argument, so `db build C -o X tokenizer=train:300` (the help's own example form)
    failed with "corpus path does not exist"."""
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(4))
    out = tmp_path / "db"
    rc, _, err = run_cli(["db", "build", corpus, "-o", out, "--encoder", tiny_encoder, "-q", "tokenizer=train:300",
                          "encoder_max_length=32"], capsys)
    assert rc == 0, err
    db = DatabaseView.open(out)
    assert db.tokenizer.vocab_size <= 300 and db.meta["encoder"]["max_length"] == 32
    rc, _, err = run_cli(["db", "build", "-o", tmp_path / "x", "tokenizer=train:300"], capsys)
    assert_one_line_error(rc, err, "no corpus path given")
    # a value holding a path (its last part has no '=')
    rc, _, err = run_cli(["db", "build", corpus, "-o", tmp_path / "db2", "--encoder", tiny_encoder, "-q",
                          f"tokenizer={out / 'tokenizer.json'}"], capsys)
    assert rc == 0, err
    assert DatabaseView.open(tmp_path / "db2").tokenizer.sha256 == db.tokenizer.sha256
    # the current directory would vanish under the shell when the finished build is renamed into place
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    rc, _, err = run_cli(["db", "build", corpus, "-o", ".", "--encoder", tiny_encoder, "-q"], capsys)
    assert_one_line_error(rc, err, "is the current directory")


def test_a_database_named_dot_adding_itself_and_a_damaged_meta(db_copy, monkeypatch, capsys):
    monkeypatch.chdir(db_copy)
    rc, out, err = run_cli(["db", "info", "."], capsys)
    assert rc == 0 and "num_chunks" in out, err
    rc, _, err = run_cli(["db", "add", ".", "."], capsys)
    assert_one_line_error(rc, err, "is the database", "add another corpus")
    meta = json.loads((db_copy / "meta.json").read_text())
    for field, value, message in [("chunk_len", None, "no 'chunk_len'"),
                                  ("chunk_len", "64", "'chunk_len' is not a int"),
                                  ("files", [1], "'files' is not a dict")]:
        broken = {k: v for k, v in meta.items() if k != field} if value is None else {**meta, field: value}
        (db_copy / "meta.json").write_text(json.dumps(broken))
        rc, _, err = run_cli(["db", "info", db_copy], capsys)
        assert_one_line_error(rc, err, "meta.json: damaged database description", message)


def test_checkpoint_side_files_of_the_wrong_shape(retro_checkpoint, built_db, tmp_path, capsys):
    ckpt = Path(shutil.copytree(retro_checkpoint, tmp_path / "ckpt"))
    common = ["generate", "--checkpoint", ckpt, "--db", built_db.path, "--prompt", "Some prompt"]
    (ckpt / "database.json").write_text("[1]")
    rc, _, err = run_cli(common, capsys)
    assert_one_line_error(rc, err, "database.json: corrupt database record (expected a JSON object")
    (ckpt / "model.json").write_text("[1]")
    rc, _, err = run_cli(common, capsys)
    assert_one_line_error(rc, err, "model.json: corrupt model description")
    ckpt = Path(shutil.copytree(retro_checkpoint, tmp_path / "no-tokenizer"))
    (ckpt / "tokenizer.json").unlink()
    rc, _, err = run_cli(["generate", "--checkpoint", ckpt, "--db", built_db.path, "--prompt", "Some prompt"], capsys)
    assert_one_line_error(rc, err, f"{ckpt}: checkpoint has no tokenizer.json")
    assert "--tokenizer" not in err  # generate has no such option: the message blamed one


def test_binary_question_files_bad_environment_and_empty_questions(tmp_path, db_copy, monkeypatch, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(b"\xff\xfe\x00binary")
    rc, _, err = run_cli(["rag-eval", "--db", db_copy, "--data", qa, "--reader", tmp_path, "--out", tmp_path / "o"],
                         capsys)
    assert_one_line_error(rc, err, "qa.jsonl:1: not UTF-8 text")
    monkeypatch.setenv("RETROLM_LOG", "verbose")
    rc, _, err = run_cli(["db", "info", db_copy], capsys)
    assert_one_line_error(rc, err, "RETROLM_LOG='verbose': not a log level")
    monkeypatch.delenv("RETROLM_LOG")
    monkeypatch.setenv("RETROLM_LOCK_TIMEOUT", "abc")
    rc, _, err = run_cli(["db", "delete", db_copy, "--doc-id", "x"], capsys)
    assert_one_line_error(rc, err, "RETROLM_LOCK_TIMEOUT='abc': expected a number of seconds")
    monkeypatch.delenv("RETROLM_LOCK_TIMEOUT")
    # a relative folder that does not exist is a missing folder, never a model-hub name
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["realm", "eval", "--checkpoint", "./nonexist", "--db", db_copy, "--data", qa, "--out",
                          tmp_path / "r"], capsys)
    assert_one_line_error(rc, err, "./nonexist", "not found")


def test_counts_and_sweeps_that_ask_for_nothing(tmp_path, built_db, capsys):
    """-n -1 built 2 questions, --per-bucket -1 was accepted, --ks "," ran the default sweep."""
    rc, _, err = run_cli(["corpus", "qa", "wiki-entity", "--corpus", tmp_path / "w.jsonl", "--out", tmp_path / "q",
                          "-n", "-1"], capsys)
    assert_one_line_error(rc, err, "-n -1: the number of questions must be >= 1")
    rc, _, err = run_cli(["corpus", "versions", "--old", tmp_path, "--new", tmp_path, "--out", tmp_path / "v",
                          "--per-bucket", "-1"], capsys)
    assert_one_line_error(rc, err, "--per-bucket and --min-chars must be >= 0")
    rc, _, err = run_cli(["corpus", "versions", "--old", tmp_path, "--new", tmp_path, "--out", tmp_path / "v",
                          "--seed", "-1"], capsys)
    assert_one_line_error(rc, err, "--seed must be in 0..2**63-1, got -1")
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(4))
    rc, _, err = run_cli(["corpus", "split", corpus, "--out", tmp_path / "sp", "--seed", "-1"], capsys)
    assert_one_line_error(rc, err, "--seed must be in 0..2**63-1, got -1")
    rc, _, err = run_cli(["db", "info", corpus], capsys)
    assert_one_line_error(rc, err, "c.jsonl: a file, not a database folder")
    rc, _, err = run_cli(["scale", "neighbours", "--checkpoint", tmp_path, "--db", built_db.path, "--data",
                          tmp_path / "h.jsonl", "--out", tmp_path / "s", "--ks", ","], capsys)
    assert_one_line_error(rc, err, "','", "expected comma-separated numbers")


def test_settings_out_of_range_are_refused_before_any_work(tmp_path, built_db, capsys):
    """Each of these was a traceback, ran for minutes, or failed after training with the wrong advice."""
    held = write_jsonl(tmp_path / "h.jsonl", wiki_docs(1, start=300))
    common = ["--checkpoint", tmp_path, "--db", built_db.path, "--data", held, "--out", tmp_path / "s"]
    for args, message in [
        (["scale", "db-size", *common, "--fractions", "0.5,nan"], "database fractions must be in (0, 1]"),
        (["scale", "neighbours", *common, "--ks", "2,100000"], "neighbour counts must be in 1..1000"),
        (["eval", *common, "-k", "100000"], "neighbours must be in 1..1000, got 100000"),
        (["generate", "--checkpoint", tmp_path, "--db", built_db.path, "--prompt", "Hi", "-k", "100000"],
         "number of neighbours must be in 1..1000"),
        (["train", f"db={built_db.path}", f"out_dir={tmp_path / 'r'}", "num_neighbours=5000"],
         "num_neighbours must be at most 1000"),
        (["train", f"db={built_db.path}", f"out_dir={tmp_path / 'r'}", "lr=inf"], "lr must be > 0"),
        (["train", f"db={built_db.path}", f"out_dir={tmp_path / 'r'}", "min_lr=nan"], "lr must be > 0"),
        (["knowledge", "--data", tmp_path, "--out", tmp_path / "k", "device=gpu"], "gpu"),
        (["knowledge", "--data", tmp_path, "--out", tmp_path / "k", "finetune.weight_decay=-1"],
         "finetune: weight_decay must be >= 0, got -1.0"),
    ]:
        rc, _, err = run_cli(args, capsys)
        assert_one_line_error(rc, err, message)
    assert not (tmp_path / "r").exists()


def test_usage_errors_exit_2_without_a_traceback(capsys):
    """typer >= 0.29 bundles its own click, whose exceptions are not click's: an unknown option was a traceback."""
    for args, message in [(["db", "search", "nodb", "q", "--k", "3"], "No such option: --k"),
                          (["corpus", "versions", "--old", "a"], "Missing option '--new'")]:
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and message in err and "Traceback" not in err, err


def test_overwrite_replaces_only_a_database_and_never_what_it_reads(db_copy, tmp_path, capsys):
    """``--overwrite`` swaps the whole folder away: a folder whose meta.json is not a database's, and corpus files
    kept inside the database folder, would have been deleted with it."""
    enc = ["--encoder", DatabaseView.open(db_copy).meta["encoder"]["name"], "--tokenizer", "train:300", "-q"]
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_docs(3, start=100))
    project = tmp_path / "project"
    project.mkdir()
    (project / "meta.json").write_text('{"name": "my project"}')
    (project / "notes.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(["db", "build", corpus, "--out", project, *extra, *enc], capsys)
        assert_one_line_error(rc, err, f"{project}: folder exists and is not a retrolm database")
    assert (project / "notes.txt").read_text() == "precious"
    inside = db_copy / "mycorpus"
    inside.mkdir()
    kept = write_jsonl(inside / "c.jsonl", wiki_docs(3, start=100))
    rc, _, err = run_cli(["db", "build", inside, "--out", db_copy, "--overwrite", *enc], capsys)
    assert_one_line_error(rc, err, f"{inside}: is inside the database folder {db_copy} that the build replaces")
    assert kept.is_file()
    # a database whose meta.json is damaged is rebuilt with --overwrite (and only with it)
    (db_copy / "meta.json").write_text("[1]")
    rc, _, err = run_cli(["db", "build", corpus, "--out", db_copy, *enc], capsys)
    assert_one_line_error(rc, err, f"{db_copy}/meta.json: damaged database description; --overwrite rebuilds")
    rc, _, err = run_cli(["db", "build", corpus, "--out", db_copy, "--overwrite", *enc], capsys)
    assert rc == 0, err
    assert DatabaseView.open(db_copy).store.n_docs == 3


def test_search_shows_database_text_as_text_and_bounds_k(db_copy, tmp_path, capsys):
    doc = {"id": "brackets[/note]", "text": "x = a[i] and [citation needed] plus [red]warn[/red] [/note] quasar zebra"}
    rc, _, err = run_cli(["db", "add", db_copy, write_jsonl(tmp_path / "b.jsonl", [doc]), "-q"], capsys)
    assert rc == 0, err
    rc, out, err = run_cli(["db", "search", db_copy, "quasar zebra", "--bm25", "-k", "1"], capsys)
    assert rc == 0, err
    flat = " ".join(out.replace("│", " ").split())
    for word in ("a[i]", "[citation", "needed]", "[red]warn[/red]", "[/note]", "brackets[/note]"):  # words wrap
        assert word in flat.split(), word
    rc, _, err = run_cli(["db", "search", db_copy, "quasar", "-k", "10000000000"], capsys)
    assert_one_line_error(rc, err, "search: -k must be in 1..100,000, got 10000000000")
    rc, _, err = run_cli(["db", "search", db_copy, "quasar", "--bm25", "--retriever", "dense"], capsys)
    assert_one_line_error(rc, err, "search: --bm25 and --retriever dense contradict each other")
