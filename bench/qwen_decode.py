"""Qwen2.5-VL batched greedy decode on CPU, fp32: our generate (prefill + KV cache + lax.while_loop) vs
transformers ``generate`` (KV cache, eager). Batch 8 left-padded prompts, each with one 112 px image (8x8 patches ->
16 image tokens) and 16-48 text tokens, 128 new tokens, no early stop.

Goal: ratio = our tokens/s / transformers tokens/s >= 3.

``ours`` generates with its decode weights prepared once (``prepare_decode``, timed separately as ``prepare_ms``)
and held across calls, as a reward model scoring batch after batch holds them and as the PyTorch model holds its
``nn.Linear`` weights in the output-major order they are read in. ``ratio_per_call`` times ``generate`` preparing
them inside every call instead (no ``decode_weights``).

Physical ceiling, measured in the same run: a decode step must read every text-decoder weight and the LM head once
for its 8 rows. ``weight_floor_ms`` is the time per iteration of a jitted loop doing exactly those 8-row matmuls
(distinct weights, re-read every iteration as the decode loop re-reads them), in the faster of two forms: ``x @ W``
(``floor_in_out_ms``) and the weight transposed beforehand as the left operand (``floor_out_in_ms``; XLA:CPU's GEMM
streams it about twice as fast, so ``generate`` uses it on CPU; ``ratio_in_out`` / ``ours_step_in_out_ms`` time
``generate(decode_layout="in_out")`` in the same run). Prefill (``generate`` with one new token) is timed on both
sides too. ``ceiling_ratio`` = transformers' generate time / (our prefill + 127 steps at the
floor) is the best whole-generate ratio an fp32 implementation with our prefill can reach on this machine;
``decode_step_ratio`` and ``decode_step_ceiling`` compare one decode step (prefill excluded) the same way, and
``floor_efficiency`` = floor / our step. The weight floor lets XLA:CPU overlap independent products on the two
cores; a decode step cannot, its products wait for each other. ``chain_floor_ms`` times the same reads in the step's
dependency order (`chain_floor_fn`), ``chain_ceiling_ratio`` the whole-generate ratio with our prefill and a step at
that floor. ``floor_one_row_ms`` is the weight floor for a single row (the same products on one row instead of 8):
XLA:CPU's kernel then streams the weights at the machine's read rate, while for 8 rows it takes about that time plus
the 8 rows' arithmetic (not overlapped with the reads; ``rows_cost_ratio`` = 8-row floor / 1-row floor), so the
8-row floor is the kernel's, not the memory's. Where the native decode kernel builds (``decode_layout`` "panel",
`native.panel_matmul`), ``ours`` uses it and the run also times the XLA weight-left form with held weights
(``ratio_out_in``, ``ours_step_out_in_ms``, ``ours_prefill_out_in_ms``), the kernel's own weight floor
(``floor_panel_ms``, ``panel_vs_out_in_floor``) and ``panel_vs_out_in_generate`` (generate time, kernel / XLA).
Everything is timed in alternation (``timing.time_interleaved``).
"""
from __future__ import annotations

import math
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


def weight_floor_fn(mats, rows: int, steps: int = 32, layout: str = "in_out"):
    """A jitted ``fori_loop`` of ``steps`` iterations, each multiplying ``rows`` rows by every matrix once, with a
    carried dependency so nothing is hoisted: the decode loop's weight traffic and nothing else, with the weights
    re-read every iteration exactly as a decode loop re-reads them (cache-warm where they fit). Divide by steps.
    ``layout``: "in_out" computes ``x @ W`` (W [in, out] the right operand), "out_in" ``W^T x^T`` with W^T
    [out, in] materialised beforehand as the left operand (``generate``'s CPU decode step without the native
    kernel), "panel" the native kernel on W packed beforehand (`native.panel_matmul`; the step with it)."""
    import jax
    import jax.numpy as jnp
    from edit_r1_jax.native import panel_matmul as pm
    xs = {m.shape[0]: jnp.ones((rows, m.shape[0]), jnp.float32) for m in mats}
    n_out = [m.shape[1] for m in mats]
    if layout == "out_in":
        mats = [jnp.asarray(np.ascontiguousarray(np.asarray(m).T)) for m in mats]
    elif layout == "panel":
        mats = [pm.pack_panels(jnp.asarray(np.asarray(m).T)) for m in mats]

    def product(x, m, o):
        if layout == "out_in":
            return jax.lax.dot_general(m, x, (((1,), (1,)), ((), ())))
        if layout == "panel":
            return pm.panel_matmul(m, x, o)
        return x @ m

    @jax.jit
    def loop(xs, mats):
        def body(i, acc):
            return acc * 1e-30 + sum(jnp.sum(product(xs[m.shape[0 if layout == "in_out" else 1]] + acc, m, o))
                                     for m, o in zip(mats, n_out))
        return jax.lax.fori_loop(0, steps, body, jnp.float32(0))
    return lambda: loop(xs, mats)


def chain_floor_fn(cfg, dw, rows: int, steps: int = 32):
    """The decode step's weight reads in their data dependencies: per layer q/k/v from x (one fused product, as in
    the step), o from q (attention replaced by the identity), gate/up from x (fused), down from their product, then
    the LM head, each product in the step's own weight-left form on ``generate``'s held decode weights ``dw``; no
    norms, rotary, attention or sampling. Each product must wait for the one before it, so XLA:CPU cannot overlap them as in ``weight_floor_fn``: this is
    the floor of a sequential decoder's step on this machine (timed per iteration of a jitted ``fori_loop``)."""
    import jax
    import jax.numpy as jnp

    from edit_r1_jax.native import panel_matmul as pm
    d = cfg.text.hidden_size
    n_q = cfg.text.num_attention_heads * cfg.text.head_dim

    def gemv(p, x_rd, n_out):                # p: {"kernel_t": [out..., in...]} or {"kernel_p": panels} -> [rows, out]
        if "kernel_p" in p:
            return pm.panel_matmul(p["kernel_p"], x_rd, n_out)
        w2 = p["kernel_t"].reshape(n_out, -1)
        return jnp.moveaxis(jax.lax.dot_general(w2, x_rd[:, None, :], (((1,), (2,)), ((), ()))), 0, -1)[:, 0]

    @jax.jit
    def loop(x_rd, layers, head):
        def body(i, x):
            for p in layers:
                a, m = p["self_attn"], p["mlp"]
                qkv = gemv(a["qkv_proj"], x, n_q + 2 * cfg.text.num_key_value_heads * cfg.text.head_dim)
                q = qkv[:, :n_q] + 1e-30 * jnp.sum(qkv[:, n_q:])          # (which columns does not matter here)
                x = x + gemv(a["o_proj"], q, d)
                gu = gemv(m["gate_up_proj"], x, 2 * cfg.text.intermediate_size)     # [rows, I 2]
                x = x + gemv(m["down_proj"], gu[:, 0::2] * gu[:, 1::2], d) * 1e-3
            head_p = {"kernel_p": head.kernel_p} if dw.layout == "panel" else {"kernel_t": head}
            return x + 1e-30 * jnp.sum(gemv(head_p, x, cfg.text.vocab_size))
        return jax.lax.fori_loop(0, steps, body, x_rd)
    x0 = jnp.ones((rows, d), jnp.float32) * 0.01
    return lambda: loop(x0, dw.layers, dw.head_vd)


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

    def run_torch_1():   # prefill + the first token: what generate costs before its decode loop
        with torch.no_grad():
            return model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                                  mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids)),
                                  max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)

    prep = timing.time_fn(lambda: q.prepare_decode(cfg, params), warmup=1, repeat=3,
                          sync=lambda d: timing.block((d.layers, d.head_vd)))
    dw = q.prepare_decode(cfg, params)                       # "auto": "panel" where the native kernel builds
    dw_oi = q.prepare_decode(cfg, params, "out_in")          # XLA's weight-left product, for comparison
    run_ours = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW,  # noqa: E731
                                  eos_token_id=[], decode_weights=dw)
    run_ours_1 = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=1,  # noqa: E731
                                    eos_token_id=[], decode_weights=dw)
    run_ours_oi = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW,  # noqa: E731
                                     eos_token_id=[], decode_weights=dw_oi)
    run_ours_oi_1 = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=1,  # noqa: E731
                                       eos_token_id=[], decode_weights=dw_oi)
    run_ours_per_call = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW,  # noqa: E731
                                           eos_token_id=[])
    first = timing.time_fn(run_ours, warmup=1, repeat=1)
    run_ours_io = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=NEW,  # noqa: E731
                                     eos_token_id=[], decode_layout="in_out")
    run_ours_io_1 = lambda: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=1,  # noqa: E731
                                       eos_token_id=[], decode_layout="in_out")
    mats = decode_matrices(cfg, params)
    floor_steps = 32
    floor_io = weight_floor_fn(mats, BATCH, floor_steps, "in_out")
    floor_oi = weight_floor_fn(mats, BATCH, floor_steps, "out_in")
    floor_1 = weight_floor_fn(mats, 1, floor_steps, "out_in")
    floor_chain = chain_floor_fn(cfg, dw, BATCH, floor_steps)
    native = dw.layout == "panel"
    extra = {}
    if native:
        extra = {"ours_out_in": (run_ours_oi, timing.block), "ours_out_in_1": (run_ours_oi_1, timing.block),
                 "floor_panel": (weight_floor_fn(mats, BATCH, floor_steps, "panel"), timing.block)}
    # everything timed in alternation so the VM's drifting memory bandwidth hits each alike
    tt = timing.time_interleaved({"torch": (run_torch, lambda x: x), "ours": (run_ours, timing.block),
                                  "torch_1": (run_torch_1, lambda x: x), "ours_1": (run_ours_1, timing.block),
                                  "ours_in_out": (run_ours_io, timing.block),
                                  "ours_in_out_1": (run_ours_io_1, timing.block),
                                  "ours_per_call": (run_ours_per_call, timing.block),
                                  "floor_in_out": (floor_io, timing.block), "floor_out_in": (floor_oi, timing.block),
                                  "floor_one_row": (floor_1, timing.block),
                                  "floor_chain": (floor_chain, timing.block), **extra},
                                 rounds=5)
    med = {k: v["median_s"] for k, v in tt.items()}
    agree = float(np.mean(np.asarray(run_ours()[0]) == run_torch()[:, ids.shape[1]:].numpy()))
    tps_torch, tps_ours = BATCH * NEW / med["torch"], BATCH * NEW / med["ours"]
    floor_s = min(med[k] for k in ("floor_in_out", "floor_out_in", "floor_panel") if k in med) / floor_steps
    step_torch = (med["torch"] - med["torch_1"]) / (NEW - 1)      # one decode step, prefill excluded
    step_ours = (med["ours"] - med["ours_1"]) / (NEW - 1)
    step_ours_io = (med["ours_in_out"] - med["ours_in_out_1"]) / (NEW - 1)
    # best whole-generate ratio reachable by an fp32 implementation with our prefill and a decode step at the floor
    ceiling = med["torch"] / (med["ours_1"] + (NEW - 1) * floor_s)
    chain_s = med["floor_chain"] / floor_steps                     # the same reads, each waiting for the one before
    chain_ceiling = med["torch"] / (med["ours_1"] + (NEW - 1) * chain_s)
    weight_mb = sum(m.size for m in mats) * 4 / 1e6
    print(f"prefill+1: transformers {med['torch_1'] * 1e3:.0f} ms, ours {med['ours_1'] * 1e3:.0f} ms; decode step: "
          f"transformers {step_torch * 1e3:.2f} ms, ours {step_ours * 1e3:.2f} ms (in_out weights "
          f"{step_ours_io * 1e3:.2f} ms); weight floor ({weight_mb:.0f} MB per step, in a loop) x@W "
          f"{med['floor_in_out'] / floor_steps * 1e3:.2f} ms, W^T as left operand "
          f"{med['floor_out_in'] / floor_steps * 1e3:.2f} ms -> ceiling ratio {ceiling:.2f}x; in the step's "
          f"dependency order {chain_s * 1e3:.2f} ms -> {chain_ceiling:.2f}x; one row instead of {BATCH} "
          f"{med['floor_one_row'] / floor_steps * 1e3:.2f} ms")
    native_fields = {}
    if native:
        step_oi = (med["ours_out_in"] - med["ours_out_in_1"]) / (NEW - 1)
        native_fields = dict(ratio_out_in=med["torch"] / med["ours_out_in"], ours_step_out_in_ms=step_oi * 1e3,
                             ours_prefill_out_in_ms=med["ours_out_in_1"] * 1e3,
                             floor_panel_ms=med["floor_panel"] / floor_steps * 1e3,
                             panel_vs_out_in_floor=med["floor_panel"] / med["floor_out_in"],
                             panel_vs_out_in_generate=med["ours"] / med["ours_out_in"])
        print(f"native kernel (decode layout 'panel'): step {step_ours * 1e3:.2f} ms vs XLA weight-left "
              f"{step_oi * 1e3:.2f} ms; weight floor {med['floor_panel'] / floor_steps * 1e3:.2f} ms vs "
              f"{med['floor_out_in'] / floor_steps * 1e3:.2f} ms; generate time ratio "
              f"{med['ours'] / med['ours_out_in']:.3f}")
    timing.report("qwen_decode", "ours >= 3x transformers generate tokens/s", tps_ours / tps_torch,
                  torch_tok_s=tps_torch, ours_tok_s=tps_ours, ours_compile_est_s=first["compile_est_s"],
                  greedy_token_agreement=agree, batch=BATCH, new_tokens=NEW, params_m=q.num_params(cfg) / 1e6,
                  torch_prefill_ms=med["torch_1"] * 1e3, ours_prefill_ms=med["ours_1"] * 1e3,
                  torch_step_ms=step_torch * 1e3, ours_step_ms=step_ours * 1e3,
                  decode_step_ratio=step_torch / step_ours, ours_step_in_out_ms=step_ours_io * 1e3,
                  ratio_in_out=med["torch"] / med["ours_in_out"],
                  ratio_per_call=med["torch"] / med["ours_per_call"], prepare_ms=prep["median_s"] * 1e3,
                  floor_in_out_ms=med["floor_in_out"] / floor_steps * 1e3,
                  floor_out_in_ms=med["floor_out_in"] / floor_steps * 1e3, weight_floor_ms=floor_s * 1e3,
                  floor_one_row_ms=med["floor_one_row"] / floor_steps * 1e3,
                  rows_cost_ratio=med["floor_out_in"] / med["floor_one_row"],
                  weight_mb=weight_mb,
                  ceiling_ratio=ceiling, decode_step_ceiling=step_torch / floor_s,
                  floor_efficiency=floor_s / step_ours, chain_floor_ms=chain_s * 1e3,
                  chain_ceiling_ratio=chain_ceiling, chain_floor_efficiency=chain_s / step_ours,
                  decode_layout=dw.layout, **native_fields)

if __name__ == "__main__":
    main()
