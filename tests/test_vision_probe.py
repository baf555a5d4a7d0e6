"""Vision-tower diagnostics of the demo reward model (edit_r1_jax/demo/vision_probe.py).

A random tiny tower's merged tokens carry each cell's colour and shape (the probe beats the majority class by a wide
margin), and a tower collapsed to one output vector reads cosine 1.0 and probes at the majority rate.
"""
import os

import jax
import numpy as np
import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax.demo import vision_probe as vp
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.train.rrm_setup import build_rrm

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _setup(tmp_path, size):
    cfg = config_lib.get_config(TINY, [f"rrm.image_size={size}", f"data.image_size={size}"],
                                num_devices=jax.device_count())
    return build_rrm(cfg, str(tmp_path))


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = [("a", "b", "c")[i % 3] for i in range(300)]
    centres = {v: 4.0 * np.eye(5)[i] for i, v in enumerate("abc")}      # one direction per class
    x = np.stack([rng.normal(centres[v], 1.0) for v in labels])
    assert vp.linear_probe(x, labels)["accuracy"] > 0.95
    noise = vp.linear_probe(rng.normal(size=(300, 5)), labels)
    assert noise["accuracy"] < 0.6 and noise["classes"] == 3
    with pytest.raises(ValueError, match="empty train or test split"):
        vp.linear_probe(x[:1], labels[:1])


@pytest.mark.slow
def test_random_tower_carries_cells_and_a_collapsed_one_does_not(tmp_path):
    setup = _setup(tmp_path, 84)
    params = jax.device_get(qwen.init_params(setup.cfg, jax.random.PRNGKey(0)))
    out = vp.probe_world(setup, params, n=160, seed=0)
    assert out["colour"]["accuracy"] > out["colour"]["majority"] + 0.1, out
    assert out["shape"]["accuracy"] > out["shape"]["majority"] + 0.1, out
    assert out["cell_cosine"] < 0.99, out
    # collapse: the merger's last projection (torch merger.mlp.2) outputs its bias only -> every cell the same vector
    collapsed = jax.tree.map(np.array, params)
    mlp2 = collapsed["visual"]["merger"]["mlp_2"]
    mlp2["kernel"] = np.zeros_like(mlp2["kernel"])
    mlp2["bias"] = np.random.default_rng(1).normal(size=mlp2["bias"].shape).astype(mlp2["bias"].dtype)
    dead = vp.probe_world(setup, collapsed, n=160, seed=0)
    assert dead["cell_cosine"] > 0.999, dead
    assert dead["colour"]["accuracy"] <= dead["colour"]["majority"] + 0.02, dead


def test_probe_world_rejects_images_that_do_not_map_to_cells(tmp_path):
    setup = _setup(tmp_path, 56)
    with pytest.raises(ValueError, match="needs 84 px images"):
        vp.probe_world(setup, {}, n=4)
