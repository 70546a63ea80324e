"""Fetching corpora from Debian packages: failures are one line that says what to do, and nothing is written."""

import pytest

import retrolm.text.sources as sources
from retrolm.core.errors import RetrolmError


def test_a_package_apt_cannot_find_suggests_updating_the_lists(tmp_path, monkeypatch):
    def apt_without_lists(cmd, cwd=None):
        raise RetrolmError(f"{' '.join(cmd[:3])}: failed (E: Couldn't find any package by regex '{cmd[-1]}')")

    monkeypatch.setattr(sources, "_run", apt_without_lists)
    with pytest.raises(RetrolmError) as e:
        sources.fetch_corpus("linux-docs-6.12", tmp_path)
    msg = str(e.value)
    assert "linux-doc-6.12" in msg and "apt-get update" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []
