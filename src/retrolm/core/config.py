"""Typed dataclass configs, loadable from YAML and overridable with dotted ``key=value`` pairs (OmegaConf)."""

from __future__ import annotations

import dataclasses
import operator
import re
import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retrolm.core.errors import RetrolmError, first_line
from retrolm.core.io import write_bytes

T = TypeVar("T")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last value won without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:  # before merges (<<: *x) are flattened in: a key may override a merged one
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if (key_node.tag, key_node.value) in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} is given twice",
                                                        key_node.start_mark)
            seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), **values: Any) -> T:
    """Build ``cls`` from its defaults, then a YAML file, then dotted overrides, then keyword values.

    Types are checked by OmegaConf and ``__post_init__`` validation runs on the result; any problem is
    reported as a one-line :class:`RetrolmError` naming the file or the key.
    """
    where = str(path) if path else "config"
    try:
        cfg = OmegaConf.structured(cls)
        if path is not None:
            if not Path(path).is_file():
                raise RetrolmError(f"{path}: config file not found")
            try:
                loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
            except yaml.YAMLError as e:
                raise RetrolmError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
            except UnicodeDecodeError:
                raise RetrolmError(f"{path}: not a UTF-8 text file") from None
            if not isinstance(loaded, dict):
                raise RetrolmError(f"{path}: expected a mapping of settings (key: value), got a "
                                   f"{type(loaded).__name__}")
            _check_text_fields(cls, loaded, str(path))
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RetrolmError(f"override {bad[0]!r}: expected key=value")
            where = "overrides"
            for o in overrides:
                key, raw = o.split("=", 1)
                inner, optional = _unwrap(_field_type(cls, key.split(".")))
                if inner is str or _is_text_list(inner):
                    # the text as typed: YAML would read 0100 as 64, 12:30 as 750 and yes as True
                    value = _text_value(raw, optional) if inner is str else _text_list(raw, o, optional)
                    OmegaConf.update(cfg, key, value, merge=True)
                    continue
                try:  # OmegaConf parses the value as YAML and lets a parser error escape
                    yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise RetrolmError(f"override {o!r}: invalid value ({str(e).splitlines()[0]})") from None
                try:
                    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o]))
                except OmegaConfBaseException:  # a wrong type or key: said below, with the key
                    raise
                except (TypeError, ValueError) as e:  # one item of a list: OmegaConf cannot merge it
                    parts = [x for x in re.split(r"[.\[\]]+", key) if x]
                    at = next((i for i, x in enumerate(parts) if x.lstrip("-").isdigit()), 0)
                    hint = f"; set the whole list, {'.'.join(parts[:at])}=[...]" if at else ""
                    raise RetrolmError(f"override {o!r}: cannot set this ({first_line(e)}){hint}") from None
        if values:
            cfg = OmegaConf.merge(cfg, {k: v for k, v in values.items() if v is not None})
        obj = OmegaConf.to_object(cfg)
        _check_seeds(obj)
        return obj  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise RetrolmError(f"{where}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None


SEED_RANGE = range(0, 2**63)
"""Seeds every generator takes (numpy refuses negative ones, torch ones past 64 bits)."""


def check_seed(value: int, name: str = "seed") -> int:
    """``value``, or a one-line error when it is out of :data:`SEED_RANGE`."""
    if not SEED_RANGE.start <= operator.index(value) < SEED_RANGE.stop:  # (`in range` scans for a numpy int)
        raise RetrolmError(f"{name} must be in 0..2**63-1, got {value}")
    return value


def _check_seeds(obj: Any, prefix: str = "") -> None:
    """Refuse a ``seed`` field (in ``obj`` or a config nested in it) out of :data:`SEED_RANGE`: it would fail with a
    traceback only when a generator is made, possibly after hours of work."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "seed" and isinstance(value, int):
            check_seed(value, f"{prefix}seed")
        _check_seeds(value, f"{prefix}{f.name}.")


_NULLS = {"null", "Null", "NULL", "~"}


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed); (None, False) for no field."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _field_type(cls: Any, keys: Sequence[str]) -> Any:
    """The declared type of the dotted field ``keys`` of dataclass ``cls`` (None if there is no such field)."""
    for i, key in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(key)
        if hint is None or i == len(keys) - 1:
            return hint
        cls = _unwrap(hint)[0]
    return None


def _is_text_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple) and all(a in (str, Ellipsis) for a in typing.get_args(hint))


def _text_value(raw: str, optional: bool) -> str | None:
    """A text field's override: as typed (surrounding spaces dropped, as YAML drops them), unquoted when quoted
    (``'yes'``); empty or a YAML null is None where None is allowed."""
    raw = raw.strip()
    if optional and (raw in _NULLS or raw == ""):
        return None
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:  # 'it's': not one quoted scalar; the text as typed
            return raw
        return value if isinstance(value, str) else raw
    return raw


def _text_list(raw: str, override: str, optional: bool) -> list[str] | None:
    """A list-of-text field's override, ``[a, b]`` (or one item), each item as :func:`_text_value` takes it."""
    raw = raw.strip()
    if optional and (raw in _NULLS or raw == ""):
        return None
    if not (raw.startswith("[") and raw.endswith("]")):
        return [_text_value(raw, False) or ""]
    inner = raw[1:-1].strip()
    if not inner:
        return []
    if any(c in inner for c in "[]{}"):
        raise RetrolmError(f"override {override!r}: expected a list of text items, [a, b]")
    return [_text_value(item, False) or "" for item in inner.split(",")]


def _check_text_fields(cls: Any, data: dict, where: str, prefix: str = "") -> None:
    """A text field given an unquoted YAML number or bool is refused: the text typed is lost by then (``0100`` read
    as 64, ``no`` as False) and writing back ``str(value)`` would change it silently."""
    if not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            continue  # OmegaConf names unknown keys
        inner, _ = _unwrap(hints[key])
        if isinstance(value, dict):
            _check_text_fields(inner, value, where, f"{prefix}{key}.")
        elif inner is str and value is not None and not isinstance(value, str):
            raise RetrolmError(f"{where}: {prefix}{key}: expected text, got the YAML {type(value).__name__} "
                               f"{value!r}; quote it")
        elif _is_text_list(inner) and isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise RetrolmError(f"{where}: {prefix}{key}: expected text items, got the YAML "
                                       f"{type(item).__name__} {item!r}; quote it")


def save_config(config: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML (atomically), e.g. next to a checkpoint or a result."""
    data = asdict(config)
    write_bytes(path, yaml.safe_dump(_plain(data), sort_keys=False).encode())


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
