"""`export` of an SFT run's sharded checkpoint loads in transformers with our logits; `plan` memory scales as 1/fsdp.

Parity: fp32, highest matmul precision, max |logits_torch - logits_ours| <= 1e-5 * max(1, max |logits|).
"""
import json
import os

import jax
import numpy as np
import pytest

from edit_r1_jax import cli
from edit_r1_jax import config as config_lib
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.models.qwen2_5_vl import testing
from edit_r1_jax.train import export_run
from edit_r1_jax.train import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
SMALL = ["rrm.image_size=28", "rrm.vision_depth=1", "train.eval_every=0", "train.global_batch_size=8",
         "data.num_train=8", "data.num_eval=2"]


@pytest.mark.slow
def test_export_hf_of_sharded_sft_checkpoint_matches_transformers(tmp_path, highest_precision):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from edit_r1_jax.train import sft
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "hf_export")
    # the checkpoint is written sharded: 2-way data x 4-way FSDP over 8 devices
    cfg = config_lib.get_config(TINY, SMALL + ["train.steps=1", "train.export_hf=false", "mesh.data=2",
                                               "mesh.fsdp=4"], num_devices=jax.device_count())
    result = sft.run(cfg, run_dir)
    assert result.step == 1
    # a separate export (run dir -> newest step), restored onto one device
    assert cli.main(["export", "--checkpoint", run_dir, "--to", "hf", "--out", out]) == 0
    info = json.load(open(os.path.join(out, "export_info.json")))
    assert info["model"] == "rrm" and info["step"] == 1
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.exists(os.path.join(out, f)), f

    params = export_run.restore_params(os.path.join(run_dir, "checkpoints", "1"))
    trained = jax.device_get(result.state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # restore is exact
    qcfg = qwen.load_config(out)
    grid = np.array([[1, 2, 2], [1, 2, 4]])
    img = lambda g: testing.image_tokens(g, image_token_id=qcfg.image_token_id, start=qcfg.vision_start_token_id,
                                         end=qcfg.vision_end_token_id)
    rng = np.random.default_rng(0)
    ids = np.array([list(rng.integers(20, 200, 5)) + img(grid[0]) + list(rng.integers(20, 200, 4)) + img(grid[1])
                    + list(rng.integers(20, 200, 3))])
    pv = testing.pixel_values_for(grid, seed=1)
    ours = np.asarray(qwen.forward(qcfg, params, ids, np.ones_like(ids), pv, grid))

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                    pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                    mm_token_type_ids=torch.tensor(testing.mm_token_type_ids(ids, qcfg.image_token_id))).logits
    ref = ref.numpy()
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), err

    # wrong target format: a clear error, no output
    assert cli.main(["export", "--checkpoint", run_dir, "--to", "diffusers", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_plan_fsdp8_is_an_eighth_of_fsdp1(tmp_path):
    over = ["rrm.image_size=28", "rrm.vision_depth=1", "rrm.layers=1", "train.global_batch_size=8",
            "data.length_buckets=(32,)"]
    cfg1 = config_lib.get_config(TINY, over + ["mesh.data=8", "mesh.fsdp=1"], num_devices=8)
    p1 = plan_lib.memory_plan(plan_lib.build_sft_step(cfg1, jax.devices()[:8]))
    # fsdp=8 through the command line (in-process: this session already has the 8 devices)
    out = tmp_path / "plan.json"
    sets = sum([["--set", o] for o in over + ["mesh.data=1", "mesh.fsdp=8"]], [])
    assert cli.main(["plan", "--config", TINY, "--devices", "8", "--no-fit", "--json", str(out)] + sets) == 0
    p8 = json.load(open(out))["plan"]
    assert p8["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and p1.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert p8["params_total_bytes"] == p1.params_total_bytes == p1.params_bytes   # fsdp=1: every device has it all
    for key in ("params_bytes", "opt_bytes"):
        ratio = p8[key] / getattr(p1, key)
        assert 1 / 8 <= ratio <= 1.15 / 8, (key, ratio)
    # XLA's view of the inputs (state + batch shards) shrinks the same way
    assert p8["argument_bytes"] <= 1.15 / 8 * p1.argument_bytes + 64 * 1024, (p8["argument_bytes"], p1.argument_bytes)
    assert p1.temp_bytes > 0 and p8["total_bytes"] > p8["params_bytes"] + p8["opt_bytes"]
