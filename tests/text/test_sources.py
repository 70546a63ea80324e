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


@pytest.mark.parametrize("update_helps", [True, False])
def test_as_root_the_lists_are_refreshed_once_and_the_download_retried(tmp_path, monkeypatch, update_helps):
    calls = []

    def apt(cmd, cwd=None):
        calls.append(cmd[:3])
        if cmd[:2] == ["apt-get", "download"] and not (update_helps and ["apt-get", "update", "-qq"] in calls):
            raise RetrolmError(f"apt-get download {cmd[-1]}: failed (E: Couldn't find any package)")
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / f"{cmd[-1]}_6.12.1-1_all.deb").write_bytes(b"")
        if cmd[0] == "dpkg":  # an unpacked package with one document
            doc = Path(cmd[-1]) / "usr/share/doc/linux-doc-6.12/Documentation/a.rst.gz"
            doc.parent.mkdir(parents=True)
            with gzip.open(doc, "wt") as f:
                f.write("Title\n=====\n\nSome text.\n")

    monkeypatch.setattr(sources, "_run", apt)
    monkeypatch.setattr(sources, "_can_update_apt", lambda: True)
    monkeypatch.setattr(sources, "_APT_UPDATED", False)
    if update_helps:
        out = sources.fetch_corpus("linux-docs-6.12", tmp_path)
        rows = [json.loads(x) for x in Path(out).read_text().splitlines()]
        assert [r["id"] for r in rows] == ["6.12/Documentation/a.rst"]
    else:
        with pytest.raises(RetrolmError, match="even after apt-get update"):
            sources.fetch_corpus("linux-docs-6.12", tmp_path)
    assert calls.count(["apt-get", "update", "-qq"]) == 1
    assert calls[:3] == [["apt-get", "download", "linux-doc-6.12"], ["apt-get", "update", "-qq"],
                         ["apt-get", "download", "linux-doc-6.12"]]
