"""Vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel``, §1.3) as Flax Linen modules.

Input is the packed ``pixel_values [N, C*T*P*P]`` of all images plus host-side index arrays from
``vision_meta.vision_meta(image_grid_thw)``; output is the merged features ``[N/4, out_hidden]`` in the original
(raster, merge-block) order, images concatenated in grid order.

Module map (ours -> torch):
  patch_embed (Dense, no bias)   -> patch_embed.proj (Conv3d with kernel == stride: exactly a matmul)
  blocks (nn.scan over depth)    -> blocks.{i}: norm1, attn.qkv, attn.proj, norm2, mlp.{gate,up,down}_proj
  merger.ln_q / mlp_0 / mlp_2    -> merger.ln_q / merger.mlp.0 / merger.mlp.2
Window attention: block i attends within windows unless ``i in fullatt_block_indexes`` (then within each
image frame); selected per layer with ``lax.cond`` inside the scan. Attention never crosses images.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models import layers
from edit_r1_jax.models.qwen2_5_vl.common import RMSNorm, constrain, dense
from edit_r1_jax.models.qwen2_5_vl.config import VisionConfig
from edit_r1_jax.models.qwen2_5_vl.text import remat_policy
from edit_r1_jax.models.qwen2_5_vl.vision_meta import VisionMeta


def meta_arrays(meta: VisionMeta) -> dict:
    """VisionMeta -> dict of int32 jnp arrays consumed by VisionTower."""
    return dict(window_index=jnp.asarray(meta.window_index), reverse_index=jnp.asarray(meta.reverse_index),
                rot_pos=jnp.asarray(meta.rot_pos),
                win=(jnp.asarray(meta.window.gather), jnp.asarray(meta.window.valid), jnp.asarray(meta.window.scatter)),
                full=(jnp.asarray(meta.full.gather), jnp.asarray(meta.full.valid), jnp.asarray(meta.full.scatter)))


def vision_rotary(rot_pos_n2: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Qwen2_5_VLVisionRotaryEmbedding: inv_freq over head_dim/2, cat(f_h, f_w) then cat(emb, emb). fp32 [N, hd]."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = rot_pos_n2.astype(jnp.float32)[..., None] * inv_freq            # [N, 2, hd/4]
    emb = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)               # [N, hd/2]
    emb = jnp.concatenate([emb, emb], axis=-1)                               # [N, hd]
    return jnp.cos(emb), jnp.sin(emb)


def grouped_attention(q_nhd, k_nhd, v_nhd, layout, backend: str) -> jax.Array:
    """Non-causal attention inside the contiguous segments of ``layout`` = (gather [G,L], valid [G,L], scatter [N])."""
    gather, valid, scatter = layout
    n, h, d = q_nhd.shape
    # groups (windows / images) of every image in the batch: split them over the data-parallel axes, or each device
    # computes the [G, H, L, L] scores of the whole global batch
    names = ("activation_batch", None, "activation_heads", None)
    q_glhd, k_glhd, v_glhd = (constrain(x[gather], names) for x in (q_nhd, k_nhd, v_nhd))
    out_glhd = layers.attention(q_glhd, k_glhd, v_glhd, q_segment_ids=valid, kv_segment_ids=valid, backend=backend)
    out_glhd = constrain(out_glhd, names)
    return out_glhd.reshape(-1, h, d)[scatter]


class VisionAttention(nn.Module):
    """torch: Qwen2_5_VLVisionAttention (qkv Linear viewed [N, 3, heads, hd]; proj Linear)."""
    cfg: VisionConfig
    backend: str = "xla"

    @nn.compact
    def __call__(self, x_nd, cos_nd, sin_nd, is_full, win, full):
        c = self.cfg
        qkv = dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"), use_bias=True,
                    name="qkv")(x_nd)                                        # [N, 3, H, hd]
        q_nhd, k_nhd, v_nhd = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q_nhd = layers.apply_rotary_half(q_nhd, cos_nd[:, None], sin_nd[:, None])   # fp32 inside, cast back
        k_nhd = layers.apply_rotary_half(k_nhd, cos_nd[:, None], sin_nd[:, None])
        out_nhd = jax.lax.cond(is_full,
                               lambda q, k, v: grouped_attention(q, k, v, full, self.backend),
                               lambda q, k, v: grouped_attention(q, k, v, win, self.backend),
                               q_nhd, k_nhd, v_nhd)
        return dense(c.hidden_size, ("heads", "head_dim", "embed"), use_bias=True, name="proj",
                     axis=(-2, -1))(out_nhd)


class VisionMLP(nn.Module):
    """torch: Qwen2_5_VLMLP(bias=True): down(silu(gate(x)) * up(x))."""
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        g = dense(c.intermediate_size, ("embed", "mlp"), use_bias=True, name="gate_proj")(x)
        u = dense(c.intermediate_size, ("embed", "mlp"), use_bias=True, name="up_proj")(x)
        return dense(c.hidden_size, ("mlp", "embed"), use_bias=True, name="down_proj")(jax.nn.silu(g) * u)


class VisionBlock(nn.Module):
    """torch: Qwen2_5_VLVisionBlock. Scan-shaped: (carry x, per-layer is_full) -> (x, hidden or None)."""
    cfg: VisionConfig
    backend: str = "xla"
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x_nd, is_full, cos_nd, sin_nd, win, full):
        c = self.cfg
        x_nd = x_nd + VisionAttention(c, self.backend, name="attn")(
            RMSNorm(c.rms_norm_eps, name="norm1")(x_nd), cos_nd, sin_nd, is_full, win, full)
        x_nd = x_nd + VisionMLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="norm2")(x_nd))
        # patches of all images are concatenated (image-major): split them over the data-parallel axes like a batch
        x_nd = constrain(x_nd, ("activation_batch", "activation_embed"))
        return x_nd, (x_nd if self.collect_hidden else None)


class PatchMerger(nn.Module):
    """torch: Qwen2_5_VLPatchMerger: ln_q per patch, group 2x2 patches, Linear -> exact GELU -> Linear."""
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x_nd):
        c = self.cfg
        unit = c.spatial_merge_size ** 2
        x = RMSNorm(1e-6, name="ln_q")(x_nd).reshape(-1, unit * c.hidden_size)
        x = dense(unit * c.hidden_size, ("embed", "mlp"), use_bias=True, name="mlp_0")(x)   # in-dim FSDP-sharded
        x = jax.nn.gelu(x, approximate=False)
        return dense(c.out_hidden_size, ("mlp", "embed"), use_bias=True, name="mlp_2")(x)


class VisionTower(nn.Module):
    cfg: VisionConfig
    backend: str = "xla"
    remat: str = "none"
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, pixel_values, meta: dict):
        """pixel_values [N, patch_dim] (already in the weights' dtype, as torch casts it) -> [N/unit, out].

        With ``collect_hidden`` returns (merged, hidden [depth, N, D] after each block, in window order).
        """
        c = self.cfg
        unit = c.spatial_merge_size ** 2
        x_nd = dense(c.hidden_size, (None, "embed"), use_bias=False, name="patch_embed")(pixel_values)
        n = x_nd.shape[0]
        x_nd = x_nd.reshape(n // unit, unit, -1)[meta["window_index"]].reshape(n, -1)   # window order
        x_nd = constrain(x_nd, ("activation_batch", "activation_embed"))
        cos_nd, sin_nd = vision_rotary(meta["rot_pos"], c.head_dim, c.rope_theta)
        is_full = jnp.asarray(np.isin(np.arange(c.depth), np.asarray(c.fullatt_block_indexes)))
        block = VisionBlock
        if self.remat != "none":
            block = nn.remat(VisionBlock, policy=remat_policy(self.remat), prevent_cse=False)
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                          length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x_nd, hidden = scanned(c, self.backend, self.collect_hidden, name="blocks")(
            x_nd, is_full, cos_nd, sin_nd, meta["win"], meta["full"])
        merged = PatchMerger(c, name="merger")(x_nd)[meta["reverse_index"]]
        return (merged, hidden) if self.collect_hidden else merged
