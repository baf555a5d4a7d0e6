"""FLUX LoRA adapters <-> diffusers / PEFT LoRA files (`models/flux/lora_diffusers.py`).

- ours exported -> diffusers `FluxKontextPipeline.load_lora_weights` -> the diffusers transformer's output equals
  ours with the adapters applied in-layer;
- a PEFT adapter made in PyTorch (random A and B, rank 3, alpha 5, some modules, one layer only for one of them) and
  saved by `FluxKontextPipeline.save_lora_weights` -> our loader -> our output equals diffusers';
- file round trip (stacked and per-layer adapter trees); bad files raise one error naming every problem.

fp32, highest matmul precision; relative error max|a-b| / max|b| <= 1e-5.
"""
import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from edit_r1_jax.models import flux, layer_layout, lora as lora_lib  # noqa: E402
from edit_r1_jax.models.flux import lora_diffusers as ld, parity  # noqa: E402
from edit_r1_jax.models.flux.transformer import BLOCK_KEYS  # noqa: E402
from edit_r1_jax.models.safetensors_io import CheckpointError, write_safetensors  # noqa: E402
from helpers.flux_forward import kontext_inputs, ours_forward, rel_err, torch_forward  # noqa: E402

TOL = 1e-5
LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = parity.torch_kontext_pipeline(seed=1)
    d = tmp_path_factory.mktemp("lora_diffusers")
    pipe.transformer.save_pretrained(str(d / "transformer"))
    tcfg, tparams = flux.load_transformer(str(d / "transformer"))
    return pipe, tcfg, tparams, kontext_inputs(tcfg, seed=0)


def ours_out(tcfg, tparams, x, lora=None, scale=1.0):
    return ours_forward(tcfg, tparams, x, None if lora is None else lora_lib.scale_lora(lora, scale))


def random_adapters(tparams, seed=3, std=0.2):
    zero = lora_lib.init_lora(tparams, LCFG, 0)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * std, zero)


def test_exported_adapters_load_in_diffusers_with_equal_outputs(setup, tmp_path):
    pipe, tcfg, tparams, x = setup
    lora = random_adapters(tparams)
    path = ld.save_diffusers_lora(tcfg, lora, LCFG, str(tmp_path / "lora"))
    assert path.endswith("pytorch_lora_weights.safetensors")
    base = torch_forward(pipe.transformer, x)
    pipe.load_lora_weights(str(tmp_path / "lora"))            # diffusers' own loader, PEFT backend
    try:
        ref = torch_forward(pipe.transformer, x)
    finally:
        pipe.unload_lora_weights()
    ours = ours_out(tcfg, tparams, x, lora, LCFG.scale)
    assert rel_err(ref, base) > 1e-2                          # the adapters change the output
    assert rel_err(ours, ref) <= TOL
    np.testing.assert_allclose(torch_forward(pipe.transformer, x), base, rtol=0, atol=0)   # unloaded again


def test_peft_adapter_saved_by_diffusers_loads_here(setup, tmp_path):
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    _, tcfg, tparams, x = setup
    transformer = copy.deepcopy(setup[0].transformer)
    torch.manual_seed(7)
    peft_cfg = LoraConfig(r=3, lora_alpha=5, init_lora_weights=False,   # random A and B: not a no-op
                          target_modules=["to_q", "to_v", "to_out.0", "proj_mlp", "transformer_blocks.0.ff.net.2"])
    transformer.add_adapter(peft_cfg)
    FluxKontextPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                          transformer_lora_adapter_metadata=peft_cfg.to_dict())
    ref = torch_forward(transformer, x)
    lora, lcfg = ld.load_diffusers_lora(str(tmp_path), tcfg)
    assert (lcfg.rank, lcfg.alpha) == (3, 5.0)
    ff = lora["transformer_blocks"]["ff"]["net_2"]
    assert ff["lora_a"].shape == (2, 4 * tcfg.num_attention_heads * tcfg.attention_head_dim, 3)
    assert not np.any(np.asarray(ff["lora_b"][1])) and np.any(np.asarray(ff["lora_b"][0]))   # layer 1: zero adapter
    adapted = {"/".join(m) for m, _ in lora_lib.adapter_modules(lora)}
    assert {"/".join(m) for m in lora_lib.target_modules(tparams, lcfg.targets)} == adapted
    assert "single_transformer_blocks/attn/to_out_0" not in adapted and "transformer_blocks/attn/to_k" not in adapted
    ours = ours_out(tcfg, tparams, x, lora, lcfg.scale)
    assert rel_err(ours, ref) <= TOL
    merged = lora_lib.apply_lora(tparams, lora, lcfg.scale)            # merged weights give the same output
    assert rel_err(ours_out(tcfg, merged, x), ref) <= TOL


def test_round_trip_stacked_and_per_layer(setup, tmp_path):
    _, tcfg, tparams, _ = setup
    lora = random_adapters(tparams, seed=5)
    ld.save_diffusers_lora(tcfg, lora, LCFG, str(tmp_path / "a"))
    ld.save_diffusers_lora(tcfg, layer_layout.unstack_layers(lora, BLOCK_KEYS), LCFG, str(tmp_path / "b"))
    for sub in ("a", "b"):
        back, lcfg = ld.load_diffusers_lora(str(tmp_path / sub), tcfg)
        assert (lcfg.rank, lcfg.alpha) == (LCFG.rank, LCFG.alpha)
        assert jax.tree.structure(back) == jax.tree.structure(lora)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
            np.testing.assert_array_equal(np.asarray(got), want)


def test_bad_files_name_every_problem(setup, tmp_path):
    _, tcfg, _, _ = setup
    d = tcfg.num_attention_heads * tcfg.attention_head_dim
    good_a, good_b = np.zeros((2, d), np.float32), np.zeros((d, 2), np.float32)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": good_a,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": good_b,
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": good_a,          # no such layer
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": good_a,          # B missing
        "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": good_a,
        "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": np.zeros((d + 1, 2), np.float32),   # shape
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": good_a,   # another component
    }
    write_safetensors(tensors, str(tmp_path), basename="pytorch_lora_weights")
    with pytest.raises(CheckpointError) as e:
        ld.load_diffusers_lora(str(tmp_path), tcfg)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "transformer_blocks.7.attn.to_q" in msg and "to_k: has ['lora_A'] but not both" in msg
    assert f"to_v.lora_B.weight: shape ({d + 1}, 2), expected ({d}, 2)" in msg and "text_encoder.text_model" in msg
    with pytest.raises(CheckpointError, match="no LoRA file"):
        ld.load_diffusers_lora(str(tmp_path / "nowhere"), tcfg)
    with pytest.raises(CheckpointError, match="not have"):
        ld.to_diffusers_lora(tcfg, {"transformer_blocks": {"attn": {"to_zz": {"lora_a": np.zeros((2, d, 2)),
                                                                               "lora_b": np.zeros((2, 2, d))}}}}, LCFG)
