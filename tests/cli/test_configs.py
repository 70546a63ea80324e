"""Every shipped config loads as the typed config of its command (a new config must be listed here)."""

from __future__ import annotations

import pytest

from conftest import REPO
from retrolm.core.config import load_config
from retrolm.train import TrainConfig
from retrolm.train.retrofit import RetrofitConfig

COMMAND_OF = {"retrofit-": RetrofitConfig, "tiny": TrainConfig, "25m": TrainConfig, "100m": TrainConfig,
              "150m": TrainConfig}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    kinds = [cls for prefix, cls in COMMAND_OF.items() if path.name.startswith(prefix)]
    assert kinds, f"{path.name}: which command is it for? add it to COMMAND_OF"
    cfg = load_config(kinds[0], path)
    assert cfg.steps >= 1 and cfg.db and cfg.out_dir
