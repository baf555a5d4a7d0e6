"""Shared pieces of the SFT-step benchmarks (compile_scaling, fsdp_memory, mfu_cpu, gpu_bench): the real train step
(``train/plan.build_sft_step`` = ``step.make_train_step`` + ``sft.sft_loss_fn`` + ``state.plan_sharded_state``) on a
config built from configs/tiny.py, a valid synthetic batch for it, and the 6*N*T FLOP formula.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(*, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2,
                 vision_heads=2, image_size=56, seq_len=128, batch=8, vocab=1040, mesh=None, remat="none",
                 compute="float32", param="float32", grad_accum=1) -> Any:
    """configs/tiny.py with the model/batch sizes of a benchmark (a ConfigDict, as the CLI would build)."""
    from edit_r1_jax import config as config_lib
    cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.rrm.update(dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                        vision_hidden=vision_hidden, vision_depth=vision_depth, vision_heads=vision_heads,
                        image_size=image_size, remat_policy=remat))
    cfg.train.global_batch_size = batch
    cfg.train.grad_accum_steps = grad_accum
    cfg.mesh = dict(mesh or dict(data=-1, fsdp=1, tensor=1))
    cfg.dtype = dict(param=param, compute=compute)
    cfg.plan = dict(seq_len=seq_len, vocab_size=vocab)
    return cfg


def synthetic_batch(spec, seed: int = 0) -> dict:
    """A valid SFT batch for ``spec`` (an ``SFTStepSpec``): text, the two images' tokens at the right count,
    random pixels, loss on the second half."""
    cfg, grid = spec.cfg, spec.grid_per_sample
    b, t = spec.batch["input_ids"].shape
    rng = np.random.default_rng(seed)
    unit = cfg.vision.spatial_merge_size ** 2
    row = []
    for g in grid:
        row += [cfg.vision_start_token_id] + [cfg.image_token_id] * int(np.prod(g) // unit) + [cfg.vision_end_token_id]
    if len(row) >= t:
        raise ValueError(f"seq_len {t} too short for {len(row)} image tokens")
    lo = max(cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) + 1
    ids = np.stack([np.array(row + list(rng.integers(lo, cfg.text.vocab_size, t - len(row))), np.int32)
                    for _ in range(b)])
    loss_mask = np.zeros_like(ids)
    loss_mask[:, t // 2:] = 1
    pv = rng.standard_normal(spec.batch["pixel_values"].shape).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask, "pixel_values": pv}


def formula_flops(cfg, batch: int, seq_len: int, grid) -> dict:
    """Training FLOPs of one step by counting: 6 * (matmul params) * (tokens they see) + attention.

    text: 6 * N_text * (B*T) with N_text = decoder matmul params + lm_head; causal attention adds
    6 * 2 * L * B * T^2 * d_model (QK^T and PV, forward 2 flops/MAC x 2 matmuls, x3 for backward; full T^2 as XLA
    computes it, no causal halving). vision: 6 * N_vis * P (P patches; the merger on P/4 groups) + 12 * depth *
    d_vis * sum over attention groups of n^2 (windows of ``window_size`` px, full attention per image on
    ``fullatt_block_indexes``; counted as full images here, an upper bound).
    """
    t, v = cfg.text, cfg.vision
    d, f, l = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * t.head_dim
    n_text = l * (d * d + 2 * d * kv + d * d + 3 * d * f) + d * t.vocab_size
    dv, fv = v.hidden_size, v.intermediate_size
    n_vis = v.patch_dim * dv + v.depth * (4 * dv * dv + 3 * dv * fv)          # per patch
    n_merge = (4 * dv) ** 2 + 4 * dv * v.out_hidden_size                          # per merged 2x2 group
    tokens = batch * seq_len
    patches = int(sum(int(np.prod(g)) for g in grid)) * batch
    attn_text = 12 * l * batch * seq_len ** 2 * d
    per_img = [int(np.prod(g)) for g in grid]
    attn_vis = 12 * v.depth * dv * batch * sum(n * n for n in per_img)
    six_n_t = 6 * (n_text * tokens + n_vis * patches + n_merge * patches // 4)
    return {"n_text": n_text, "n_vision": n_vis + n_merge, "tokens": tokens, "patches": patches,
            "six_n_t": six_n_t, "attention": attn_text + attn_vis, "total": six_n_t + attn_text + attn_vis}


def cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    val = (cost or {}).get("flops")
    return float(val) if val else None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
