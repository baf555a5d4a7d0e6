"""Pallas splash attention backend for ``layers.attention(..., backend="splash")``.

Uses ``jax.experimental.pallas.ops.tpu.splash_attention`` (block-sparse flash attention for TPU). Masks map onto it
as: causal -> ``CausalMask`` (by index, so only for self-attention, T == S), padding / per-image / per-window
block-diagonal masks -> ``SegmentIds`` (equal ids attend; our id 0 = padding never matches a real token's id).
Sequences are padded to a multiple of the block size (128) with segment id 0; GQA repeats kv heads.
Off TPU the kernel runs in Pallas interpret mode (slow; for tests only). Rows whose query segment id is 0 return
zeros, like the XLA backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _kernel(heads: int, t: int, s: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    mask = sm.MultiHeadMask([one] * heads)
    bs = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                       block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # built per trace (not cached): the kernel holds jnp mask tables, which must belong to the current trace
    return sk.make_splash_mha(mask, block_sizes=bs, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, *, causal: bool = False,
                     q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                     scale: float | None = None, block: int = BLOCK, interpret: bool | None = None) -> jax.Array:
    """Same contract as ``layers.dot_product_attention`` with segment-id masks; differentiable."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    b, t, hq, d = q_bthd.shape
    s, hkv = k_bshd.shape[1], k_bshd.shape[2]
    if hq % hkv:
        raise ValueError(f"splash attention: {hq} query heads is not a multiple of {hkv} key/value heads")
    if causal and t != s:
        raise ValueError(f"splash attention: causal masks need T == S (got {t} vs {s}); use backend='xla' for "
                         f"KV-cache decoding")
    interpret = (jax.default_backend() != "tpu") if interpret is None else interpret
    scale = d ** -0.5 if scale is None else scale
    tp, sp = _round_up(t, block), _round_up(s, block)
    qs = jnp.ones((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    ks = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qs = jnp.broadcast_to(qs, (b, t))
    ks = jnp.broadcast_to(ks, (b, s))
    qs_p = jnp.pad(qs, ((0, 0), (0, tp - t)))
    ks_p = jnp.pad(ks, ((0, 0), (0, sp - s)))
    q_bhtd = jnp.pad((q_bthd * scale).astype(q_bthd.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    rep = hq // hkv
    k_bhsd = jnp.pad(jnp.repeat(k_bshd, rep, axis=2), ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_bhsd = jnp.pad(jnp.repeat(v_bshd, rep, axis=2), ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kernel = _kernel(hq, tp, sp, bool(causal), block, bool(interpret))
    run = lambda q, k, v, a, c: kernel(q, k, v, segment_ids=sk.SegmentIds(q=a, kv=c))
    out_bhtd = jax.vmap(run)(q_bhtd, k_bhsd, v_bhsd, qs_p, ks_p)
    out = out_bhtd.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where((qs > 0)[:, :, None, None], out, 0).astype(q_bthd.dtype)
