"""Config loading, dotted overrides with type checks, and every eager validation error (messages checked)."""
import os
import textwrap

import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_load_tiny_config():
    cfg = config_lib.get_config(TINY)
    assert cfg.train.steps > 0 and cfg.mesh.data == -1


def test_overrides_parse_types():
    cfg = config_lib.get_config(TINY, ["train.lr=1e-5", "mesh.fsdp=4", "train.steps=7", "mesh.data=2"])
    assert cfg.train.lr == pytest.approx(1e-5) and isinstance(cfg.train.lr, float)
    assert cfg.mesh.fsdp == 4 and cfg.train.steps == 7 and isinstance(cfg.train.steps, int)


def test_override_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train.steps=abc: expected an int"):
        config_lib.get_config(TINY, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"train.lr=fast: expected a float"):
        config_lib.get_config(TINY, ["train.lr=fast"])


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*Did you mean 'train.lr'"):
        config_lib.get_config(TINY, ["train.lrr=1e-5"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        config_lib.get_config(TINY, ["train.lr"])


def test_mesh_product_must_equal_device_count():
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices"):
        config_lib.get_config(TINY, ["mesh.data=2", "mesh.fsdp=2"], num_devices=8)


def test_mesh_fill_not_divisible():
    with pytest.raises(ConfigError, match=r"cannot fill axis 'data'.*8 devices are not divisible"):
        config_lib.get_config(TINY, ["mesh.fsdp=3"], num_devices=8)


def test_global_batch_divisible_by_data_parallel():
    with pytest.raises(ConfigError, match=r"train.global_batch_size=6 is not divisible by the data-parallel size"):
        config_lib.get_config(TINY, ["train.global_batch_size=6", "mesh.data=4", "mesh.fsdp=2"], num_devices=8)
    # tensor parallelism does not count towards the data-parallel size
    config_lib.get_config(TINY, ["train.global_batch_size=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
                          num_devices=8)


@pytest.mark.parametrize("key", ["train.steps", "train.global_batch_size", "data.image_size"])
def test_nonpositive_sizes_rejected(key):
    with pytest.raises(ConfigError, match=rf"{key}=0: must be > 0"):
        config_lib.get_config(TINY, [f"{key}=0"])
    with pytest.raises(ConfigError, match=rf"{key}=-3: must be > 0"):
        config_lib.get_config(TINY, [f"{key}=-3"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.get_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        config_lib.get_config(str(bad))
    wrong = tmp_path / "wrong.py"
    wrong.write_text(textwrap.dedent("""
        def get_config():
            return {"a": 1}
    """))
    with pytest.raises(ConfigError, match="expected ml_collections.ConfigDict"):
        config_lib.get_config(str(wrong))


def test_every_config_file_loads():
    cfg_dir = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(cfg_dir)):
        if name.endswith(".py") and not name.startswith("_"):
            cfg = config_lib.load_config_file(os.path.join(cfg_dir, name))
            config_lib.validate(cfg)


def test_warmup_may_be_zero_not_negative():
    assert config_lib.get_config(TINY, ["train.warmup_steps=0"]).train.warmup_steps == 0
    with pytest.raises(ConfigError, match=r"train.warmup_steps=-1: must be >= 0"):
        config_lib.get_config(TINY, ["train.warmup_steps=-1"])
