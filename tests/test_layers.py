"""The shared attention function against a NumPy softmax reference (fp32, highest precision, 1e-6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.models import layers


def _ref_attention(q, k, v, mask):
    b, t, hq, d = q.shape
    rep = hq // k.shape[2]
    k = np.repeat(k, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    logits = np.where(mask, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(logits - m)
    s = p.sum(-1, keepdims=True)
    p = np.where(s > 0, p / np.where(s > 0, s, 1), 0)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_causal_padding_gqa(highest_precision, hq, hkv):
    rng = np.random.default_rng(hq + hkv)
    b, t, d = 2, 7, 8
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    seg = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], np.int32)  # second row left-padded
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, q_segment_ids=seg,
                           kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & (pos[:, None, :] <= pos[:, :, None])
    ref = _ref_attention(q, k, v, mask[:, None])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out)[1, :2] == 0)  # padding rows are zeros, not NaN


def test_block_diagonal_segments(highest_precision):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 6, 2, 4)).astype(np.float32) for _ in range(3))
    seg = np.array([[1, 1, 2, 2, 2, 3]], np.int32)
    out = layers.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    mask = seg[:, :, None] == seg[:, None, :]
    np.testing.assert_allclose(np.asarray(out), _ref_attention(q, k, v, mask[:, None]), rtol=1e-6, atol=1e-6)


def test_bhsd_kv_layout_decode_step(highest_precision):
    """kv_layout='bhsd' (k/v [B,Hkv,S,D]) and 'bhsd_kt' (the KV-cache decode layout: keys [B,Hkv,D,S], values
    [B,Hkv,S,D]) against the reference: one query per row at cache slot 5 of 8, left-padded row, GQA 4/2."""
    rng = np.random.default_rng(3)
    b, s, hq, hkv, d = 2, 8, 4, 2, 8
    q = rng.standard_normal((b, 1, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, hkv, d)).astype(np.float32) for _ in range(2))
    kv_seg = np.array([[1] * s, [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    q_pos, kv_pos = np.full((b, 1), 5), np.broadcast_to(np.arange(s), (b, s))
    out = layers.attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 1, 3)), jnp.asarray(v.transpose(0, 2, 1, 3)),
                           causal=True, q_segment_ids=np.ones((b, 1), np.int32), kv_segment_ids=kv_seg,
                           q_positions=q_pos, kv_positions=kv_pos, kv_layout="bhsd")
    mask = (kv_seg[:, None, :] > 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])
    np.testing.assert_allclose(np.asarray(out), _ref_attention(q, k, v, mask[:, None]), rtol=1e-6, atol=1e-6)
    out_kt = layers.attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1)),          # keys [B,Hkv,D,S]
                              jnp.asarray(v.transpose(0, 2, 1, 3)), causal=True,
                              q_segment_ids=np.ones((b, 1), np.int32), kv_segment_ids=kv_seg, q_positions=q_pos,
                              kv_positions=kv_pos, kv_layout="bhsd_kt")
    np.testing.assert_allclose(np.asarray(out_kt), _ref_attention(q, k, v, mask[:, None]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="kv_layout='bsdh'"):
        layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_layout="bsdh")
    with pytest.raises(ValueError, match="supports kv_layout='bshd' only"):
        layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="splash", kv_layout="bhsd")


def test_unknown_backend():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="attention backend 'flash9' is unknown"):
        layers.attention(x, x, x, backend="flash9")


def test_rms_norm_matches_formula():
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    s = np.linspace(0.5, 1.5, 5).astype(np.float32)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * s
    np.testing.assert_allclose(np.asarray(layers.rms_norm(jnp.asarray(x), jnp.asarray(s), 1e-6)), ref, rtol=1e-6)
