"""Small Linen building blocks shared by the vision tower and the decoder (logical axes on every weight)."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edit_r1_jax.native import panel_matmul as pm

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


# Above this many rows (product of x's non-contracted dims) `DenseOutIn` multiplies x on the left (a prefill's GEMM);
# at or below it, the weight (a decode step's few rows, where reading the weight is the cost).
OUT_IN_MAX_LEFT_WEIGHT_ROWS = 64


def _out_features_and_input_axes(module: str, features, axis, x) -> tuple[tuple[int, ...], int]:
    """(output features as a tuple, number of contracted input axes) of a dense layer that contracts x's trailing
    ``axis`` (an int or a tuple); other axes are an error naming ``module``."""
    feats = features if isinstance(features, tuple) else (features,)
    axes = tuple(a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise ValueError(f"{module} contracts trailing axes only, got axis={axis} for x {x.shape}")
    return feats, len(axes)


class DenseOutIn(nn.Module):
    """``dense`` with the kernel stored output-major, ``kernel_t`` [out..., in...] (the torch ``nn.Linear`` order).
    Same result as ``dense`` on ``kernel = kernel_t`` transposed; used by generation on CPU. For a decode step's few
    rows (<= ``OUT_IN_MAX_LEFT_WEIGHT_ROWS``) it computes ``dot_general(kernel_t, x)`` with the weight as the left
    operand: XLA's library GEMM streams a left-operand [out, in] weight about twice as fast as a right-operand
    [in, out] one (memory-bound, 8 rows). For more rows (the prefill) it computes ``x kernel_t^T`` (torch's
    ``F.linear`` form), which needs no transposed copy of the activations.
    Never initialised: its params come from `text.to_out_in`."""
    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        feats, n_in = _out_features_and_input_axes("DenseOutIn", self.features, self.axis, x)
        in_shape = x.shape[x.ndim - n_in:]
        kernel_t = self.param("kernel_t", nn.initializers.zeros, feats + in_shape, x.dtype)
        # A 2-D kernel [out, in]: with several output or input axes XLA would copy it into [in, out] order for the
        # x-left product. x keeps its batch axes: a [out, rows] product followed by a 2-D transpose is rewritten by
        # XLA into the x-left product, which loses the fast weight-left form.
        w_oi = kernel_t.astype(x.dtype).reshape(math.prod(feats), math.prod(in_shape))
        x_bi = x.reshape(x.shape[:x.ndim - n_in] + (w_oi.shape[1],))                          # [batch..., in]
        contract = ((x_bi.ndim - 1,), (1,))
        if math.prod(x_bi.shape[:-1]) > OUT_IN_MAX_LEFT_WEIGHT_ROWS:
            y = jax.lax.dot_general(x_bi, w_oi, (contract, ((), ())))                         # [batch..., out]
        else:
            y = jax.lax.dot_general(w_oi, x_bi, (contract[::-1], ((), ())))                   # [out, batch...]
            y = jnp.moveaxis(y, 0, -1)                                                         # [batch..., out]
        y = y.reshape(x.shape[:x.ndim - n_in] + feats)                                         # [batch..., out...]
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, feats, x.dtype).astype(y.dtype)
        return y


class DensePanel(nn.Module):
    """``dense`` with the kernel packed in panels of 32 outputs, ``kernel_p`` [ceil(O / 32), K, 32] (O, K: the
    products of the output and input axes; `native.panel_matmul.pack_panels` of the [O, K] output-major kernel).
    The product runs in the native CPU kernel (`native.panel_matmul`): for a decode step's few rows it streams the
    weights once for all rows; for a prefill's hundreds of rows it is on par with XLA's x-left GEMM on ``kernel_t``
    (0.93 of its rate, 512 rows; XLA's own product on the panels: 0.88), so one packed copy serves both.
    Same result as ``dense``. Never initialised: its params come from `text.to_panels`."""
    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        feats, n_in = _out_features_and_input_axes("DensePanel", self.features, self.axis, x)
        n_out, k = math.prod(feats), math.prod(x.shape[x.ndim - n_in:])
        kernel_p = self.param("kernel_p", nn.initializers.zeros, (pm.num_panels(n_out), k, pm.PANEL), x.dtype)
        y = pm.panel_matmul(kernel_p, x.reshape(-1, k), n_out)                                # [rows, out]
        y = y.reshape(x.shape[:x.ndim - n_in] + feats)                                         # [batch..., out...]
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, feats, x.dtype).astype(y.dtype)
        return y


KERNEL_LAYOUTS = ("in_out", "out_in", "panel")
# layouts whose decoder layer reads `text.fuse_projections`' fused qkv_proj and gate_up_proj
FUSED_KERNEL_LAYOUTS = ("out_in", "panel")


def dense_in_layout(layout: str, features, axes: Sequence[str | None], *, use_bias: bool, name: str, axis=-1):
    """``dense`` ("in_out": Flax's kernel [in..., out...]), `DenseOutIn` ("out_in": ``kernel_t``) or `DensePanel`
    ("panel": ``kernel_p``)."""
    if layout == "out_in":
        return DenseOutIn(features, axis=axis, use_bias=use_bias, name=name)
    if layout == "panel":
        return DensePanel(features, axis=axis, use_bias=use_bias, name=name)
    if layout != "in_out":
        raise ValueError(f"kernel layout {layout!r}: expected one of {KERNEL_LAYOUTS}")
    return dense(features, axes, use_bias=use_bias, name=name, axis=axis)


_SHARDING = contextvars.ContextVar("qwen2_5_vl_sharding", default=None)


@contextlib.contextmanager
def sharding_context(mesh, rules):
    """While tracing, make ``constrain`` emit sharding constraints for ``mesh`` under logical ``rules``."""
    token = _SHARDING.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _SHARDING.reset(token)


def current_sharding():
    """(mesh, rules) of the enclosing ``sharding_context``, or None."""
    return _SHARDING.get()


def constrain(x, names):
    """Logical sharding constraint on an activation.

    Inside ``sharding_context(mesh, rules)``: mesh axes that do not divide a dimension are dropped for that dim
    (e.g. batch 1 on a 4-way data axis). Otherwise falls back to ``nn.with_logical_constraint`` (a no-op unless the
    caller set ``nn.logical_axis_rules`` and a global mesh).
    """
    ctx = _SHARDING.get()
    if ctx is None:
        return nn.with_logical_constraint(x, names)
    from edit_r1_jax import parallel
    mesh, rules = ctx
    spec = parallel.fit_spec_to_shape(parallel.logical_to_mesh_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
