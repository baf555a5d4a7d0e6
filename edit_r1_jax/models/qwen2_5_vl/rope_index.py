"""M-RoPE position ids for the language model (transformers ``Qwen2_5_VLModel.get_rope_index``), traceable.

Per row, only tokens with ``attention_mask == 1`` count (padding gets position 0 on all axes, any layout of
padding). Walking the valid tokens with a running counter ``cur``:
  * a text token gets ``(cur, cur, cur)`` and ``cur += 1``;
  * a run of consecutive image tokens (``input_ids == image_token_id``) is the next image of ``image_grid_thw``
    (images are consumed in batch-major order), grid ``(t, gh, gw)``, merged ``lh = gh/m, lw = gw/m``: its k-th token
    (raster order over ``(t, lh, lw)``) gets ``(cur + t_k, cur + h_k, cur + w_k)``, then ``cur += max(gh, gw)/m``.
``rope_deltas = max(pos) + 1 - n_valid`` per row (decoding continues at ``max(pos) + 1 + i``).

Implemented with cumulative sums/gathers only, so ``input_ids`` / ``attention_mask`` may be tracers; the image grid
must be concrete (it fixes the vision tower's shapes anyway).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def text_position_ids(input_ids: jax.Array) -> jax.Array:
    """No images: ``arange(T)`` on all three axes (what transformers' forward uses). -> [3, B, T] int32."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, None], (3, b, t))


def get_rope_index(input_ids: jax.Array, attention_mask: jax.Array | None, image_grid_thw, image_token_id: int,
                   spatial_merge_size: int) -> tuple[jax.Array, jax.Array]:
    """-> (position_ids [3, B, T] int32, rope_deltas [B, 1] int32)."""
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = spatial_merge_size
    is_img = (input_ids == image_token_id) & valid
    ar = jnp.arange(t)
    # previous / next *valid* token of each position (compressed-sequence neighbours)
    prev_idx = jax.lax.cummax(jnp.where(valid, ar, -1), axis=1)           # last valid index <= j
    prev_idx = jnp.concatenate([jnp.full((b, 1), -1), prev_idx[:, :-1]], axis=1)   # last valid index < j
    nxt = jnp.where(valid, ar, t)
    next_idx = jax.lax.cummin(nxt[:, ::-1], axis=1)[:, ::-1]                 # first valid index >= j
    next_idx = jnp.concatenate([next_idx[:, 1:], jnp.full((b, 1), t)], axis=1)       # first valid index > j
    img_pad = jnp.concatenate([is_img, jnp.zeros((b, 1), bool)], axis=1)
    prev_is_img = jnp.take_along_axis(img_pad, jnp.where(prev_idx < 0, t, prev_idx), axis=1)
    next_is_img = jnp.take_along_axis(img_pad, next_idx, axis=1)
    run_start = is_img & ~prev_is_img
    run_end = is_img & ~next_is_img
    n_img = grid.shape[0]
    if n_img:
        lt = jnp.asarray(grid[:, 0], jnp.int32)
        lh = jnp.asarray(grid[:, 1] // m, jnp.int32)
        lw = jnp.asarray(grid[:, 2] // m, jnp.int32)
        adv = jnp.asarray(np.maximum(grid[:, 1], grid[:, 2]) // m, jnp.int32)
        img_no = jnp.cumsum(run_start.reshape(-1)).reshape(b, t) - 1        # global image number, batch-major
        img_no = jnp.clip(img_no, 0, n_img - 1)
        # offset k of each image token inside its run: position minus the run's start index
        start_at = jax.lax.cummax(jnp.where(run_start, ar, 0), axis=1)
        k_valid = jnp.cumsum(valid, axis=1)                                  # count valid tokens (runs are contiguous
        k = k_valid - jnp.take_along_axis(k_valid, start_at, axis=1)          # in the compressed sequence)
        lw_t, lh_t = lw[img_no], lh[img_no]
        tt = k // (lh_t * lw_t)
        hh = (k // lw_t) % lh_t
        ww = k % lw_t
        inc = jnp.where(is_img, jnp.where(run_end, adv[img_no], 0), valid.astype(jnp.int32))
    else:
        tt = hh = ww = jnp.zeros((b, t), jnp.int32)
        inc = valid.astype(jnp.int32)
    cur = jnp.cumsum(inc, axis=1) - inc                                      # exclusive prefix sum
    pos = jnp.stack([cur + jnp.where(is_img, tt, 0), cur + jnp.where(is_img, hh, 0),
                     cur + jnp.where(is_img, ww, 0)], axis=0)
    pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
    n_valid = jnp.sum(valid, axis=1)
    deltas = (jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2)) + 1 - n_valid).astype(jnp.int32)
    return pos, deltas[:, None]
