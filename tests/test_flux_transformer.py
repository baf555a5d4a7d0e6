"""FLUX transformer parity against diffusers FluxTransformer2DModel (tiny config, models.md 2.8).

All comparisons: float32 weights and activations, `highest` matmul precision, relative error
max|ours - ref| / max|ref| <= 1e-5 (per block and whole model).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from edit_r1_jax.models import flux  # noqa: E402
from edit_r1_jax.models.flux import parity, transformer as tr  # noqa: E402

TOL = 1e-5
def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def grid_ids(h, w, first):
    t = np.zeros((h, w, 3), np.float32)
    t[..., 0] = first
    t[..., 1] = np.arange(h)[:, None]
    t[..., 2] = np.arange(w)[None]
    return t.reshape(-1, 3)


def build_torch(guidance_embeds=True, seed=0):
    """Tiny diffusers model (models.md 2.8 config) with perturbed biases / norm weights."""
    return parity.torch_transformer(seed, guidance_embeds=guidance_embeds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = build_torch()
    d = str(tmp_path_factory.mktemp("flux_tiny"))
    m.save_pretrained(d)
    cfg, params = flux.load_transformer(d)
    rng = np.random.default_rng(0)
    img_ids = np.concatenate([grid_ids(4, 6, 0), grid_ids(3, 5, 1)])   # target 4x6 + Kontext reference 3x5
    inputs = dict(hidden_states=rng.standard_normal((2, 39, 16)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((2, 7, 32)).astype(np.float32),
                  pooled_projections=rng.standard_normal((2, 24)).astype(np.float32),
                  timestep=np.array([0.5, 0.8], np.float32), img_ids=img_ids, txt_ids=np.zeros((7, 3), np.float32),
                  guidance=np.array([2.5, 3.5], np.float32))
    with torch.no_grad():
        ref = m(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()
    return m, cfg, params, inputs, ref, d


def _layer(params, i):
    return jax.tree.map(lambda x: x[i], params)


def test_config_roundtrip(tiny):
    m, cfg, *_ = tiny
    assert cfg.inner_dim == 32 and cfg.guidance_embeds and cfg.axes_dims_rope == (4, 6, 6)
    d = cfg.to_diffusers()
    for k, v in d.items():
        if not k.startswith("_"):
            want = m.config[k]
            assert (list(want) if isinstance(want, (tuple, list)) else want) == v, k


def test_rope_tables_and_rotation(highest_precision):
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    ids = np.concatenate([np.zeros((5, 3), np.float32), grid_ids(7, 9, 0), grid_ids(4, 3, 1)])
    cos_ref, sin_ref = FluxPosEmbed(10000, [4, 6, 6])(torch.from_numpy(ids))
    cos, sin = tr.rope_from_ids(ids, (4, 6, 6))
    np.testing.assert_allclose(np.repeat(np.asarray(cos), 2, axis=-1), cos_ref.numpy(), atol=1e-7)
    np.testing.assert_allclose(np.repeat(np.asarray(sin), 2, axis=-1), sin_ref.numpy(), atol=1e-7)
    # traced ids (float32 angles) agree to ~1e-6 for these small positions
    cos_j, sin_j = jax.jit(lambda i: tr.rope_from_ids(i, (4, 6, 6)))(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(cos_j), np.asarray(cos), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin_j), np.asarray(sin), atol=2e-6)
    q = np.random.default_rng(1).standard_normal((2, ids.shape[0], 2, 16)).astype(np.float32)
    ref = apply_rotary_emb(torch.from_numpy(q), (cos_ref, sin_ref), sequence_dim=1).numpy()
    assert rel_err(tr.apply_rope(jnp.asarray(q), cos, sin), ref) <= TOL


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_time_text_embedding(guidance_embeds, highest_precision, tmp_path):
    m = build_torch(guidance_embeds, seed=3)
    m.save_pretrained(str(tmp_path))
    cfg, params = flux.load_transformer(str(tmp_path))
    t = np.array([0.25, 0.9], np.float32) * 1000
    g = np.array([2.5, 4.0], np.float32) * 1000
    pooled = np.random.default_rng(2).standard_normal((2, 24)).astype(np.float32)
    with torch.no_grad():
        args = (torch.from_numpy(t), torch.from_numpy(g)) if guidance_embeds else (torch.from_numpy(t),)
        ref = m.time_text_embed(*args, torch.from_numpy(pooled)).numpy()
    ours = jax.jit(tr.TimeTextEmbed(cfg).apply)({"params": params["time_text_embed"]}, jnp.asarray(t),
                                                jnp.asarray(g) if guidance_embeds else None, jnp.asarray(pooled))
    assert rel_err(ours, ref) <= TOL


def _block_inputs(cfg, seed=4):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.zeros((5, 3), np.float32), grid_ids(3, 4, 0), grid_ids(2, 3, 1)])
    x = rng.standard_normal((2, 18, cfg.inner_dim)).astype(np.float32)
    c = rng.standard_normal((2, 5, cfg.inner_dim)).astype(np.float32)
    temb = rng.standard_normal((2, cfg.inner_dim)).astype(np.float32)
    return ids, x, c, temb


def test_double_block(tiny, highest_precision):
    m, cfg, params, *_ = tiny
    ids, x, c, temb = _block_inputs(cfg)
    rot = m.pos_embed(torch.from_numpy(ids))
    cos, sin = tr.rope_from_ids(ids, cfg.axes_dims_rope)
    block = jax.jit(tr.DoubleBlock(cfg).apply)
    for i in range(cfg.num_layers):
        with torch.no_grad():
            c_ref, x_ref = m.transformer_blocks[i](torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(temb),
                                                   rot)
        (c_out, x_out), _ = block({"params": _layer(params["transformer_blocks"], i)},
                                                      (jnp.asarray(c), jnp.asarray(x)), jnp.asarray(temb), cos, sin)
        assert rel_err(x_out, x_ref.numpy()) <= TOL
        assert rel_err(c_out, c_ref.numpy()) <= TOL


def test_single_block(tiny, highest_precision):
    m, cfg, params, *_ = tiny
    ids, x, c, temb = _block_inputs(cfg, seed=5)
    rot = m.pos_embed(torch.from_numpy(ids))
    cos, sin = tr.rope_from_ids(ids, cfg.axes_dims_rope)
    block = jax.jit(tr.SingleBlock(cfg).apply)
    for i in range(cfg.num_single_layers):
        with torch.no_grad():
            c_ref, x_ref = m.single_transformer_blocks[i](torch.from_numpy(x), torch.from_numpy(c),
                                                          torch.from_numpy(temb), rot)
        h, _ = block({"params": _layer(params["single_transformer_blocks"], i)},
                     jnp.concatenate([jnp.asarray(c), jnp.asarray(x)], axis=1), jnp.asarray(temb), cos, sin)
        assert rel_err(h[:, :5], c_ref.numpy()) <= TOL
        assert rel_err(h[:, 5:], x_ref.numpy()) <= TOL


def test_whole_model_with_kontext_reference_tokens(tiny, highest_precision):
    _, cfg, params, inputs, ref, _ = tiny
    out = flux.transformer_forward(cfg, params, **inputs)
    assert out.shape == ref.shape == (2, 39, 16)
    assert rel_err(out, ref) <= TOL
    # under an outer jit: traced ids take the float32 RoPE path
    out_jit = jax.jit(flux.transformer_forward, static_argnums=0)(cfg, params, **inputs)
    assert rel_err(out_jit, ref) <= TOL


def test_missing_guidance_raises(tiny):
    _, cfg, params, inputs, _, _ = tiny
    with pytest.raises(ValueError, match="guidance"):
        flux.transformer_forward(cfg, params, **{**inputs, "guidance": None})
