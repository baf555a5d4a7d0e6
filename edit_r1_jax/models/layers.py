"""Layers shared by the model ports: norms, rotary embeddings helpers, and the one attention function.

Attention backends (``backend=``):
  "xla"    - plain dot-product attention (default; CPU, GPU, TPU). Softmax in float32.
  "splash" - Pallas splash attention on TPU (interpret mode on CPU for tests); added by the Qwen2.5-VL port.
Masks are expressed as *segment ids* (tokens attend only within equal segment ids; id 0 = padding, attends to
nothing and is attended by nothing) plus an optional causal flag with explicit positions, which covers causal LM,
left/right padding, per-image and per-window block-diagonal vision attention, and KV-cache decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, compute_dtype=jnp.float32) -> jax.Array:
    """RMSNorm as Qwen2RMSNorm / T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, computed in float32."""
    dtype = x.dtype
    xf = x.astype(compute_dtype)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + eps)
    return (scale.astype(compute_dtype) * y).astype(dtype) if scale is not None else y.astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """torch.nn.LayerNorm over the last axis (float32 statistics)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """NeoX-style rotate_half: cat(-x[d/2:], x[:d/2])."""
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x*cos + rotate_half(x)*sin with cos/sin broadcastable to x (computed in float32)."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def attention_mask_from_segments(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                                 causal: bool, q_positions: jax.Array | None, kv_positions: jax.Array | None,
                                 tq: int, tk: int) -> jax.Array | None:
    """Boolean mask [B or 1, 1, Tq, Tk] (True = may attend) from segment ids and causal positions."""
    mask = None
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = q_segment_ids if q_segment_ids is not None else jnp.ones((1, tq), jnp.int32)
        ks = kv_segment_ids if kv_segment_ids is not None else jnp.ones((1, tk), jnp.int32)
        mask = (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0) & (ks[:, None, :] != 0)
        mask = mask[:, None]
    if causal:
        qp = q_positions if q_positions is not None else jnp.arange(tq)[None]
        kp = kv_positions if kv_positions is not None else jnp.arange(tk)[None]
        c = (kp[:, None, :] <= qp[:, :, None])[:, None]
        mask = c if mask is None else (mask & c)
    return mask


KV_LAYOUTS = ("bshd", "bhsd", "bhsd_kt")   # key/value axis orders ("bhsd_kt": keys [B,Hkv,D,S], values [B,Hkv,S,D])


def dot_product_attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, scale: float | None = None,
                          kv_layout: str = "bshd") -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v with grouped-query heads (H_q a multiple of H_kv).

    q [B,T,Hq,D], k/v [B,S,Hkv,D] (``kv_layout="bshd"``), [B,Hkv,S,D] (``"bhsd"``: per-head [S,D] blocks feed the
    matmuls without a transpose copy) or keys [B,Hkv,D,S] with values [B,Hkv,S,D] (``"bhsd_kt"``: the KV-cache decode
    layout; q k^T is then a plain [rep*T, D] x [D, S] product, which XLA:CPU's library GEMM runs faster than the
    transposed-operand form for a decode step's few query rows), mask bool broadcastable to [B,Hq,T,S], bias float
    broadcastable likewise. Rows with no visible key produce zeros (not NaN).
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"attention: kv_layout={kv_layout!r}, expected one of {sorted(KV_LAYOUTS)}")
    b, t, hq, d = q_bthd.shape
    hkv = k_bshd.shape[2 if kv_layout == "bshd" else 1]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {hkv} key/value heads")
    rep = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    # Heads-major operands, transposed explicitly: XLA:CPU then runs both dots on contiguous per-head [T,D]/[S,D]
    # blocks. Writing the einsums on the [B,T,H,D] layout directly lets layout assignment pick transposed dot
    # outputs and copy the [T,S] logits twice per call (2.1x slower at 576 tokens, measured in session 4).
    # Query heads of one KV group are folded into the query length (GQA): plain [B, Hkv, rep*T, D] batched dots.
    q_bkmd = q_bthd.reshape(b, t, hkv, rep, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rep * t, d)
    v_bksd = v_bshd.transpose(0, 2, 1, 3) if kv_layout == "bshd" else v_bshd
    if kv_layout == "bhsd_kt":
        logits_bkms = jnp.einsum("bkmd,bkds->bkms", q_bkmd, k_bshd, preferred_element_type=jnp.float32) * scale
    else:
        k_bksd = k_bshd.transpose(0, 2, 1, 3) if kv_layout == "bshd" else k_bshd
        logits_bkms = jnp.einsum("bkmd,bksd->bkms", q_bkmd, k_bksd, preferred_element_type=jnp.float32) * scale
    logits = logits_bkms.reshape(b, hq, t, -1)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    probs_bkms = probs.reshape(b, hkv, rep * t, -1).astype(v_bshd.dtype)
    out_bkmd = jnp.einsum("bkms,bksd->bkmd", probs_bkms, v_bksd, preferred_element_type=jnp.float32)
    out_bkrtd = out_bkmd.reshape(b, hkv, rep, t, d)
    return out_bkrtd.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q_bthd.dtype)


def attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, *, causal: bool = False,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None, backend: str = "xla",
              kv_layout: str = "bshd") -> jax.Array:
    """The one attention entry point used by every model. See the module docstring for masks and backends.

    ``kv_layout``: "bshd" (k/v [B,S,Hkv,D], default), "bhsd" ([B,Hkv,S,D]) or "bhsd_kt" (keys [B,Hkv,D,S], values
    [B,Hkv,S,D]; KV-cache decoding); the last two with the "xla" backend only."""
    if backend == "xla":
        s = v_bshd.shape[1 if kv_layout == "bshd" else 2]
        mask = attention_mask_from_segments(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions,
                                            q_bthd.shape[1], s)
        return dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask, bias=bias, scale=scale, kv_layout=kv_layout)
    if kv_layout != "bshd":
        raise ValueError(f"attention backend '{backend}' supports kv_layout='bshd' only, got {kv_layout!r}")
    if backend == "splash":
        from edit_r1_jax.models import splash  # provided by the Qwen2.5-VL port
        return splash.splash_attention(q_bthd, k_bshd, v_bshd, causal=causal, q_segment_ids=q_segment_ids,
                                       kv_segment_ids=kv_segment_ids, scale=scale)
    raise ValueError(f"attention backend '{backend}' is unknown; expected 'xla' or 'splash'")
