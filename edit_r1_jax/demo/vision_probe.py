"""Does the reward model's vision tower carry what the synthetic world's verdicts need? Two diagnostics.

* `cell_cosine`: mean cosine similarity between all merged image tokens (one per 28 px cell). A tower that has
  collapsed to one vector for every cell reads ~1.0 (measured 0.9999 after the demo's SFT; 0.84 at random init).
* `probe_world`: a ridge-regression linear probe from each cell's merged token to the colour and to the shape of the
  object in that cell ("none" when empty), trained on 80 % of the cells of ``n`` world scenes and scored on the rest,
  next to the majority-class rate.

Images must be ``3 * 28`` px square so that the 3x3 merged tokens line up with the world's 3x3 scene cells.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def merged_features(setup: Any, params: dict, images: Sequence[np.ndarray]) -> np.ndarray:
    """Vision tower + merger output per image: [n_images, tokens_per_image, D] (torch ``model.visual(...)``)."""
    import flax.linen as nn
    import jax

    from edit_r1_jax.models.qwen2_5_vl.model import Qwen25VL
    from edit_r1_jax.models.qwen2_5_vl.vision import meta_arrays
    from edit_r1_jax.models.qwen2_5_vl.vision_meta import vision_meta
    cfg = setup.cfg
    pv_nd, grid = setup.inputs.images(list(images))
    meta = meta_arrays(vision_meta(grid, cfg.vision))
    encode = jax.jit(lambda p, x: nn.apply(lambda m: m.encode_images(x, meta), Qwen25VL(cfg))({"params": p}))
    feats_md = np.asarray(encode(params, pv_nd))
    return feats_md.reshape(len(images), -1, feats_md.shape[-1])


def cell_cosine(feats_bmd: np.ndarray) -> float:
    """Mean pairwise cosine similarity of all tokens in ``feats_bmd`` [B, M, D] (1.0 = collapsed)."""
    f = feats_bmd.reshape(-1, feats_bmd.shape[-1]).astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    c = f @ f.T
    return float(c[np.triu_indices(len(f), 1)].mean())


def linear_probe(x_nd: np.ndarray, labels: Sequence[str], train_fraction: float = 0.8, ridge: float = 1.0) -> dict:
    """Ridge-regression one-vs-all probe on standardised features: held-out accuracy and majority-class rate."""
    x = np.asarray(x_nd, np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    classes = sorted(set(labels))
    y_nc = np.eye(len(classes))[[classes.index(v) for v in labels]]
    n = int(train_fraction * len(x))
    if n == 0 or n == len(x):
        raise ValueError(f"linear_probe: {len(x)} examples leave an empty train or test split at {train_fraction}")
    w = np.linalg.solve(x[:n].T @ x[:n] + ridge * np.eye(x.shape[1]), x[:n].T @ y_nc[:n])
    acc = float((np.argmax(x[n:] @ w, 1) == np.argmax(y_nc[n:], 1)).mean())
    test = np.asarray(labels[n:])
    majority = float(max(np.mean(test == c) for c in classes))
    return {"accuracy": acc, "majority": majority, "classes": len(classes)}


def probe_world(setup: Any, params: dict, n: int = 600, seed: int = 0) -> dict:
    """Colour and shape probes on the merged tokens of ``n`` source scenes, plus their `cell_cosine`."""
    from edit_r1_jax.data import synthetic
    from edit_r1_jax.data.synthetic_scene import as_scene
    v = setup.cfg.vision
    _, h, w = (int(x) for x in setup.grid_per_sample[0])
    size = h * v.patch_size
    if (h, w) != (3 * v.spatial_merge_size,) * 2:
        raise ValueError(f"probe_world: needs {3 * v.spatial_merge_size * v.patch_size} px images (3x3 merged tokens, "
                         f"one per scene cell), got a {h}x{w} patch grid ({size} px)")
    recs = synthetic.make_sft_records(n, seed=seed, size=size, style="minimal")
    feats_bmd = merged_features(setup, params, [r["source"] for r in recs])
    colours, shapes = [], []
    for r in recs:
        cells = {o.cell: o for o in as_scene(r["source_scene"]).objects}
        for c in range(9):
            o = cells.get(c)
            colours.append(o.colour if o else "none")
            shapes.append(o.shape if o else "none")
    x_nd = feats_bmd.reshape(-1, feats_bmd.shape[-1])
    return {"colour": linear_probe(x_nd, colours), "shape": linear_probe(x_nd, shapes),
            "cell_cosine": cell_cosine(feats_bmd)}
