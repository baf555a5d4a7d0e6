"""Host-side (NumPy) index bookkeeping for the vision tower, from a concrete ``image_grid_thw``.

Mirrors transformers ``vision_utils.get_vision_position_ids`` / ``get_vision_window_index`` /
``get_vision_cu_seqlens`` (§1.3 steps 2 and 4). Everything here only depends on the grid, so it is computed once
per grid outside of jit and passed in as integer arrays.

Attention layouts: both the windowed blocks and the full-attention blocks attend within *contiguous* segments of the
window-permuted patch sequence (windows, resp. frames). A layout packs those segments into a dense
``[G, L]`` array (``gather`` indices, ``valid`` flags) plus ``scatter`` (for each token, its flat slot ``g*L + j``),
so attention runs as a batch of G short sequences instead of one N x N masked matrix.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    gather: np.ndarray   # [G, L] int32 token index (0 where padded)
    valid: np.ndarray    # [G, L] int32 1 = real token, 0 = padding
    scatter: np.ndarray  # [N] int32 flat slot of each token in the [G*L] packing


@dataclasses.dataclass(frozen=True)
class VisionMeta:
    num_patches: int
    window_index: np.ndarray   # [N/u] merge-unit permutation into window order
    reverse_index: np.ndarray  # [N/u] argsort(window_index)
    rot_pos: np.ndarray        # [N, 2] (h, w) rotary positions, already in window order
    window: Layout             # windowed blocks (cu_window_seqlens)
    full: Layout               # full-attention blocks (cu_seqlens: one segment per frame)
    cu_window_seqlens: np.ndarray
    cu_seqlens: np.ndarray
    merged_sizes: tuple[int, ...]  # merged tokens per image


def position_ids(grid: np.ndarray, merge: int) -> np.ndarray:
    """[N, 2] (h, w) patch coordinates in merge-block-major order, repeated over t."""
    out = []
    for t, h, w in grid.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out, 0) if out else np.zeros((0, 2), np.int64)


def window_index(grid: np.ndarray, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [N/u], cu_window_seqlens) exactly as transformers builds them (empty windows dropped)."""
    vw = window_size // merge // patch_size
    unit = merge * merge
    idx_all, cu, base = [], [0], 0
    for t, h, w in grid.tolist():
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = vw - lh % vw, vw - lw % vw
        nh, nw = (lh + ph) // vw, (lw + pw) // vw
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vw, vw)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        idx_all.append(flat[flat != -100] + base)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        base += t * lh * lw
    cu_arr = np.asarray(cu, np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])   # unique_consecutive
    return np.concatenate(idx_all), cu_arr[keep]


def layout_from_cu(cu: np.ndarray, n: int) -> Layout:
    lengths = np.diff(cu)
    g, l = len(lengths), int(lengths.max())
    j = np.arange(l)[None]
    valid = j < lengths[:, None]
    gather = np.where(valid, cu[:-1, None] + j, 0)
    scatter = np.empty(n, np.int64)
    for gi in range(g):
        scatter[cu[gi]:cu[gi + 1]] = gi * l + np.arange(lengths[gi])
    return Layout(gather.astype(np.int32), valid.astype(np.int32), scatter.astype(np.int32))


def vision_meta(image_grid_thw, vcfg) -> VisionMeta:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = vcfg.spatial_merge_size
    unit = m * m
    if np.any(grid[:, 1:] % m):
        raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size={m}")
    n = int(np.prod(grid, axis=1).sum())
    widx, cu_w = window_index(grid, m, vcfg.window_size, vcfg.patch_size)
    pos = position_ids(grid, m)
    pos = pos.reshape(n // unit, unit, 2)[widx].reshape(n, 2)
    cu_full = np.concatenate([[0], np.cumsum(np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))])
    return VisionMeta(
        num_patches=n, window_index=widx.astype(np.int32), reverse_index=np.argsort(widx).astype(np.int32),
        rot_pos=pos.astype(np.int32), window=layout_from_cu(cu_w, n), full=layout_from_cu(cu_full, n),
        cu_window_seqlens=cu_w, cu_seqlens=cu_full,
        merged_sizes=tuple(int(x) for x in np.prod(grid, axis=1) // unit))
