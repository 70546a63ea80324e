"""Model references: local folders, packaged models found without importing their package, hub names, short names."""

from __future__ import annotations

import sys

import pytest

from retrolm.core.errors import RetrolmError
from retrolm.core.hub import PackagedModel, find_checkpoint, looks_like_path, packaged_model_path, resolve_model


def test_local_folders_resolve_to_one_absolute_name(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    refs = [resolve_model(r) for r in ("m", "./m", "m/", str(model), str(model) + "/")]
    assert {r.name for r in refs} == {str(model)} and all(r.local for r in refs)
    with pytest.raises(RetrolmError, match="must be a folder"):
        resolve_model(str(model / "config.json"))


def test_missing_paths_are_errors_and_hub_names_pass_through(tmp_path):
    for ref in ("./nope", "/no/such/folder", "../x", "~/missing-model", "a/b/c"):
        assert looks_like_path(ref)
        with pytest.raises(RetrolmError, match="folder not found"):
            resolve_model(ref)
    ref = resolve_model("some-org/some-model")
    assert (ref.name, ref.path, ref.local) == ("some-org/some-model", "some-org/some-model", False)
    assert not looks_like_path("gpt2") and not looks_like_path("org/name-1.5")
    with pytest.raises(RetrolmError, match="empty"):
        resolve_model("  ")


def test_packaged_models_are_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_model_pkg"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package needs its heavy dependencies')\n")
    (pkg / "weights" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert packaged_model_path(PackagedModel("org/fake", "fake_model_pkg", "fake-model-pkg")) == pkg / "weights"
    assert packaged_model_path(PackagedModel("org/absent", "absent_pkg_xyz", "absent")) is None
    with pytest.raises(RetrolmError, match="missing from the installed package"):
        packaged_model_path(PackagedModel("org/g", "fake_model_pkg", "fake-model-pkg", gguf_file="m.gguf"))
    assert "fake_model_pkg" not in sys.modules


def test_the_offline_defaults_have_short_names():
    minilm = resolve_model("minilm")
    assert minilm.name == "sentence-transformers/all-MiniLM-L6-v2" and minilm.local  # the test setup installs it
    assert resolve_model("MiniLM").name == minilm.name


def test_find_checkpoint(tmp_path):
    assert find_checkpoint(tmp_path) is None
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000010").mkdir()
    (run / "checkpoints" / "step-000010" / "model.json").write_text("{}")
    assert find_checkpoint(run) == run / "checkpoints" / "step-000010"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RetrolmError, match="no checkpoints"):
        find_checkpoint(tmp_path / "empty")
