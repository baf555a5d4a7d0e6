"""LoRA on the FLUX transformer: zero-init adapters are a no-op, in-layer (unmerged) == merged, merge/unmerge
round trip, only adapter leaves get optimizer updates, remat leaves adapter gradients unchanged, save/load.

fp32, highest matmul precision; relative error max|a-b|/max|b| <= 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edit_r1_jax.models import flux, lora as lora_lib
from edit_r1_jax.models.flux import transformer as tr
from edit_r1_jax.models.flux.config import FluxTransformerConfig

CFG = FluxTransformerConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _random_like(shapes, seed, std=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * std), shapes)


@pytest.fixture(scope="module")
def setup():
    params = _random_like(tr.param_shapes(CFG), 0)
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.zeros((5, 3)), np.stack(np.meshgrid([0], np.arange(3), np.arange(4), indexing="ij"),
                                                     -1).reshape(-1, 3)]).astype(np.float32)
    inputs = dict(hidden_states=rng.standard_normal((2, 12, 16)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((2, 5, 32)).astype(np.float32),
                  pooled_projections=rng.standard_normal((2, 24)).astype(np.float32),
                  timestep=np.array([0.3, 0.7], np.float32), img_ids=ids[5:], txt_ids=ids[:5],
                  guidance=np.array([2.5, 2.5], np.float32))
    zero = lora_lib.init_lora(params, LCFG, 0)
    rand = _random_like(jax.eval_shape(lambda: zero), 2, std=0.3)
    return params, inputs, zero, rand


def test_targets_cover_attention_and_ff(setup):
    params, _, zero, _ = setup
    mods = {"/".join(m) for m in lora_lib.target_modules(params, LCFG.targets)}
    assert "transformer_blocks/attn/to_out_0" in mods and "transformer_blocks/ff_context/net_2" in mods
    assert "single_transformer_blocks/proj_out" in mods and "single_transformer_blocks/attn/to_k" in mods
    assert not any("norm" in m or "embed" in m for m in mods)
    assert len(mods) == 8 + 4 + 5   # double: 8 attn + 2x2 ff; single: q, k, v, proj_mlp, proj_out
    a = zero["transformer_blocks"]["attn"]["to_q"]["lora_a"]
    b = zero["transformer_blocks"]["attn"]["to_q"]["lora_b"]
    assert a.shape == (2, 32, 4) and b.shape == (2, 4, 32) and not np.any(np.asarray(b))
    with pytest.raises(ValueError, match="match no Dense kernel"):
        lora_lib.target_modules(params, r"nothing_here$")


def test_zero_init_is_noop_and_merged_equals_unmerged(setup, highest_precision):
    params, inputs, zero, rand = setup
    base = flux.transformer_forward(CFG, params, **inputs)
    with_zero = flux.transformer_forward(CFG, params, **inputs, lora=zero, lora_scale=LCFG.scale)
    np.testing.assert_allclose(np.asarray(with_zero), np.asarray(base), rtol=0, atol=1e-6)
    unmerged = flux.transformer_forward(CFG, params, **inputs, lora=rand, lora_scale=LCFG.scale)
    merged_params = lora_lib.merge(params, rand, LCFG.scale)
    merged = flux.transformer_forward(CFG, merged_params, **inputs)
    assert rel_err(unmerged, base) > 1e-2          # the adapters do change the output
    assert rel_err(merged, unmerged) <= 1e-5
    back = lora_lib.unmerge(merged_params, rand, LCFG.scale)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    # merge shares untouched leaves and leaves the input tree as it was
    assert merged_params["x_embedder"]["kernel"] is params["x_embedder"]["kernel"]
    assert merged_params["transformer_blocks"]["attn"]["to_q"]["kernel"] is not \
        params["transformer_blocks"]["attn"]["to_q"]["kernel"]


def test_only_adapters_update_and_remat_grads_are_correct(setup, highest_precision):
    params, inputs, _, rand = setup

    def loss(lora, cfg):
        v = flux.transformer_forward(cfg, params, **inputs, lora=lora, lora_scale=LCFG.scale)
        return jnp.mean(v ** 2)
    # gradient of the rematerialised model vs a central finite difference along a random direction
    g = jax.jit(jax.grad(loss), static_argnums=1)(rand, CFG.replace(remat="dots"))
    d = _random_like(jax.eval_shape(lambda: rand), 3, std=1.0)
    eps = 1e-3
    plus = jax.tree.map(lambda x, y: np.asarray(x) + eps * np.asarray(y), rand, d)
    minus = jax.tree.map(lambda x, y: np.asarray(x) - eps * np.asarray(y), rand, d)
    fd = (float(loss(plus, CFG)) - float(loss(minus, CFG))) / (2 * eps)
    ad = float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
                   for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(d))))
    assert abs(fd - ad) <= 1e-3 * abs(ad) + 1e-6, (fd, ad)

    train = {"params": params, "lora": rand}
    grads = {"params": jax.tree.map(lambda x: np.ones(x.shape, np.float32), params), "lora": g}  # non-zero
    tx = lora_lib.lora_only(optax.adamw(1e-2, weight_decay=0.1), train)

    @jax.jit
    def step(train, grads):
        updates, _ = tx.update(grads, tx.init(train), train)
        return optax.apply_updates(train, updates)
    new = step(train, grads)
    for x, y in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    changed = [not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(new["lora"]), jax.tree.leaves(rand))]
    assert all(changed)
    mask = lora_lib.trainable_mask(train)
    assert not any(jax.tree.leaves(mask["params"])) and all(jax.tree.leaves(mask["lora"]))


def test_save_load_roundtrip(setup, tmp_path):
    _, _, _, rand = setup
    f = lora_lib.save_lora(rand, LCFG, str(tmp_path / "adapter"))
    assert f.endswith("adapter_model.safetensors")
    loaded, cfg = lora_lib.load_lora(str(tmp_path / "adapter"))
    assert cfg == LCFG
    assert jax.tree.structure(loaded) == jax.tree.structure(rand)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(rand)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert lora_lib.count(loaded) == lora_lib.count(rand)
    with pytest.raises(Exception, match="no LoRA adapter file"):
        lora_lib.load_lora(str(tmp_path / "missing"))
