"""Flax Linen building blocks of diffusers' ``AutoencoderKL`` (models.md §3), NHWC inside.

Module names mirror the diffusers state-dict names with ``.N`` written ``_N`` (``down_blocks.0.resnets.1`` ->
``down_blocks_0/resnets_1``), so the checkpoint mapping is mechanical (see ``vae.vae_tensor_maps``).

  GroupNorm       <- torch.nn.GroupNorm (statistics in float32)
  ResnetBlock2D   <- diffusers.models.resnet.ResnetBlock2D (no time embedding, output_scale_factor 1)
  Downsample2D    <- diffusers.models.downsampling.Downsample2D (pad right/bottom by 1, 3x3 conv stride 2)
  Upsample2D      <- diffusers.models.upsampling.Upsample2D (nearest x2, 3x3 conv)
  MidAttention    <- diffusers.models.attention_processor.Attention as built by UNetMidBlock2D (residual, 1 head)
  MidBlock2D      <- diffusers UNetMidBlock2D: resnet -> attention -> resnet
  Encoder/Decoder <- diffusers.models.autoencoders.vae.{Encoder,Decoder}
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edit_r1_jax.models.layers import attention

EPS = 1e-6  # every GroupNorm of the VAE (resnet_eps)


def group_norm(x_bhwc: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """torch GroupNorm on NHWC: per (sample, group) mean/var over H, W and the group's channels (float32)."""
    b, h, w, c = x_bhwc.shape
    xf = x_bhwc.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x_bhwc.dtype)


def activation(name: str):
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"VAE act_fn '{name}' is not supported; expected one of silu, swish, gelu, relu")


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(groups, C, eps, affine=True): params ``scale`` [C], ``bias`` [C]."""
    groups: int
    eps: float = EPS

    @nn.compact
    def __call__(self, x_bhwc):
        c = x_bhwc.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by norm_num_groups={self.groups}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x_bhwc, scale, bias, self.groups, self.eps)


def conv3x3(features: int, name: str) -> nn.Conv:
    """torch Conv2d(k=3, padding=1) with bias; Flax kernel [3,3,I,O]."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)


class ResnetBlock2D(nn.Module):
    """out = shortcut(x) + conv2(act(GN2(conv1(act(GN1(x))))))   (dropout 0, no temb)."""
    out_channels: int
    groups: int
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x_bhwc):
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, name="norm1")(x_bhwc))
        h = conv3x3(self.out_channels, "conv1")(h)
        h = act(GroupNorm(self.groups, name="norm2")(h))
        h = conv3x3(self.out_channels, "conv2")(h)
        shortcut = x_bhwc
        if x_bhwc.shape[-1] != self.out_channels:  # use_in_shortcut: 1x1 conv_shortcut with bias
            shortcut = nn.Conv(self.out_channels, (1, 1), padding="VALID", name="conv_shortcut")(x_bhwc)
        return shortcut + h


class Downsample2D(nn.Module):
    """F.pad(x, (0,1,0,1)) then Conv2d(k=3, stride=2, padding=0); param ``conv``."""
    channels: int

    @nn.compact
    def __call__(self, x_bhwc):
        x_bhwc = jnp.pad(x_bhwc, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", name="conv")(x_bhwc)


class Upsample2D(nn.Module):
    """F.interpolate(scale_factor=2, mode="nearest") then Conv2d(k=3, padding=1); param ``conv``."""
    channels: int

    @nn.compact
    def __call__(self, x_bhwc):
        x_bhwc = jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, "conv")(x_bhwc)


class MidAttention(nn.Module):
    """Spatial self-attention of the mid block (heads = C // head_dim; one head for the VAE).

    h = GN(x) -> [B, HW, C];  out = to_out_0(softmax(q k^T / sqrt(head_dim)) v) + x
    Names: group_norm, to_q, to_k, to_v, to_out_0 (torch ``to_out.0``), all Linear with bias.
    ``query_chunk``: queries are processed in chunks of this many tokens when HW is a larger multiple of it, which
    bounds the [HW, HW] score matrix (16k tokens at 1024^2) without changing the result.
    """
    groups: int
    head_dim: int
    query_chunk: int = 4096
    backend: str = "xla"

    @nn.compact
    def __call__(self, x_bhwc):
        b, hh, ww, c = x_bhwc.shape
        heads = c // self.head_dim
        h = GroupNorm(self.groups, name="group_norm")(x_bhwc).reshape(b, hh * ww, c)
        q_bthd = nn.Dense(c, name="to_q")(h).reshape(b, hh * ww, heads, self.head_dim)
        k_bshd = nn.Dense(c, name="to_k")(h).reshape(b, hh * ww, heads, self.head_dim)
        v_bshd = nn.Dense(c, name="to_v")(h).reshape(b, hh * ww, heads, self.head_dim)
        t = hh * ww
        chunk = self.query_chunk
        if chunk and t > chunk and t % chunk == 0:
            q_nbthd = q_bthd.reshape(b, t // chunk, chunk, heads, self.head_dim).transpose(1, 0, 2, 3, 4)
            o_nbthd = jax.lax.map(lambda q: attention(q, k_bshd, v_bshd, backend=self.backend), q_nbthd)
            o_bthd = o_nbthd.transpose(1, 0, 2, 3, 4).reshape(b, t, heads, self.head_dim)
        else:
            o_bthd = attention(q_bthd, k_bshd, v_bshd, backend=self.backend)
        o = nn.Dense(c, name="to_out_0")(o_bthd.reshape(b, t, c))
        return o.reshape(b, hh, ww, c) + x_bhwc


class MidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 (if add_attention) -> resnets_1, all at C channels."""
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    query_chunk: int = 4096

    @nn.compact
    def __call__(self, x_bhwc):
        c = x_bhwc.shape[-1]
        x_bhwc = ResnetBlock2D(c, self.groups, self.act_fn, name="resnets_0")(x_bhwc)
        if self.add_attention:
            x_bhwc = MidAttention(self.groups, c, self.query_chunk, name="attentions_0")(x_bhwc)
        return ResnetBlock2D(c, self.groups, self.act_fn, name="resnets_1")(x_bhwc)


class DownEncoderBlock2D(nn.Module):
    """``layers`` resnets (the first maps in->out channels) then an optional downsampler."""
    out_channels: int
    layers: int
    groups: int
    add_downsample: bool
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x_bhwc):
        for j in range(self.layers):
            x_bhwc = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, name=f"resnets_{j}")(x_bhwc)
        if self.add_downsample:
            x_bhwc = Downsample2D(self.out_channels, name="downsamplers_0")(x_bhwc)
        return x_bhwc


class UpDecoderBlock2D(nn.Module):
    """``layers`` resnets then an optional nearest-x2 upsampler."""
    out_channels: int
    layers: int
    groups: int
    add_upsample: bool
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x_bhwc):
        for j in range(self.layers):
            x_bhwc = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, name=f"resnets_{j}")(x_bhwc)
        if self.add_upsample:
            x_bhwc = Upsample2D(self.out_channels, name="upsamplers_0")(x_bhwc)
        return x_bhwc


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block -> GN -> act -> conv_out (2*latent channels: mean, logvar)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    query_chunk: int = 4096

    @nn.compact
    def __call__(self, x_bhwc):
        chans = tuple(self.block_out_channels)
        x_bhwc = conv3x3(chans[0], "conv_in")(x_bhwc)
        for i, c in enumerate(chans):
            x_bhwc = DownEncoderBlock2D(c, self.layers_per_block, self.groups, i < len(chans) - 1, self.act_fn,
                                        name=f"down_blocks_{i}")(x_bhwc)
        x_bhwc = MidBlock2D(self.groups, self.act_fn, self.add_attention, self.query_chunk, name="mid_block")(x_bhwc)
        x_bhwc = activation(self.act_fn)(GroupNorm(self.groups, name="conv_norm_out")(x_bhwc))
        return conv3x3(2 * self.latent_channels, "conv_out")(x_bhwc)


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (layers_per_block+1 resnets each) -> GN -> act -> conv_out."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    query_chunk: int = 4096

    @nn.compact
    def __call__(self, z_bhwc):
        rev = tuple(reversed(tuple(self.block_out_channels)))
        x_bhwc = conv3x3(rev[0], "conv_in")(z_bhwc)
        x_bhwc = MidBlock2D(self.groups, self.act_fn, self.add_attention, self.query_chunk, name="mid_block")(x_bhwc)
        for i, c in enumerate(rev):
            x_bhwc = UpDecoderBlock2D(c, self.layers_per_block + 1, self.groups, i < len(rev) - 1, self.act_fn,
                                      name=f"up_blocks_{i}")(x_bhwc)
        x_bhwc = activation(self.act_fn)(GroupNorm(self.groups, name="conv_norm_out")(x_bhwc))
        return conv3x3(self.out_channels, "conv_out")(x_bhwc)
