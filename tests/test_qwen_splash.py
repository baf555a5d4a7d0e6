"""Splash attention backend (Pallas, interpret mode on CPU) == XLA backend for the masks the models use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.models import layers


def _qkv(b, t, hq, hkv, d, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, t, hq, d)), jax.random.normal(k[1], (b, t, hkv, d)),
            jax.random.normal(k[2], (b, t, hkv, d)))


@pytest.mark.slow
def test_splash_matches_xla_causal_padding_gqa_and_blocks(highest_precision):
    q, k, v = _qkv(2, 100, 4, 2, 32)               # T not a multiple of the 128 block: padded inside
    pad = (np.arange(100)[None] >= np.array([[0], [37]])).astype(np.int32)   # row 1 left-padded
    blocks = np.repeat(np.arange(1, 6), 20)[None].repeat(2, 0).astype(np.int32)   # 5 segments of 20 ("windows")
    blocks[1, 90:] = 0                              # padding at the end of row 1
    for causal, seg in ((True, pad), (False, blocks), (True, None)):
        kw = dict(causal=causal, q_segment_ids=None if seg is None else jnp.asarray(seg),
                  kv_segment_ids=None if seg is None else jnp.asarray(seg))
        ref = layers.attention(q, k, v, backend="xla", **kw)
        out = jax.jit(lambda q_, k_, v_: layers.attention(q_, k_, v_, backend="splash", **kw))(q, k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_splash_gradient_matches_xla(highest_precision):
    q, k, v = _qkv(1, 128, 2, 1, 16, seed=1)
    seg = jnp.asarray(np.repeat([1, 2], 64)[None].astype(np.int32))

    def loss(backend):
        return lambda q_, k_, v_: jnp.sum(jnp.sin(layers.attention(q_, k_, v_, causal=True, q_segment_ids=seg,
                                                                    kv_segment_ids=seg, backend=backend)))
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_model_forward_with_splash_backend(highest_precision):
    """Whole tiny model (windowed + full vision blocks, causal padded decoder) with attention_backend='splash'."""
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    cfg = q.from_hf_dict(T.tiny_hf_config().to_dict())
    params = q.init_params(cfg, jax.random.key(3))
    grid = np.array([[1, 4, 6]])             # 2x3 merged tokens: two windows (2x2 and a ragged 2x1)
    ids = np.array([[0, 0, 1, 5] + T.image_tokens(grid[0]) + [3, 4]])
    mask = (ids != 0).astype(np.int32)
    pv = T.pixel_values_for(grid)
    ref = q.forward(cfg, params, ids, mask, pv, grid)
    out = q.forward(cfg.replace(attention_backend="splash"), params, ids, mask, pv, grid)
    m = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(ref)[m], atol=1e-4, rtol=1e-4)
