"""The per-layer inference layout of the FLUX transformer (cfg.scan_layers=False, models/layer_layout.py):
same outputs as the scanned stack (fp32, highest matmul precision), loading straight into it (plain and on a 2x2x2
mesh), saving from it, LoRA trees in either layout, and the error for a params tree in the wrong layout."""
import numpy as np
import pytest

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from edit_r1_jax import parallel  # noqa: E402
from edit_r1_jax.models import flux, layer_layout  # noqa: E402
from edit_r1_jax.models.flux import transformer as tr  # noqa: E402
from edit_r1_jax.models.flux.pipeline import latent_image_ids  # noqa: E402
from edit_r1_jax.models.flux.config import FluxTransformerConfig  # noqa: E402
from edit_r1_jax.models.lora import LoraConfig, init_lora  # noqa: E402

CFG = FluxTransformerConfig(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _inputs(rng, b=2):
    return dict(hidden_states=rng.standard_normal((b, 22, 16)).astype(np.float32),
                encoder_hidden_states=rng.standard_normal((b, 6, 32)).astype(np.float32),
                pooled_projections=rng.standard_normal((b, 24)).astype(np.float32),
                timestep=np.linspace(0.2, 0.9, b).astype(np.float32),
                img_ids=np.concatenate([latent_image_ids(4, 4, 0), latent_image_ids(2, 3, 1)]), txt_ids=np.zeros((6, 3), np.float32),
                guidance=np.full((b,), 2.5, np.float32))


@pytest.fixture(scope="module")
def stacked():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), tr.param_shapes(CFG))


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_layout_round_trip_and_shapes(stacked):
    cfg1, per = flux.unstack_layers(CFG, stacked)
    assert not cfg1.scan_layers and sorted(per["single_transformer_blocks"]) == ["layers_0", "layers_1", "layers_2"]
    k = per["single_transformer_blocks"]["layers_2"]["proj_mlp"]["kernel"]
    np.testing.assert_array_equal(k, stacked["single_transformer_blocks"]["proj_mlp"]["kernel"][2])
    # the per-layer tree is exactly what init builds for scan_layers=False
    assert jax.tree.structure(per) == jax.tree.structure(tr.param_shapes(cfg1))
    cfg2, back = flux.stack_layers(cfg1, per)
    assert cfg2 == CFG
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    bad = dict(per["transformer_blocks"], layers_1={"x": np.zeros(3)})
    with pytest.raises(ValueError, match="transformer_blocks/layers_1 has a different tree"):
        layer_layout.stack_layers({"transformer_blocks": bad}, ["transformer_blocks"])


def test_per_layer_forward_equals_scanned(stacked, highest_precision):
    inputs = _inputs(np.random.default_rng(1))
    ref = flux.transformer_forward(CFG, stacked, **inputs)
    cfg1, per = flux.unstack_layers(CFG, stacked)
    out = flux.transformer_forward(cfg1, per, **inputs)
    assert _rel(out, ref) <= 1e-6
    # LoRA built on the stacked params (training layout) applies to the per-layer forward as well
    lora = init_lora(stacked, LoraConfig(rank=4, alpha=8.0), seed=3)
    lora = jax.tree.map(lambda a: a + 0.05, lora)     # nonzero B so the adapters change the output
    ref_l = flux.transformer_forward(CFG, stacked, **inputs, lora=lora, lora_scale=2.0)
    assert _rel(ref_l, ref) > 1e-3
    assert _rel(flux.transformer_forward(cfg1, per, **inputs, lora=lora, lora_scale=2.0), ref_l) <= 1e-6
    _, lora_per = flux.unstack_layers(CFG, lora)
    assert _rel(flux.transformer_forward(cfg1, per, **inputs, lora=lora_per, lora_scale=2.0), ref_l) <= 1e-6


def test_wrong_layout_is_named(stacked):
    inputs = _inputs(np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"params\['transformer_blocks'\] is in the stacked layout but the config "
                                         r"has scan_layers=False .*flux.unstack_layers"):
        flux.transformer_forward(CFG.replace(scan_layers=False), stacked, **inputs)
    _, per = flux.unstack_layers(CFG, stacked)
    with pytest.raises(ValueError, match=r"per-layer layout but the config has scan_layers=True"):
        flux.transformer_forward(CFG, per, **inputs)


@pytest.mark.slow
def test_load_save_per_layer_on_mesh(stacked, tmp_path, highest_precision):
    src, out_dir = str(tmp_path / "src"), str(tmp_path / "out")
    flux.save_transformer(CFG, stacked, src)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, per = flux.load_transformer(src, mesh=mesh, scan_layers=False)
    assert not cfg.scan_layers
    q = per["transformer_blocks"]["layers_1"]["attn"]["to_q"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor") and q.addressable_shards[0].data.shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(q), stacked["transformer_blocks"]["attn"]["to_q"]["kernel"][1])
    axes = tr.param_logical_axes(cfg)
    assert axes["single_transformer_blocks"]["layers_0"]["proj_mlp"]["kernel"] == P("embed", "mlp")

    inputs = _inputs(np.random.default_rng(3), b=4)
    ref = flux.transformer_forward(CFG, stacked, **inputs)
    batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
             for k, v in inputs.items() if k not in ("img_ids", "txt_ids")}
    out = flux.transformer_forward(cfg, per, **batch, img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])
    assert _rel(out, ref) <= 1e-5

    flux.save_transformer(cfg, per, out_dir)            # written in the diffusers (per-layer named) layout
    _, again = flux.load_transformer(out_dir)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), b)
