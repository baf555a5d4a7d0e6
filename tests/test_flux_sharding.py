"""FLUX transformer on a 2x2x2 ('data','fsdp','tensor') mesh of 8 fake CPU devices, and the exact parameter count
of the FLUX.1-Kontext-dev preset (jax.eval_shape, no allocation) against diffusers' model built on the meta device.
"""
import numpy as np
import pytest

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from edit_r1_jax import parallel  # noqa: E402
from edit_r1_jax.models import flux  # noqa: E402
from edit_r1_jax.models.flux import convert, transformer as tr  # noqa: E402
from edit_r1_jax.models.flux.config import FluxTransformerConfig, kontext_dev_config  # noqa: E402

CFG = FluxTransformerConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
KONTEXT_DEV_PARAMS = 11_901_408_320   # diffusers FluxTransformer2DModel(FLUX.1-Kontext-dev config), see test below


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_kontext_dev_param_count_and_names():
    cfg = kontext_dev_config()
    assert _count(tr.param_shapes(cfg)) == KONTEXT_DEV_PARAMS
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items()
                                                  if not k.startswith("_")})
    assert sum(p.numel() for p in ref.parameters()) == KONTEXT_DEV_PARAMS
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert convert.expected_tensors(cfg) == want


def test_preset_config_file():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "flux_kontext_dev.py")
    spec = importlib.util.spec_from_file_location("flux_kontext_dev_preset", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.transformer_config() == kontext_dev_config()
    assert mod.NUM_PARAMS == KONTEXT_DEV_PARAMS
    c = mod.get_config()
    assert (c.lora.rank, c.lora.alpha, c.sample.guidance_scale) == (64, 128.0, 2.5)
    from edit_r1_jax.models.lora import FLUX_ATTN_FF_TARGETS, LoraConfig
    assert LoraConfig(c.lora.rank, c.lora.alpha, c.lora.targets).regex == FLUX_ATTN_FF_TARGETS


def test_param_logical_axes():
    axes = tr.param_logical_axes(CFG)
    assert axes["transformer_blocks"]["attn"]["to_q"]["kernel"] == P("layers", "embed", "q_heads_dim")
    assert axes["transformer_blocks"]["attn"]["to_out_0"]["kernel"] == P("layers", "q_heads_dim", "embed")
    assert axes["single_transformer_blocks"]["proj_mlp"]["kernel"] == P("layers", "embed", "mlp")
    assert axes["single_transformer_blocks"]["attn"]["norm_q"]["scale"] == P("layers", "head_dim")
    assert axes["x_embedder"]["kernel"] == P(None, "embed")
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(tr.param_shapes(CFG))


@pytest.mark.slow
def test_sharded_forward_equals_unsharded(tmp_path, highest_precision):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.2, tr.param_shapes(CFG))
    flux.save_transformer(CFG, params, str(tmp_path))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, sharded = flux.load_transformer(str(tmp_path), mesh=mesh)
    _, plain = flux.load_transformer(str(tmp_path))
    q = sharded["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 16, 16)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain["transformer_blocks"]["attn"]["to_q"]["kernel"]))

    ids = np.concatenate([np.zeros((6, 3)), flux_ids(4, 4, 0), flux_ids(2, 3, 1)]).astype(np.float32)
    inputs = dict(hidden_states=rng.standard_normal((4, 22, 16)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((4, 6, 32)).astype(np.float32),
                  pooled_projections=rng.standard_normal((4, 24)).astype(np.float32),
                  timestep=np.array([0.1, 0.4, 0.7, 1.0], np.float32), img_ids=ids[6:], txt_ids=ids[:6],
                  guidance=np.full((4,), 2.5, np.float32))
    ref = np.asarray(flux.transformer_forward(cfg, plain, **inputs))
    batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
             for k, v in inputs.items() if k not in ("img_ids", "txt_ids")}
    out = flux.transformer_forward(cfg, sharded, **batch, img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])
    assert out.sharding.spec[0] == ("data", "fsdp")
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err


def flux_ids(h, w, first):
    t = np.zeros((h, w, 3), np.float32)
    t[..., 0] = first
    t[..., 1] = np.arange(h)[:, None]
    t[..., 2] = np.arange(w)[None]
    return t.reshape(-1, 3)
