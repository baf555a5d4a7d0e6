"""Qwen2.5-VL forward on CPU, fp32: our jitted forward vs transformers' eager forward (same small random config).

Goal: ratio = torch time / ours >= 1 (ours at least as fast). Inputs: batch 2, text + one 224x224-px image each
(16x16 patches -> 64 image tokens), ~96 tokens per row. Both are timed in alternation (``timing.time_interleaved``).
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import timing  # noqa: E402

SMALL = dict(vocab=4096, text_layers=4, depth=4, hidden=512, intermediate=1536, heads=8, kv_heads=2,
             vision_hidden=256, vision_heads=4, fullatt=(1, 3))


def small_inputs(batch=2, seed=0):
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    grid = np.array([[1, 16, 16]] * batch)
    rng = np.random.default_rng(seed)
    rows = [[1] + list(rng.integers(12, 4000, 12)) + T.image_tokens(g) + list(rng.integers(12, 4000, 16))
            for g in grid]
    ids = np.array(rows)
    return ids, np.ones_like(ids), T.pixel_values_for(grid, seed=seed), grid


def build() -> dict:
    """The small random transformers model, our loaded params and inputs; ``torch``/``ours`` run one forward each
    (used here and by ``bench/op_profile.py``)."""
    import torch
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    model = T.tiny_torch_model(tie=False, seed=0, **SMALL)
    model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = q.load_pretrained(d)
    ids, mask, pv, grid = small_inputs()
    tin = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
               image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids)))

    def run_torch():
        with torch.no_grad():
            return model(**tin).logits
    return dict(cfg=cfg, params=params, ids=ids, torch=run_torch,
                ours=lambda: q.forward(cfg, params, ids, mask, pv, grid))


def main():
    import torch
    from edit_r1_jax.models import qwen2_5_vl as q
    b = build()
    cfg, ids, run_torch, run_ours = b["cfg"], b["ids"], b["torch"], b["ours"]
    first = timing.time_fn(run_ours, warmup=1, repeat=1)
    tt = timing.time_interleaved({"torch": (run_torch, lambda x: x), "ours": (run_ours, timing.block)}, rounds=9)
    t_torch, t_ours = tt["torch"], tt["ours"]
    err = float(np.abs(np.asarray(run_ours()) - run_torch().numpy()).max())
    ratio = t_torch["median_s"] / t_ours["median_s"]
    timing.report("qwen_forward", "ours >= transformers eager (ratio >= 1)", ratio,
                  torch_s=t_torch["median_s"], ours_s=t_ours["median_s"], max_abs_err=err,
                  ours_compile_est_s=first["compile_est_s"],
                  params_m=q.num_params(cfg) / 1e6, batch=int(ids.shape[0]), tokens=int(ids.shape[1]),
                  torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
