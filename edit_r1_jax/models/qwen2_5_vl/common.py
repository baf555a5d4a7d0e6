"""Small Linen building blocks shared by the vision tower and the decoder (logical axes on every weight)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

default_init = nn.initializers.normal(stddev=0.02)


def rms_norm_hf(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Qwen2_5_VLRMSNorm exactly: ``scale * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``.

    The cast back to the input dtype comes *before* the multiply by ``scale`` (matters in bf16; layers.rms_norm
    multiplies in fp32).
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


class RMSNorm(nn.Module):
    """torch: Qwen2_5_VLRMSNorm (``weight`` -> ``scale``)."""
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           jnp.float32)
        return rms_norm_hf(x, scale.astype(x.dtype) if scale.dtype != x.dtype else scale, self.eps)


def dense(features, axes: Sequence[str | None], *, use_bias: bool, name: str, axis=-1, bias_axes=None):
    """nn.DenseGeneral whose kernel (and bias) carry logical axis names (kernel axes = input axes + output axes)."""
    feats = features if isinstance(features, tuple) else (features,)
    if bias_axes is None:
        bias_axes = tuple(axes[-len(feats):])
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, name=name,
        kernel_init=nn.with_logical_partitioning(default_init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, tuple(bias_axes)))


def constrain(x, names):
    """Logical sharding constraint on an activation (no-op without a mesh / rules in context)."""
    return nn.with_logical_constraint(x, names)
