"""Qwen2.5-VL batched greedy decode on CPU, fp32: our generate (prefill + KV cache + lax.while_loop) vs
transformers ``generate`` (KV cache, eager). Batch 8 left-padded prompts, each with one 112 px image (8x8 patches ->
16 image tokens) and 16-48 text tokens, 128 new tokens, no early stop.

Goal: ratio = our tokens/s / transformers tokens/s >= 3.

Physical ceiling, measured in the same run: a decode step must read every text-decoder weight and the LM head once
for its 8 rows. ``weight_floor_ms`` is the time of exactly those 8-row matmuls (distinct weights, one jitted chain;
the same chain in torch is printed beside it, so the kernel is not the difference); ``ceiling_ratio`` =
transformers' time per token / that floor is the best ratio any fp32 implementation can reach on this machine, and
``floor_efficiency`` = floor / our time per step says how close our loop gets to it. Transformers, ours and the
two floors are timed in alternation (``timing.time_interleaved``).
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


def decode_matrices(cfg, params) -> list:
    """The [in, out] weight matrices one decode step multiplies its rows by: q, k, v, o, gate, up, down per text
    layer (stacked [L, ...] in our params) and the LM head."""
    t = cfg.text
    mats = []
    for name, w in (("q", params["layers"]["self_attn"]["q_proj"]["kernel"]),
                    ("k", params["layers"]["self_attn"]["k_proj"]["kernel"]),
                    ("v", params["layers"]["self_attn"]["v_proj"]["kernel"]),
                    ("o", params["layers"]["self_attn"]["o_proj"]["kernel"]),
                    ("gate", params["layers"]["mlp"]["gate_proj"]["kernel"]),
                    ("up", params["layers"]["mlp"]["up_proj"]["kernel"]),
                    ("down", params["layers"]["mlp"]["down_proj"]["kernel"])):
        for l in range(t.num_hidden_layers):
            wl = w[l]
            mats.append(wl.reshape(-1, wl.shape[-1]) if name == "o" else wl.reshape(wl.shape[0], -1))
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed_tokens"]["embedding"].T
    return mats + [head]


def weight_floor_fns(mats, rows: int, reps: int = 10) -> tuple:
    """(jax_fn, torch_fn, bytes): each fn runs ``reps`` times the ``rows``-row matmuls with every matrix once (ours
    jitted, and torch); divide its time by ``reps``."""
    import jax
    import jax.numpy as jnp
    import torch
    xs = {m.shape[0]: jnp.ones((rows, m.shape[0]), jnp.float32) for m in mats}

    @jax.jit
    def chain(xs, mats):
        return sum(jnp.sum(xs[m.shape[0]] @ m) for m in mats)

    def run_jax():
        for _ in range(reps):
            out = jax.block_until_ready(chain(xs, mats))
        return out
    tm = [torch.from_numpy(np.array(m)) for m in mats]
    txs = {k: torch.ones(rows, k) for k in xs}

    def run_torch():
        with torch.no_grad():
            for _ in range(reps):
                out = sum((txs[m.shape[0]] @ m).sum() for m in tm)
        return out
    return run_jax, run_torch, int(sum(m.size for m in mats) * 4)


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

    run_ours = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW, eos_token_id=[])
    first = timing.time_fn(run_ours, warmup=1, repeat=1)
    reps = 10
    floor_jax, floor_torch, floor_bytes = weight_floor_fns(decode_matrices(cfg, params), BATCH, reps)
    # all four timed in alternation so the VM's drifting memory bandwidth hits each alike
    tt = timing.time_interleaved({"torch": (run_torch, lambda x: x), "ours": (run_ours, timing.block),
                                  "floor_jax": (floor_jax, lambda x: x), "floor_torch": (floor_torch, lambda x: x)},
                                 rounds=3)
    t_torch, t_ours = tt["torch"], tt["ours"]
    floor = {"jax_s": tt["floor_jax"]["median_s"] / reps, "torch_s": tt["floor_torch"]["median_s"] / reps,
             "bytes": floor_bytes}
    agree = float(np.mean(np.asarray(run_ours()[0]) == run_torch()[:, ids.shape[1]:].numpy()))
    tps_torch = BATCH * NEW / t_torch["median_s"]
    tps_ours = BATCH * NEW / t_ours["median_s"]
    floor_s = min(floor["jax_s"], floor["torch_s"])
    step_torch, step_ours = t_torch["median_s"] / NEW, t_ours["median_s"] / NEW
    print(f"per token: transformers {step_torch * 1e3:.2f} ms, ours {step_ours * 1e3:.2f} ms; weight floor "
          f"{floor['bytes'] / 1e6:.0f} MB: jax {floor['jax_s'] * 1e3:.2f} ms, torch {floor['torch_s'] * 1e3:.2f} ms "
          f"-> ceiling ratio {step_torch / floor_s:.2f}x")
    timing.report("qwen_decode", "ours >= 3x transformers generate tokens/s", tps_ours / tps_torch,
                  torch_tok_s=tps_torch, ours_tok_s=tps_ours, ours_compile_est_s=first["compile_est_s"],
                  greedy_token_agreement=agree, batch=BATCH,
                  new_tokens=NEW, params_m=q.num_params(cfg) / 1e6, weight_floor_ms=floor_s * 1e3,
                  weight_floor_jax_ms=floor["jax_s"] * 1e3, weight_floor_torch_ms=floor["torch_s"] * 1e3,
                  weight_mb=floor["bytes"] / 1e6, ceiling_ratio=step_torch / floor_s,
                  floor_efficiency=floor_s / step_ours)


if __name__ == "__main__":
    main()
