"""Model FLOPs utilisation of the real SFT train step on this CPU, against the CPU's own practical ceiling.

  achieved = FLOPs of one step / median step time      FLOPs: 6*N*T + attention (``sft_common.formula_flops``),
             cross-checked against XLA's ``cost_analysis()``. XLA counts the body of a while loop once, so for the
             scanned model (decoder and vision blocks are ``nn.scan``s) its count is checked on the same config at
             1 decoder layer and 1 vision block (trip counts 1: XLA's count is then the whole step); the count of the
             real depth is reported too (it undercounts by the missing L-1 layers)
  ceiling  = FLOP/s of a jitted 2048x2048 @ 2048x2048 fp32 matmul (2*n^3 / median time), measured in the same run,
             interleaved with the step so both see the same machine load
  ratio    = achieved / ceiling                        Goal >= 0.4 at a medium config.
Medium config (fp32, 1 CPU device): hidden 512, 4 layers, intermediate 1536, 8 heads / 2 kv, vocab 4096, vision
256 x 2 blocks, two 56 px images per sample, batch 4 x 256 tokens, AdamW (the optimizer's FLOPs are in the count).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sft_common  # noqa: E402
import timing  # noqa: E402

ROUNDS, STEPS_PER_ROUND, MM_PER_ROUND, MM_N = 3, 2, 3, 2048


def main():
    import jax
    import jax.numpy as jnp
    from edit_r1_jax.train import plan as plan_lib
    cfg = sft_common.bench_config(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536, vision_hidden=256,
                                  vision_depth=2, vision_heads=4, image_size=56, seq_len=256, batch=4, vocab=4096,
                                  mesh=dict(data=1, fsdp=1, tensor=1))
    spec = plan_lib.build_sft_step(cfg, jax.devices()[:1], donate=True)
    compiled, compile_s = timing.time_compile(spec.step.jitted, spec.state_plan.restore_target(), spec.batch)
    flops_xla = sft_common.cost_flops(compiled)
    b, t = spec.batch["input_ids"].shape
    formula = sft_common.formula_flops(spec.cfg, b, t, spec.grid_per_sample)
    # cross-check of the formula where XLA's count is complete (every scan has one iteration)
    cfg1 = sft_common.bench_config(hidden=512, layers=1, heads=8, kv_heads=2, intermediate=1536, vision_hidden=256,
                                   vision_depth=1, vision_heads=4, image_size=56, seq_len=256, batch=4, vocab=4096,
                                   mesh=dict(data=1, fsdp=1, tensor=1))
    spec1 = plan_lib.build_sft_step(cfg1, jax.devices()[:1])
    xla1 = sft_common.cost_flops(spec1.lower().compile())
    formula1 = sft_common.formula_flops(spec1.cfg, b, t, spec1.grid_per_sample)["total"]
    state = spec.state_plan.init()
    batch = jax.device_put(sft_common.synthetic_batch(spec))

    a = jax.random.normal(jax.random.PRNGKey(0), (MM_N, MM_N), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    state, m = compiled(state, batch)     # warm-up step
    jax.block_until_ready(m)
    step_times, mm_times = [], []
    for _ in range(ROUNDS):
        for _ in range(MM_PER_ROUND):
            t0 = time.perf_counter()
            mm(a, a).block_until_ready()
            mm_times.append(time.perf_counter() - t0)
        for _ in range(STEPS_PER_ROUND):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            step_times.append(time.perf_counter() - t0)
    loss = float(m["loss"])
    step_s, mm_s = statistics.median(step_times), statistics.median(mm_times)
    ceiling = 2 * MM_N ** 3 / mm_s
    flops = formula["total"]
    achieved = flops / step_s
    timing.report("mfu_cpu", "achieved FLOP/s of the SFT step >= 0.4x a large jitted matmul's", achieved / ceiling,
                  step_s=step_s, step_min_s=min(step_times), step_max_s=max(step_times), matmul_s=mm_s,
                  matmul_min_s=min(mm_times), matmul_max_s=max(mm_times), ceiling_gflops=ceiling / 1e9,
                  achieved_gflops=achieved / 1e9, flops_formula=formula["total"], flops_6nt=formula["six_n_t"],
                  flops_xla_scan_body_once=flops_xla, xla_vs_formula_depth1=(xla1 / formula1) if xla1 else None,
                  ratio_by_xla_count=(flops_xla / step_s / ceiling) if flops_xla else None,
                  params_m=(formula["n_text"] + formula["n_vision"]) / 1e6, tokens=formula["tokens"],
                  patches=formula["patches"], compile_s=compile_s, loss=loss, repeat=len(step_times),
                  load_avg=sft_common.load_average())


if __name__ == "__main__":
    main()
