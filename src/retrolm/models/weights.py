"""How a model folder is written and read: ``model.safetensors``, ``model.json`` and ``checksums.json``.

Every retrolm model saves itself into a folder (``save_pretrained``) and loads back from one (``from_pretrained``):
weights as safetensors, the shape as JSON (with an ``architecture`` key), and SHA-256 checksums of the folder's
files, checked on load so that a truncated or overwritten file is a one-line error instead of NaN losses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from retrolm.core.errors import RetrolmError, first_line
from retrolm.core.io import atomic_path, file_digest, read_json_object, write_json

CHECKSUMS = "checksums.json"


def save_weights(model: nn.Module, folder: str | Path, config: dict, tensors: dict[str, torch.Tensor] | None = None
                 ) -> None:
    """Write ``tensors`` (default: the whole state of ``model``, shared tensors once) and ``config`` into ``folder``."""
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        if tensors is None:
            save_model(model, str(tmp))
        else:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    write_json(folder / "model.json", config)


def read_model_config(folder: str | Path) -> dict:
    """The ``model.json`` of a model folder."""
    return read_json_object(Path(folder) / "model.json", "model description (model.json)")


def load_weights(model: nn.Module, folder: str | Path, device: str | torch.device = "cpu", strict: bool = True
                 ) -> list[str]:
    """Load ``model.safetensors`` of ``folder`` into ``model`` (checked against ``checksums.json`` when present).

    With ``strict=False`` only the tensors the file holds are loaded (e.g. a retrofitted model's new weights);
    returns the names of the model's tensors that the file did not hold.
    """
    from safetensors.torch import load_model

    path = Path(folder) / "model.safetensors"
    if strict:
        verify_checksums(Path(folder), ["model.safetensors"])
        try:
            load_model(model, str(path), device=str(device))
        except FileNotFoundError:
            raise RetrolmError(f"{path}: not found") from None
        except Exception as e:  # safetensors raises several types for truncated / mismatched files
            raise RetrolmError(f"{path}: cannot load ({_shape_mismatch(model, path) or first_line(e)})") from None
        return []
    state = read_weights(folder, device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # mismatched shapes
        raise RetrolmError(f"{path}: cannot load ({_shape_mismatch(model, path) or first_line(e)})") from None
    if unexpected:
        raise RetrolmError(f"{path}: holds tensors the model does not have: {', '.join(unexpected[:5])}")
    return list(missing)


def _shape_mismatch(model: nn.Module, path: Path) -> str | None:
    """The first tensor whose shape in the file is not the model's, said so (torch's message names none of them in
    its first line), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception:  # an unreadable file: the caller's message stands
        return None
    for name, tensor in model.state_dict().items():
        if name in shapes and shapes[name] != tuple(tensor.shape):
            return f"{name} has shape {shapes[name]} in the file, {tuple(tensor.shape)} in the model"
    return None


def read_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` in ``folder`` by name (checked against ``checksums.json`` when present)."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    verify_checksums(Path(folder), ["model.safetensors"])
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise RetrolmError(f"{path}: not found") from None
    except Exception as e:  # safetensors raises several types for truncated files
        raise RetrolmError(f"{path}: cannot load ({first_line(e)})") from None


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """The state-dict names of ``model`` whose tensor ``model.safetensors`` stores under another name (tied weights:
    safetensors keeps the first of a shared tensor's names in sorted order), as {alias: stored name}."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    aliases = {}
    for names in groups.values():
        kept = min(names)
        aliases.update({n: kept for n in names if n != kept})
    return aliases


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file in ``folder`` (call when the folder is complete)."""
    sums = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_json(folder / CHECKSUMS, sums)


def verify_checksums(folder: Path, names: list[str] | None = None) -> None:
    """Compare files of ``folder`` (all recorded, or ``names``) with ``checksums.json``; no record, no check."""
    record = folder / CHECKSUMS
    if not record.is_file():
        return
    sums = read_json_object(record, "checksums")
    for name in names or list(sums):
        if name not in sums:
            continue
        p = folder / name
        if not p.is_file():
            raise RetrolmError(f"{p}: missing (listed in {record})")
        if file_digest(p) != sums[name]:
            raise RetrolmError(f"{p}: corrupt (checksum mismatch with {record})")
