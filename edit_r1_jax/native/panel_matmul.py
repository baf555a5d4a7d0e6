"""The CPU decode step's weight-streaming product as a native kernel: ``y [R, O] = x [R, K] W^T``, with W [O, K]
held packed in panels of 32 outputs (``w_pk32`` [ceil(O / 32), K, 32], zero-padded). Made for a decode step's few
rows R; for a prefill's hundreds it runs at 0.93 of XLA's GEMM rate, so the prefill uses the same packed copy.

XLA:CPU's library GEMM reads a decode step's weights at the machine's rate for one row but, for 8 rows, adds the
rows' arithmetic on top of the read time (BENCHMARKS.md, sessions 7-8); ``panel_matmul.cc`` loads each weight vector
once for all rows of a register tile and prefetches ahead of the stream, so 8 rows cost about one row's read.
`common.DensePanel` uses it for the decode step (``decode_layout="panel"``, `generate.resolve_decode_layout`).

The kernel is built from source on first use (`build.load_ffi_target`). Where it cannot be built, `usable()` is
False, the reason is logged once, and "auto" layouts fall back to XLA's product. ``EDIT_R1_JAX_NATIVE=0`` disables it.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from edit_r1_jax.native import build

log = logging.getLogger(__name__)

PANEL = 32                      # outputs per panel (panel_matmul.cc: kPanel)
TARGET = "edit_r1_panel_matmul"
SOURCE, SYMBOL = "panel_matmul.cc", "EditR1PanelMatmul"


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """None when the kernel is registered, else why it is not."""
    if os.environ.get("EDIT_R1_JAX_NATIVE", "1") == "0":
        return "disabled by EDIT_R1_JAX_NATIVE=0"
    try:
        build.load_ffi_target(SOURCE, SYMBOL, TARGET)
    except build.NativeBuildError as e:
        log.warning("native panel_matmul kernel unavailable, decoding with XLA's product instead: %s", e)
        return str(e)
    return None


def usable() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def preferred() -> bool:
    """Whether "auto" decode layouts should use the kernel: it is usable and the CPU has AVX-512 (where it was
    measured faster than XLA's product; on narrower vector units its 16-float vectors split and spill)."""
    return "avx512f" in build.cpu_flags().split() and usable()


def num_panels(out_features: int) -> int:
    return -(-out_features // PANEL)


def pack_panels(w_ok: jax.Array) -> jax.Array:
    """[O, K] output-major weight -> panels [ceil(O / 32), K, 32] (outputs beyond O are zero)."""
    o, k = w_ok.shape
    p = num_panels(o)
    w_ok = jnp.pad(w_ok, ((0, p * PANEL - o), (0, 0)))
    return w_ok.reshape(p, PANEL, k).transpose(0, 2, 1)


def unpack_panels(w_pk32: jax.Array, out_features: int) -> jax.Array:
    """Inverse of `pack_panels`: [P, K, 32] -> [O, K]."""
    p, k, _ = w_pk32.shape
    return w_pk32.transpose(0, 2, 1).reshape(p * PANEL, k)[:out_features]


def panel_matmul(w_pk32: jax.Array, x_rk: jax.Array, out_features: int) -> jax.Array:
    """``x_rk [R, K] @ W^T`` -> [R, out_features] float32 through the native kernel (`usable()` must hold)."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"native panel_matmul kernel unavailable: {reason}")
    p, k, width = w_pk32.shape
    if width != PANEL or x_rk.ndim != 2 or x_rk.shape[1] != k or not 0 < out_features <= p * PANEL:
        raise ValueError(f"panel_matmul: weights {w_pk32.shape} (expected [P, K, {PANEL}]), x {x_rk.shape} "
                         f"(expected [R, {k}]), out_features {out_features} (expected 1..{p * PANEL})")
    if w_pk32.dtype != jnp.float32 or x_rk.dtype != jnp.float32:
        raise ValueError(f"panel_matmul is float32 only, got weights {w_pk32.dtype}, x {x_rk.dtype}")
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_rk.shape[0], p * PANEL), jnp.float32))(w_pk32, x_rk)
    return y[:, :out_features]
