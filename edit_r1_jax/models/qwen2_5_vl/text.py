"""Language model (transformers ``Qwen2_5_VLTextModel``, §1.5): Qwen2 decoder with GQA, qkv bias, M-RoPE.

Module map (ours -> torch):
  Attention.q_proj/k_proj/v_proj  -> self_attn.{q,k,v}_proj (kernels [D, heads, hd], bias [heads, hd])
  Attention.o_proj                -> self_attn.o_proj (kernel [heads, hd, D], no bias)
  MLP.gate_proj/up_proj/down_proj -> mlp.* (no bias)
  DecoderLayer.input_layernorm / post_attention_layernorm -> same names
Layers are stacked with ``nn.scan`` (leading 'layers' axis on every weight). A layer optionally reads/writes a KV
cache slice (generation): new keys/values are written at ``cache_index`` and queries attend to cache slots
``<=`` their own slot whose ``kv_segment_ids`` is non-zero.

Two cache layouts: the scanned stack (prefill) holds ``[L, B, S, Hkv, hd]`` per K/V; the single-token decode step
(``decode_layers_unrolled``) runs the layers as a Python loop on per-layer weights and per-layer caches, keys
``[B, Hkv, hd, S]`` and values ``[B, Hkv, S, hd]`` ("bhsd_kt": both attention products are then plain matmuls
on contiguous blocks, keys already transposed). Inside a ``while_loop`` the scan's dynamic slicing of the stacked
weights and caches copies every layer's weights (and its cache, plus a transposed copy for the attention matmuls) on
every token; the unrolled form reads weights and caches in place and updates each cache in place (one token's slot).
On CPU the decode step also takes its projection kernels output-major (``to_out_in``, ``common.DenseOutIn``): for
the step's few rows the weight read is the cost, and XLA:CPU's GEMM streams a left-operand [out, in] weight faster;
there q/k/v and gate/up are fused into one kernel each (``fuse_projections``: ``Attention.qkv_proj``,
``MLP.gate_up_proj``, kernel_t [Hkv, Hq/Hkv + 2, hd, D] and [I, 2, D]), one product instead of several smaller ones.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from edit_r1_jax.models import layer_layout, layers
from edit_r1_jax.models.qwen2_5_vl.common import FUSED_KERNEL_LAYOUTS, RMSNorm, constrain, dense_in_layout
from edit_r1_jax.models.qwen2_5_vl.config import TextConfig
from edit_r1_jax.native.panel_matmul import pack_panels

_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,                                           # no rematerialisation
    "full": _cp.nothing_saveable,                           # recompute everything in the backward pass
    "dots": _cp.checkpoint_dots,                            # keep matmul outputs
    "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,  # keep weight matmuls, recompute attention
    "attn_mlp_out": _cp.save_only_these_names("attn_out", "mlp_out"),   # keep the two residual branches
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r}: expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def mrope_cos_sin(position_ids_3bt: jax.Array, head_dim: int, theta: float, section, dtype):
    """Qwen2_5_VLRotaryEmbedding: per-frequency axis choice by ``mrope_section`` (chunk k follows axis k % 3).

    -> cos, sin [B, T, head_dim], computed in fp32 then cast to the activation dtype (as torch does).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))   # [hd/2]
    freqs_3btf = position_ids_3bt.astype(jnp.float32)[..., None] * inv_freq
    axis_of_freq = jnp.concatenate([jnp.full((s,), i % 3, jnp.int32) for i, s in enumerate(section)])
    onehot_3f = jax.nn.one_hot(axis_of_freq, 3, dtype=jnp.float32).T                        # [3, hd/2]
    f_btf = jnp.sum(freqs_3btf * onehot_3f[:, None, None, :], axis=0)   # exact: one non-zero term per frequency
    emb = jnp.concatenate([f_btf, f_btf], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary_activation_dtype(x_bthd, cos_btd, sin_btd):
    """torch apply_rotary_pos_emb: q*cos + rotate_half(q)*sin in the activation dtype."""
    cos, sin = cos_btd[:, :, None, :].astype(x_bthd.dtype), sin_btd[:, :, None, :].astype(x_bthd.dtype)
    return x_bthd * cos + layers.rotate_half(x_bthd) * sin


class Attention(nn.Module):
    cfg: TextConfig
    backend: str = "xla"
    cache_layout: str = "bshd"      # "bshd": K/V [B,S,Hkv,hd] (scanned stack); "bhsd_kt": K [B,Hkv,hd,S], V [B,Hkv,S,hd]
    kernel_layout: str = "in_out"   # "out_in": kernels stored output-major (`to_out_in`; the CPU decode step)

    @nn.compact
    def __call__(self, x_btd, cos, sin, segment_ids, cache=None, cache_index=None, kv_segment_ids=None):
        c = self.cfg
        hd = c.head_dim
        dense = functools.partial(dense_in_layout, self.kernel_layout)
        if self.kernel_layout in FUSED_KERNEL_LAYOUTS:   # q, k, v as one product on `fuse_projections`' qkv_proj
            nkv, rep = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
            qkv = dense((nkv, rep + 2, hd), (), use_bias=True, name="qkv_proj")(x_btd)  # [B, T, Hkv, rep+2, hd]
            q_bthd = qkv[:, :, :, :rep].reshape(qkv.shape[:2] + (nkv * rep, hd))
            k_bthd, v_bthd = qkv[:, :, :, rep], qkv[:, :, :, rep + 1]
        else:
            q_bthd = dense((c.num_attention_heads, hd), ("embed", "heads", "head_dim"), use_bias=True,
                           name="q_proj")(x_btd)
            k_bthd = dense((c.num_key_value_heads, hd), ("embed", "kv_heads", "head_dim"), use_bias=True,
                           name="k_proj")(x_btd)
            v_bthd = dense((c.num_key_value_heads, hd), ("embed", "kv_heads", "head_dim"), use_bias=True,
                           name="v_proj")(x_btd)
        q_bthd = apply_rotary_activation_dtype(q_bthd, cos, sin)
        k_bthd = apply_rotary_activation_dtype(k_bthd, cos, sin)
        q_bthd = constrain(q_bthd, ("activation_batch", "activation_length", "activation_heads", None))
        if cache is None:
            out = layers.attention(q_bthd, k_bthd, v_bthd, causal=True, q_segment_ids=segment_ids,
                                   kv_segment_ids=segment_ids, backend=self.backend)
            new_cache = None
        else:
            ck_bshd, cv_bshd = cache
            b, t = x_btd.shape[:2]
            if self.cache_layout == "bhsd_kt":            # ck_bshd [B, Hkv, hd, S], cv_bshd [B, Hkv, S, hd] here
                s = cv_bshd.shape[2]
                k_new, k_at = k_bthd.transpose(0, 2, 3, 1), (0, 0, 0, cache_index)
                v_new, v_at = v_bthd.transpose(0, 2, 1, 3), (0, 0, cache_index, 0)
            else:
                s = ck_bshd.shape[1]
                k_new, v_new, k_at = k_bthd, v_bthd, (0, cache_index, 0, 0)
                v_at = k_at
            ck_bshd = jax.lax.dynamic_update_slice(ck_bshd, k_new.astype(ck_bshd.dtype), k_at)
            cv_bshd = jax.lax.dynamic_update_slice(cv_bshd, v_new.astype(cv_bshd.dtype), v_at)
            q_pos = jnp.broadcast_to(cache_index + jnp.arange(t)[None], (b, t))
            kv_pos = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
            q_seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
            out = layers.attention(q_bthd, ck_bshd.astype(q_bthd.dtype), cv_bshd.astype(q_bthd.dtype), causal=True,
                                   q_segment_ids=q_seg, kv_segment_ids=kv_segment_ids, q_positions=q_pos,
                                   kv_positions=kv_pos, backend="xla", kv_layout=self.cache_layout)
            new_cache = (ck_bshd, cv_bshd)
        o = dense(c.hidden_size, ("heads", "head_dim", "embed"), use_bias=False, axis=(-2, -1), name="o_proj")(out)
        return o, new_cache


class MLP(nn.Module):
    cfg: TextConfig
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = functools.partial(dense_in_layout, self.kernel_layout)
        if self.kernel_layout in FUSED_KERNEL_LAYOUTS:   # gate and up as one product on `fuse_projections`'
            gu = dense((c.intermediate_size, 2), (), use_bias=False, name="gate_up_proj")(x)    # [..., I, 2]
            g, u = gu[..., 0], gu[..., 1]
        else:
            g = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="gate_proj")(x)
            u = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="up_proj")(x)
        h = constrain(jax.nn.silu(g) * u, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(c.hidden_size, ("mlp", "embed"), use_bias=False, name="down_proj")(h)


class DecoderLayer(nn.Module):
    """torch: Qwen2_5_VLDecoderLayer. Scan-shaped: (carry x, per-layer cache) -> (x, (new_cache, hidden))."""
    cfg: TextConfig
    backend: str = "xla"
    collect_hidden: bool = False
    cache_layout: str = "bshd"
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, x_btd, cache, cos, sin, segment_ids, cache_index, kv_segment_ids):
        c = self.cfg
        h, new_cache = Attention(c, self.backend, self.cache_layout, self.kernel_layout, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x_btd), cos, sin, segment_ids, cache, cache_index,
            kv_segment_ids)
        x_btd = x_btd + checkpoint_name(h, "attn_out")
        m = MLP(c, self.kernel_layout, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x_btd))
        x_btd = x_btd + checkpoint_name(m, "mlp_out")
        x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        return x_btd, (new_cache, x_btd if self.collect_hidden else None)


def decoder_stack(cfg: TextConfig, backend: str, remat: str, collect_hidden: bool, name: str = "layers"):
    """The scanned decoder: call as ``stack(x, cache_or_None, cos, sin, segment_ids, cache_index, kv_segment_ids)``."""
    block = DecoderLayer
    if remat != "none":
        block = nn.remat(DecoderLayer, policy=remat_policy(remat), prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, backend, collect_hidden, name=name)


def unstack_layers(stacked: dict, num_layers: int) -> list:
    """Per-layer param trees (torch ``layers.i``) from the scanned stack's params (leading 'layers' axis)."""
    layer_trees = layer_layout.split_layers(stacked)
    if len(layer_trees) != num_layers:
        raise ValueError(f"unstack_layers: the stack holds {len(layer_trees)} layers, expected {num_layers}")
    return layer_trees


def stack_cache_to_step(cache) -> tuple:
    """Scanned-stack cache (K, V each [L, B, S, Hkv, hd]) -> per-layer ((K [B, Hkv, hd, S], V [B, Hkv, S, hd]), ...),
    the decode step's "bhsd_kt" layout."""
    ck, cv = cache
    return tuple((ck[i].transpose(0, 2, 3, 1), cv[i].transpose(0, 2, 1, 3)) for i in range(ck.shape[0]))


# per module: how many kernel axes are inputs (o_proj contracts heads and head_dim); the fused decode kernels
# (`fuse_projections`) included
_KERNEL_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                      "down_proj": 1, "qkv_proj": 1, "gate_up_proj": 1}


def _relayout_kernels(tree: dict, field: str, new_field: str, relayout) -> dict:
    """``tree`` with every projection's ``field`` replaced by ``new_field`` = ``relayout(kernel, n_in)`` (n_in: its
    number of input axes, `_KERNEL_INPUT_AXES`); biases, norms and everything else unchanged."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k in _KERNEL_INPUT_AXES and field in v:
            out[k] = {**{n: a for n, a in v.items() if n != field},
                      new_field: relayout(v[field], _KERNEL_INPUT_AXES[k])}
        else:
            out[k] = _relayout_kernels(v, field, new_field, relayout) if isinstance(v, dict) else v
    return out


def to_out_in(layer_tree: dict) -> dict:
    """One layer's params with every projection kernel [in..., out...] replaced by ``kernel_t`` [out..., in...]
    (`common.DenseOutIn`); norms and biases unchanged."""
    return _relayout_kernels(layer_tree, "kernel", "kernel_t", lambda kern, n_in: jnp.transpose(
        kern, tuple(range(n_in, kern.ndim)) + tuple(range(n_in))))


def fuse_projections(layer_t: dict) -> dict:
    """One decoder layer's `to_out_in` params with q/k/v fused into ``self_attn.qkv_proj`` (kernel_t [Hkv, rep + 2,
    hd, D], bias [Hkv, rep + 2, hd]: per KV group its rep = Hq/Hkv query heads, its key, its value) and gate/up into
    ``mlp.gate_up_proj`` (kernel_t [I, 2, D]). Both keep the tensor-parallel axis (KV heads, the MLP width) leading
    and the fused pieces inside it, so a mesh that shards heads or the MLP splits them without moving data. The decode
    step ("out_in") reads them in one product each instead of three and two smaller ones (fewer ops per step; A/B in
    BENCHMARKS.md "Session 7")."""
    a, m = layer_t["self_attn"], layer_t["mlp"]
    nkv = a["k_proj"]["kernel_t"].shape[0]

    def grouped(name, field):            # [H, hd, ...] -> [Hkv, H / Hkv, hd, ...]
        w = a[name][field]
        return w.reshape((nkv, w.shape[0] // nkv) + w.shape[1:])
    qkv = {f: jnp.concatenate([grouped(n, f) for n in ("q_proj", "k_proj", "v_proj")], axis=1)
           for f in ("kernel_t", "bias")}
    gate_up = {"kernel_t": jnp.stack([m["gate_proj"]["kernel_t"], m["up_proj"]["kernel_t"]], axis=1)}
    return {**layer_t, "self_attn": {"qkv_proj": qkv, "o_proj": a["o_proj"]},
            "mlp": {"gate_up_proj": gate_up, "down_proj": m["down_proj"]}}


def to_panels(layer_fused: dict) -> dict:
    """One layer's `fuse_projections` params with every ``kernel_t`` [out..., in...] replaced by ``kernel_p``
    [ceil(O / 32), K, 32] (`common.DensePanel`, the native CPU decode kernel's packing); biases and norms unchanged."""
    def pack(kern, n_in):
        n_out = kern.ndim - n_in
        return pack_panels(kern.reshape(math.prod(kern.shape[:n_out]), math.prod(kern.shape[n_out:])))
    return _relayout_kernels(layer_fused, "kernel_t", "kernel_p", pack)


def decode_layers_unrolled(cfg: TextConfig, layer_params: list, x_btd, caches, cos, sin, segment_ids, cache_index,
                           kv_segment_ids, kernel_layout: str = "in_out"):
    """The decoder stack as a Python loop over layers for KV-cache decoding (same math as the scanned stack).

    layer_params: ``unstack_layers(params['layers'])`` (hoist it out of the decode loop), each through `to_out_in`
    and `fuse_projections` when ``kernel_layout="out_in"``; caches: per-layer (K [B, Hkv, hd, S], V [B, Hkv, S, hd])
    (``stack_cache_to_step``).
    -> (x [B,T,D] before the final norm, new caches).
    """
    layer = DecoderLayer(cfg, "xla", False, "bhsd_kt", kernel_layout, parent=None)
    new = []
    for p, cache in zip(layer_params, caches):
        x_btd, (cache, _) = layer.apply({"params": p}, x_btd, cache, cos, sin, segment_ids, cache_index,
                                        kv_segment_ids)
        new.append(cache)
    return x_btd, tuple(new)
