"""Fetching corpora from Debian packages: failures are one line that says what to do, and nothing is written."""

import gzip
import json
from pathlib import Path

import pytest

import retrolm.text.sources as sources
from retrolm.core.errors import RetrolmError


def test_a_package_apt_cannot_find_suggests_updating_the_lists(tmp_path, monkeypatch):
    def apt_without_lists(cmd, cwd=None):
        raise RetrolmError(f"{' '.join(cmd[:3])}: failed (E: Couldn't find any package by regex '{cmd[-1]}')")

    monkeypatch.setattr(sources, "_run", apt_without_lists)
    monkeypatch.setattr(sources, "_can_update_apt", lambda: False)
    with pytest.raises(RetrolmError) as e:
        sources.fetch_corpus("linux-docs-6.12", tmp_path)
    msg = str(e.value)
    assert "linux-doc-6.12" in msg and "apt-get update" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def fake_apt(calls: list, versions: dict[str, str], fail_update: bool = False):
    """apt-get (update, download PACKAGE[=VERSION]) and dpkg over a mirror holding ``versions`` (package → the newest
    version, which the lists know only after an update; any pinned version is there too)."""
    updated = []

    def apt(cmd, cwd=None):
        calls.append(cmd[:3])
        if cmd[:2] == ["apt-get", "update"]:
            if fail_update:
                raise RetrolmError("apt-get update -qq: failed (Temporary failure resolving 'deb.debian.org')")
            updated.append(True)
        if cmd[:2] == ["apt-get", "download"]:
            package, _, version = cmd[-1].partition("=")
            if not version and not updated:
                raise RetrolmError(f"apt-get download {cmd[-1]}: failed (E: Couldn't find any package)")
            (cwd / f"{package}_{version or versions[package]}_all.deb").write_bytes(b"")
        if cmd[0] == "dpkg":  # an unpacked package with one document
            doc = Path(cmd[-1]) / "usr/share/doc/linux-doc-6.12/Documentation/a.rst.gz"
            doc.parent.mkdir(parents=True)
            with gzip.open(doc, "wt") as f:
                f.write("Title\n=====\n\nSome text.\n")

    return apt


@pytest.mark.parametrize("update_works", [True, False])
def test_as_root_the_lists_are_refreshed_once_before_the_first_download(tmp_path, monkeypatch, update_works):
    """The newest version the mirror has that day, not what stale lists last saw; offline, the lists there are."""
    calls = []
    monkeypatch.setattr(sources, "_run", fake_apt(calls, {"linux-doc-6.12": "6.12.2-1"}, fail_update=not update_works))
    monkeypatch.setattr(sources, "_can_update_apt", lambda: True)
    monkeypatch.setattr(sources, "_APT_UPDATED", False)
    if update_works:
        out = sources.fetch_corpus("linux-docs-6.12", tmp_path)
        rows = [json.loads(x) for x in Path(out).read_text().splitlines()]
        assert [r["id"] for r in rows] == ["6.12/Documentation/a.rst"]
        assert json.loads((tmp_path / "linux-docs-6.12.source.json").read_text())["package"] == \
            "linux-doc-6.12=6.12.2-1"
        sources.fetch_corpus("linux-docs-6.12", tmp_path, force=True)  # once per process
    else:
        with pytest.raises(RetrolmError, match="run `apt-get update` once"):
            sources.fetch_corpus("linux-docs-6.12", tmp_path)
    assert calls.count(["apt-get", "update", "-qq"]) == 1
    assert calls[:2] == [["apt-get", "update", "-qq"], ["apt-get", "download", "linux-doc-6.12"]]


def test_a_pinned_version_is_fetched_and_replaces_another_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "_run", fake_apt(calls, {"linux-doc-6.12": "6.12.2-1"}))
    monkeypatch.setattr(sources, "_can_update_apt", lambda: True)
    monkeypatch.setattr(sources, "_APT_UPDATED", False)
    record = tmp_path / "linux-docs-6.12.source.json"
    sources.fetch_corpus("linux-docs-6.12", tmp_path)
    assert json.loads(record.read_text())["package"] == "linux-doc-6.12=6.12.2-1"
    pins = {"linux-doc-6.12": "6.12.1-3"}
    sources.fetch_corpus("linux-docs-6.12", tmp_path, pins=pins)  # the file holds another version: fetched again
    assert json.loads(record.read_text())["package"] == "linux-doc-6.12=6.12.1-3"
    assert ["apt-get", "download", "linux-doc-6.12=6.12.1-3"] in calls
    n = len(calls)
    sources.fetch_corpus("linux-docs-6.12", tmp_path, pins=pins)  # the pinned version is there: kept
    assert len(calls) == n
    # a sampled fetch is not the whole corpus: another --sample (or none) fetches again, the same one keeps it
    sources.fetch_corpus("linux-docs-6.12", tmp_path, pins=pins, sample=1)
    assert json.loads(record.read_text())["sample"] == 1 and len(calls) > n
    n = len(calls)
    sources.fetch_corpus("linux-docs-6.12", tmp_path, pins=pins, sample=1)
    assert len(calls) == n
    sources.fetch_corpus("linux-docs-6.12", tmp_path, pins=pins)
    assert json.loads(record.read_text())["sample"] is None and len(calls) > n
    with pytest.raises(RetrolmError, match="--sample must be a positive number of documents, got -5"):
        sources.fetch_corpus("linux-docs-6.12", tmp_path, sample=-5)
    # a file cut short (copied in part, a full disk) is not "already fetched": its size is not the recorded one
    out = tmp_path / "linux-docs-6.12.jsonl"
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) // 2])
    n = len(calls)
    sources.fetch_corpus("linux-docs-6.12", tmp_path)
    assert len(calls) > n and out.read_bytes() == whole
    # a damaged record says how to go on; an --out that is a file is refused before any download
    record.write_text("[]")
    with pytest.raises(RetrolmError, match=r"source.json: corrupt corpus record \(not a JSON object\); fetch again "
                                           r"with --force"):
        sources.fetch_corpus("linux-docs-6.12", tmp_path)
    n = len(calls)
    with pytest.raises(RetrolmError, match=r"--out .*linux-docs-6.12.jsonl: not a folder"):
        sources.fetch_corpus("linux-docs-6.12", out)
    assert len(calls) == n


def test_bad_pins_are_one_line_errors(tmp_path, capsys):
    from conftest import run_cli

    rc, _, err = run_cli(["corpus", "fetch", "linux-docs-6.1", "--out", tmp_path, "--pin", "linux-doc-6.1"], capsys)
    assert rc != 0 and "expected PACKAGE=VERSION" in err and len(err.strip().splitlines()) == 1


def test_a_sample_is_spread_over_the_whole_corpus(tmp_path, monkeypatch):
    """A step of len // sample is 1 once sample > len / 2: --sample 6000 of 10,033 documents kept the first 6,000."""
    def ten(work):
        return iter([{"id": str(i), "text": f"document {i}"} for i in range(10)]), "fake=1"

    monkeypatch.setitem(sources.SOURCES, "fake", ten)
    for sample, ids in ((6, [0, 1, 3, 5, 6, 8]), (3, [0, 3, 6]), (20, list(range(10)))):
        out = sources.fetch_corpus("fake", tmp_path / str(sample), sample=sample)
        assert [int(json.loads(x)["id"]) for x in out.read_text().splitlines()] == ids
