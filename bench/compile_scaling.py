"""Compile time of the real SFT train step (``make_train_step`` + ``sft_loss_fn``, AdamW, NaN guard) at 2, 8 and 32
text-decoder layers, one CPU device, fp32, tiny widths (compile time does not depend on widths).

Goal: 32-layer compile <= 1.5x the 2-layer one (the decoder is one ``nn.scan``: the HLO does not grow with depth).
ratio = t(32) / t(2) in CPU seconds (see below). Also reported: the size of the lowered StableHLO text per depth
(flat when scanned).
Each depth is lowered + compiled twice after a warm-up compile (XLA/JAX one-time start-up excluded); median kept.
Both wall time and this process's CPU time are recorded; on a shared, oversubscribed machine the CPU time is the
stable measure (wall time mostly measures the other tenants), so the ratio uses CPU time; wall ratio is reported too.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sft_common  # noqa: E402
import timing  # noqa: E402

DEPTHS = (2, 8, 32)
REPEAT = 2


def compile_once(cfg, layers: int) -> tuple[float, float, float, int]:
    """(lower wall s, compile wall s, lower+compile CPU s, HLO chars)."""
    import jax
    from edit_r1_jax.train import plan as plan_lib
    jax.clear_caches()
    spec = plan_lib.build_sft_step(cfg, jax.devices()[:1], layers=layers)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = spec.lower()
    t1 = time.perf_counter()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c0, len(lowered.as_text())


def main():
    cfg = sft_common.bench_config(seq_len=64, batch=2, image_size=56, mesh=dict(data=1, fsdp=1, tensor=1))
    compile_once(cfg, 2)   # warm-up: JAX/XLA initialisation, tracing caches of the helpers
    rows = {}
    for n in DEPTHS:
        runs = [compile_once(cfg, n) for _ in range(REPEAT)]
        rows[n] = {"lower_s": statistics.median(r[0] for r in runs), "compile_s": statistics.median(r[1] for r in runs),
                   "wall_s": statistics.median(r[0] + r[1] for r in runs),
                   "wall_spread_s": max(r[0] + r[1] for r in runs) - min(r[0] + r[1] for r in runs),
                   "cpu_s": statistics.median(r[2] for r in runs),
                   "cpu_spread_s": max(r[2] for r in runs) - min(r[2] for r in runs), "hlo_chars": runs[0][3]}
        print(f"layers {n:3d}: lower {rows[n]['lower_s']:.2f} s  compile {rows[n]['compile_s']:.2f} s  "
              f"cpu {rows[n]['cpu_s']:.2f} s  HLO {rows[n]['hlo_chars']} chars", flush=True)
    ratio = rows[32]["cpu_s"] / rows[2]["cpu_s"]
    timing.report("compile_scaling", "compile(32 layers) <= 1.5x compile(2 layers)", ratio,
                  **{f"L{n}_{k}": v for n, r in rows.items() for k, v in r.items()},
                  wall_ratio=rows[32]["wall_s"] / rows[2]["wall_s"],
                  hlo_ratio_32_vs_2=rows[32]["hlo_chars"] / rows[2]["hlo_chars"], repeat=REPEAT,
                  load_avg=sft_common.load_average())


if __name__ == "__main__":
    main()
