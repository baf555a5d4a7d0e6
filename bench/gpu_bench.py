"""GPU benchmarks (one NVIDIA H100/H200-class card; run through bench/gpu.sh). Each section prints a RESULT line.

  matmul   the card's practical bf16 ceiling: jitted 8192^3 bf16 matmul, TFLOP/s (median of 10)
  sft      bf16 SFT train step of a ~1.2 B Qwen2.5-VL-shaped model (the real step: make_train_step + sft_loss_fn +
           AdamW, fp32 master params, bf16 compute, remat dots_no_batch): MFU = formula FLOPs / step time / ceiling
           (and / the card's nominal dense bf16 peak)
  kontext  FLUX.1-Kontext transformer at 512 px (1024 target + 1024 reference tokens + 512 text tokens), reduced
           depth (2 double + 4 single blocks, full width 3072): one denoising forward (bf16) and one training step
           (fwd + bwd + AdamW, fp32 master params, bf16 compute), seconds
  decode   batched greedy decode, batch 8, 128 new tokens, bf16: our generate vs transformers generate (sdpa) on
           the same card (transformers is skipped when torch has no CUDA)
  parity   fp32 numerics on the card: tiny Qwen2.5-VL with two images in a left-padded batch, our logits vs
           transformers' (fp32, TF32 off on both sides: JAX 'highest' matmul precision), relative error (Frobenius
           norm over the unpadded positions) and greedy-token agreement over 40 new tokens
Usage: python bench/gpu_bench.py [--only matmul sft kontext decode] [--budget-s 540] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import sft_common  # noqa: E402
import timing  # noqa: E402

SECTIONS = ("matmul", "sft", "kontext", "decode", "parity")
_CEILING: dict = {}
# --smoke: the same code paths at toy sizes, to check the script on a CPU before spending GPU time
SMOKE = False


def _card() -> str:
    import jax
    kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    return f"{kind} (smoke sizes)" if SMOKE else kind


def _peak() -> float | None:
    from edit_r1_jax.train.metrics import peak_flops_per_device
    return peak_flops_per_device()


def bench_matmul():
    import jax
    import jax.numpy as jnp
    n = 256 if SMOKE else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    t = timing.time_fn(lambda: mm(a, b), warmup=3, repeat=10)
    ceiling = 2 * n ** 3 / t["median_s"]
    _CEILING["bf16"] = ceiling
    peak = _peak()
    timing.report("gpu_matmul_bf16", "measured ceiling (reference for MFU)", ceiling / peak if peak else None,
                  card=_card(), tflops=ceiling / 1e12, nominal_peak_tflops=peak / 1e12 if peak else None, n=n, **t)


def bench_sft():
    import jax
    from edit_r1_jax.train import plan as plan_lib
    sizes = dict(hidden=2048, layers=10, heads=16, kv_heads=2, intermediate=11008, vision_hidden=1280, vision_depth=4,
                 vision_heads=16, image_size=224, seq_len=1024, batch=8, vocab=151936)
    if SMOKE:
        sizes.update(hidden=64, layers=2, heads=4, intermediate=128, vision_hidden=32, vision_depth=2,
                     vision_heads=2, image_size=56, seq_len=64, batch=2, vocab=512)
    cfg = sft_common.bench_config(**sizes, mesh=dict(data=1, fsdp=1, tensor=1), remat="dots_no_batch",
                                  compute="bfloat16", param="float32")
    spec = plan_lib.build_sft_step(cfg, jax.devices()[:1])
    compiled, compile_s = timing.time_compile(spec.step.jitted, spec.state_plan.restore_target(), spec.batch)
    state = spec.state_plan.init()
    batch = jax.device_put(sft_common.synthetic_batch(spec))
    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], batch)
        return m
    t = timing.time_fn(one, warmup=2, repeat=5)
    b, s = spec.batch["input_ids"].shape
    f = sft_common.formula_flops(spec.cfg, b, s, spec.grid_per_sample)
    achieved = f["total"] / t["median_s"]
    ceiling, peak = _CEILING.get("bf16"), _peak()
    mem = compiled.memory_analysis()
    timing.report("gpu_sft_mfu", "MFU vs measured bf16 matmul ceiling (MaxText-class: >= 0.4)",
                  achieved / ceiling if ceiling else None, card=_card(), step_s=t["median_s"], min_s=t["min_s"],
                  max_s=t["max_s"], compile_s=compile_s, achieved_tflops=achieved / 1e12,
                  mfu_vs_nominal_peak=achieved / peak if peak else None, flops=f["total"],
                  params_b=(f["n_text"] + f["n_vision"]) / 1e9, tokens=f["tokens"], batch=b, seq_len=s,
                  temp_gib=(mem.temp_size_in_bytes / 2 ** 30) if mem else None,
                  loss=float(jax.device_get(one()["loss"])))


def _kontext_inputs(tcfg, batch: int, grid: int = 32, txt: int = 512):
    rng = np.random.default_rng(0)
    s_img = 2 * grid * grid                            # target + reference tokens

    def ids(first):
        t = np.zeros((grid, grid, 3), np.float32)
        t[..., 0], t[..., 1], t[..., 2] = first, np.arange(grid)[:, None], np.arange(grid)[None]
        return t.reshape(-1, 3)
    img_ids = np.concatenate([ids(0), ids(1)])
    txt_ids = np.zeros((txt, 3), np.float32)
    x = rng.standard_normal((batch, s_img, tcfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((batch, txt, tcfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((batch, tcfg.pooled_projection_dim)).astype(np.float32)
    return x, enc, pooled, img_ids, txt_ids


def bench_kontext():
    import jax
    import jax.numpy as jnp
    import optax
    from edit_r1_jax.models import flux
    from edit_r1_jax.models.flux.config import FluxTransformerConfig
    base = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, in_channels=64)
    grid, txt = 32, 512
    if SMOKE:
        base.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
        grid, txt = 4, 8
    card = _card()
    # -- denoising forward (bf16 params and activations)
    cfg16 = FluxTransformerConfig(**base, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = flux.init_params(cfg16, 0)
    x, enc, pooled, img_ids, txt_ids = _kontext_inputs(cfg16, batch=1, grid=grid, txt=txt)
    n_tgt = x.shape[1] // 2
    fwd = jax.jit(lambda p, x, e, pl, t, g: flux.transformer_forward(cfg16, p, x, e, pl, t, img_ids, txt_ids, g))
    args = tuple(jnp.asarray(a, jnp.bfloat16) for a in (x, enc, pooled)) + (jnp.full((1,), 0.5, jnp.bfloat16),
                                                                          jnp.full((1,), 2.5, jnp.bfloat16))
    _, c_fwd = timing.time_compile(fwd, params16, *args)
    t_fwd = timing.time_fn(lambda: fwd(params16, *args), warmup=2, repeat=10)
    del params16
    # -- training step: fp32 master params, bf16 compute, flow-matching MSE on the target tokens, AdamW
    cfg = FluxTransformerConfig(**base, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = flux.init_params(cfg, 0)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    bsz = 2
    x, enc, pooled, img_ids, txt_ids = _kontext_inputs(cfg, batch=bsz, grid=grid, txt=txt)
    target = np.random.default_rng(1).standard_normal((bsz, n_tgt, cfg.in_channels)).astype(np.float32)

    def loss_fn(p, x, e, pl, y):
        v = flux.transformer_forward(cfg, p, x, e, pl, jnp.full((bsz,), 0.5), img_ids, txt_ids,
                                     jnp.full((bsz,), 2.5))
        return jnp.mean((v[:, :n_tgt].astype(jnp.float32) - y) ** 2)

    @jax.jit
    def train_step(p, o, x, e, pl, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, e, pl, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    holder = {"p": params, "o": opt}
    _, c_train = timing.time_compile(train_step, params, opt, x, enc, pooled, target)

    def one():
        holder["p"], holder["o"], loss = train_step(holder["p"], holder["o"], x, enc, pooled, target)
        return loss
    t_train = timing.time_fn(one, warmup=2, repeat=5)
    d = cfg.num_attention_heads * cfg.attention_head_dim
    s = x.shape[1] + enc.shape[1]
    blocks = cfg.num_layers + cfg.num_single_layers
    fwd_flops = 2 * 12 * d * d * s * blocks + 4 * s * s * d * blocks     # per sample, modulation MLPs excluded
    ceiling = _CEILING.get("bf16")
    timing.report("gpu_kontext_512", "Kontext 512px reduced depth: step times (no torch baseline on this card)",
                  (3 * fwd_flops * bsz / t_train["median_s"]) / ceiling if ceiling else None, card=card,
                  forward_s=t_fwd["median_s"], forward_compile_s=c_fwd, train_step_s=t_train["median_s"],
                  train_min_s=t_train["min_s"], train_max_s=t_train["max_s"], train_compile_s=c_train,
                  batch_train=bsz, tokens=s, double_blocks=cfg.num_layers, single_blocks=cfg.num_single_layers,
                  forward_tflops=fwd_flops / t_fwd["median_s"] / 1e12,
                  full_depth_forward_s_estimate=t_fwd["median_s"] * (19 + 2 * 38) / (2 + 2 * 4))


def bench_decode():
    import jax
    import jax.numpy as jnp
    import torch
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    batch, new = 8, 128
    kw = dict(vocab=32768, text_layers=12, depth=2, hidden=1024, intermediate=2816, heads=16, kv_heads=2,
              vision_hidden=256, vision_heads=4, fullatt=(1,))
    if SMOKE:
        new = 8
        kw.update(vocab=512, text_layers=2, hidden=64, intermediate=128, heads=4, vision_hidden=32, vision_heads=2)
    model = T.tiny_torch_model(tie=False, seed=0, **kw)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = q.load_pretrained(d, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    lens = rng.integers(16, 48, batch)
    t = int(lens.max())
    ids = np.zeros((batch, t), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, t - n:] = rng.integers(12, kw["vocab"] - 1, n)
        mask[i, t - n:] = 1
    run_ours = lambda: q.generate(cfg, params, ids, mask, max_new_tokens=new, eos_token_id=[])  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run_ours())
    first_s = time.perf_counter() - t0
    t_ours = timing.time_fn(run_ours, warmup=1, repeat=5)
    ours_tps = batch * new / t_ours["median_s"]
    torch_tps, agree, agree_first = None, None, None
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        ti, tm = torch.tensor(ids, device="cuda"), torch.tensor(mask, device="cuda")

        def run_torch():
            with torch.no_grad():
                out = model.generate(input_ids=ti, attention_mask=tm, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return out
        t_torch = timing.time_fn(run_torch, sync=lambda x: x, warmup=1, repeat=3)
        torch_tps = batch * new / t_torch["median_s"]
        same = np.asarray(run_ours()[0]) == run_torch()[:, t:].cpu().numpy()
        agree, agree_first = float(np.mean(same)), float(np.mean(same[:, 0]))
    timing.report("gpu_decode", "our tokens/s >= transformers generate on the same card",
                  ours_tps / torch_tps if torch_tps else None, card=_card(), ours_tok_s=ours_tps,
                  torch_tok_s=torch_tps, greedy_agreement_bf16=agree, first_token_agreement_bf16=agree_first,
                  first_call_s=first_s, batch=batch,
                  new_tokens=new, params_m=q.num_params(cfg) / 1e6,
                  torch_cuda=bool(torch.cuda.is_available()))


def bench_parity():
    import jax
    import torch
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    new = 40
    model = T.tiny_torch_model(tie=False, seed=0)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = q.load_pretrained(d)
    grid = np.array([[1, 4, 6], [1, 6, 4]])
    pv = T.pixel_values_for(grid, seed=7)
    rows = [[1, 5] + T.image_tokens(grid[0]) + [7, 3], [1] + T.image_tokens(grid[1]) + [6, 20, 21, 22, 23]]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(q.forward(cfg, params, ids, mask, pv, grid))
        toks = np.asarray(q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=new, eos_token_id=[])[0])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(dev)
    kw = dict(input_ids=torch.tensor(ids, device=dev), attention_mask=torch.tensor(mask, device=dev),
              pixel_values=torch.tensor(pv, device=dev), image_grid_thw=torch.tensor(grid, device=dev),
              mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids), device=dev))
    with torch.no_grad():
        ref = model(**kw).logits.float().cpu().numpy()
        ref_toks = model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0)[:, t:].cpu().numpy()
    valid = mask.astype(bool)
    rel = float(np.linalg.norm(ours[valid] - ref[valid]) / np.linalg.norm(ref[valid]))
    timing.report("gpu_parity_qwen_fp32", "logits rel err <= 1e-5 (fp32, highest); greedy tokens identical",
                  rel, card=_card(), torch_device=dev, max_abs_err=float(np.abs(ours[valid] - ref[valid]).max()),
                  greedy_agreement=float(np.mean(toks == ref_toks)), new_tokens=new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip sections once this much time has passed")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: check the script on a CPU")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    import jax
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}", flush=True)
    if jax.default_backend() != "gpu":
        print("gpu_bench: JAX has no GPU backend here (install jax[cuda12]); running anyway for a dry check")
    start, failed = time.perf_counter(), []
    order = [s for s in SECTIONS if s in args.only]
    if "matmul" not in order and any(s in order for s in ("sft", "kontext")):
        order.insert(0, "matmul")           # the MFU denominators
    for name in order:
        if time.perf_counter() - start > args.budget_s:
            print(f"gpu_bench: {name} skipped, time budget {args.budget_s:.0f} s used up", flush=True)
            failed.append(name)
            continue
        print(f"== {name} ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
        try:
            globals()[f"bench_{name}"]()
        except Exception:  # noqa: BLE001 - report and go on with the next section
            traceback.print_exc()
            failed.append(name)
        sys.stdout.flush()
    print(f"gpu_bench: done in {time.perf_counter() - start:.0f} s; failed/skipped: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
