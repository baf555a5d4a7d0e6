"""Qwen2.5-VL batched greedy decode on CPU, fp32: our generate (prefill + KV cache + lax.while_loop) vs
transformers ``generate`` (KV cache, eager). Batch 8 left-padded prompts, each with one 112 px image (8x8 patches ->
16 image tokens) and 16-48 text tokens, 128 new tokens, no early stop.

Goal: ratio = our tokens/s / transformers tokens/s >= 3.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import timing  # noqa: E402
from qwen_forward import SMALL  # noqa: E402

BATCH, NEW = 8, 128


def prompts(seed=0):
    """Left-padded rows: text, one image (16 tokens), text; plus the images' pixel values and grids."""
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    rng = np.random.default_rng(seed)
    grid = np.array([[1, 8, 8]] * BATCH)
    rows = []
    for g, n in zip(grid, rng.integers(16, 48, BATCH)):
        head = int(rng.integers(4, n - 4))
        text = list(rng.integers(12, 4000, n))
        rows.append([1] + text[:head] + T.image_tokens(g) + text[head:])
    t = max(len(r) for r in rows)
    ids = np.zeros((BATCH, t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask, T.pixel_values_for(grid, seed=seed), grid


def main():
    import torch
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    model = T.tiny_torch_model(tie=False, seed=0, **SMALL)
    model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = q.load_pretrained(d)
    ids, mask, pv, grid = prompts()

    def run_torch():
        with torch.no_grad():
            return model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                                  mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids)),
                                  max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

    t_torch = timing.time_fn(run_torch, sync=lambda x: x, warmup=1, repeat=2)
    run_ours = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW, eos_token_id=[])
    t_ours = timing.time_fn(run_ours, warmup=1, repeat=3)
    agree = float(np.mean(np.asarray(run_ours()[0]) == run_torch()[:, ids.shape[1]:].numpy()))
    tps_torch = BATCH * NEW / t_torch["median_s"]
    tps_ours = BATCH * NEW / t_ours["median_s"]
    timing.report("qwen_decode", "ours >= 3x transformers generate tokens/s", tps_ours / tps_torch,
                  torch_tok_s=tps_torch, ours_tok_s=tps_ours, greedy_token_agreement=agree, batch=BATCH,
                  new_tokens=NEW, params_m=q.num_params(cfg) / 1e6)


if __name__ == "__main__":
    main()
