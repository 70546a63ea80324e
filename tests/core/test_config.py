"""load_config: a text setting keeps the text typed (YAML would have turned it into a number or a bool, written back
as other text), and a YAML file that gives one a number or a bool is refused in one line."""

from __future__ import annotations

import pytest

from retrolm.core.config import load_config
from retrolm.core.errors import RetrolmError
from retrolm.infer.generate import GenerateConfig
from retrolm.train import TrainConfig


def test_text_overrides_are_kept_as_typed_and_others_still_parsed():
    cfg = load_config(TrainConfig, None, ["db=runs/db", "out_dir=0100", "init_from=1e5", "neighbours_dir=12:30",
                                          "steps=0x10", "lr=1e-3", "model.retro_layers=[2,4]"])
    assert (cfg.out_dir, cfg.init_from, cfg.neighbours_dir) == ("0100", "1e5", "12:30")  # were '64', '100000.0', '750'
    assert cfg.steps == 16 and cfg.lr == 1e-3 and list(cfg.model.retro_layers) == [2, 4]
    assert load_config(TrainConfig, None, ["db=x", "init_from=null"]).init_from is None
    assert load_config(TrainConfig, None, ["db=x", "init_from='null'"]).init_from == "null"  # quoted: the text
    assert load_config(GenerateConfig, None, ["checkpoint=c", "prompt=yes"]).prompt == "yes"  # was 'True'
    assert load_config(GenerateConfig, None, ["checkpoint=c", "prompt=a: [b, {c"]).prompt == "a: [b, {c"
    assert load_config(GenerateConfig, None, ["checkpoint=c", "prompt='it's'"]).prompt == "'it's'"  # not one scalar
    cfg = load_config(TrainConfig, None, ["db=x", "device= cpu", "init_from="])
    assert cfg.device == "cpu" and cfg.init_from is None  # spaces dropped and empty = None, as YAML reads them


def test_list_of_text_overrides_keep_each_item_as_typed():
    from retrolm.train.retrofit import RetrofitConfig

    cfg = load_config(RetrofitConfig, None, ["db=x", "lora_target_modules=[q_proj, 0100, 'yes']"])
    assert cfg.lora_target_modules == ["q_proj", "0100", "yes"]
    assert load_config(RetrofitConfig, None, ["db=x", "lora_target_modules=null"]).lora_target_modules is None
    with pytest.raises(RetrolmError, match=r"expected a list of text items, \[a, b\]"):
        load_config(RetrofitConfig, None, ["db=x", "lora_target_modules=[[a]]"])


def test_a_yaml_number_or_bool_for_a_text_setting_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("db: runs/db\nout_dir: 0100\n")
    with pytest.raises(RetrolmError, match=r"^.*c.yaml: out_dir: expected text, got the YAML int 64; quote it$"):
        load_config(TrainConfig, path)
    path.write_text("db: runs/db\nout_dir: '0100'\nmodel:\n  retro_layers: [2]\n")
    assert load_config(TrainConfig, path).out_dir == "0100"
    path.write_text("checkpoint: c\nprompt: no\n")
    with pytest.raises(RetrolmError, match="prompt: expected text, got the YAML bool False; quote it"):
        load_config(GenerateConfig, path)


def test_seeds_out_of_range_and_list_item_overrides_are_one_line():
    """A negative seed failed with numpy's traceback only once a generator was made (after the neighbour search of a
    training run); one item of a list failed inside OmegaConf's merge with a TypeError."""
    base = ["db=x", "out_dir=y"]
    with pytest.raises(RetrolmError, match=r"^seed must be in 0\.\.2\*\*63-1, got -1$"):
        load_config(TrainConfig, None, [*base, "seed=-1"])
    with pytest.raises(RetrolmError, match=r"seed must be in 0\.\.2\*\*63-1, got 99999999999999999999"):
        load_config(GenerateConfig, None, ["checkpoint=c", "prompt=p"], seed=99999999999999999999)
    assert load_config(TrainConfig, None, [*base, f"seed={2**63 - 1}"]).seed == 2**63 - 1
    with pytest.raises(RetrolmError, match=r"override 'model\.retro_layers\.0=3': cannot set this .*; set the whole "
                                           r"list, model\.retro_layers=\[\.\.\.\]$"):
        load_config(TrainConfig, None, [*base, "model.retro_layers.0=3"])
    with pytest.raises(RetrolmError, match=r"set the whole list, model\.retro_layers=\[\.\.\.\]$"):
        load_config(TrainConfig, None, [*base, "model.retro_layers[0]=3"])
    import numpy as np

    from retrolm.core.config import check_seed

    with pytest.raises(RetrolmError, match="seed must be in"):
        check_seed(np.int64(-1))  # (a membership test of the range scanned it element by element)
    with pytest.raises(RetrolmError, match=r"^overrides: steps: .*abc") as e:  # a wrong type: OmegaConf's message
        load_config(TrainConfig, None, [*base, "steps=abc"])
    assert "list" not in str(e.value)


def test_a_setting_given_twice_in_a_config_file_is_refused(tmp_path):
    """The last value won without a word; a key overriding a YAML merge (<<: *base) is still fine."""
    from retrolm.core.config import load_config
    from retrolm.train.config import TrainConfig

    (tmp_path / "twice.yaml").write_text("steps: 5\nlr: 0.001\nsteps: 7\n")
    with pytest.raises(RetrolmError, match=r"twice\.yaml: invalid YAML \(key 'steps' is given twice\)"):
        load_config(TrainConfig, tmp_path / "twice.yaml")
    (tmp_path / "merged.yaml").write_text("model: &m {preset: tiny}\nsteps: 3\n")
    assert load_config(TrainConfig, tmp_path / "merged.yaml").steps == 3
