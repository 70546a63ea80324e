"""Typed dataclass configs, loadable from YAML and overridable with dotted ``key=value`` pairs (OmegaConf)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retrolm.core.errors import RetrolmError
from retrolm.core.io import write_bytes

T = TypeVar("T")


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
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise RetrolmError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
            except UnicodeDecodeError:
                raise RetrolmError(f"{path}: not a UTF-8 text file") from None
            if not isinstance(loaded, dict):
                raise RetrolmError(f"{path}: expected a mapping of settings (key: value), got a "
                                   f"{type(loaded).__name__}")
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RetrolmError(f"override {bad[0]!r}: expected key=value")
            where = "overrides"
            for o in overrides:  # OmegaConf parses each value as YAML and lets a parser error escape
                try:
                    yaml.safe_load(o.split("=", 1)[1])
                except yaml.YAMLError as e:
                    raise RetrolmError(f"override {o!r}: invalid value ({str(e).splitlines()[0]})") from None
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        if values:
            cfg = OmegaConf.merge(cfg, {k: v for k, v in values.items() if v is not None})
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise RetrolmError(f"{where}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None


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
