"""Per-device bytes of params + optimizer state of the SFT train state for fsdp = 1, 2, 4, 8 on fake CPU devices.

Two measurements per mesh (1 x fsdp x 1 over the first ``fsdp`` of 8 fake devices), fp32 params + AdamW moments:
  shards   the state is created (``plan_sharded_state(...).init()``, sharded at init) and the bytes of every
           array's shard on device 0 are summed (``addressable_shards``);
  xla      ``compiled.memory_analysis()`` of the train step: argument bytes minus this device's batch shard
           (what is left is the state: params, opt_state, step/rng/counters).
Goal: both within 1.15x of (total state bytes) / fsdp. ratio = the worst of all (measured / ideal); <= 1.15.
Config: hidden 256, 4 layers, intermediate 768, vision 128 x 2 blocks, vocab 2048 (4.5 M params; a width where
the per-layer norms are a small share, as in real models).
"""
from __future__ import annotations

import os
import re
import sys

os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import sft_common  # noqa: E402
import timing  # noqa: E402


def device0_bytes(tree) -> int:
    import jax
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
    return total


def main():
    import jax
    from edit_r1_jax.train import plan as plan_lib
    rows, worst = {}, 0.0
    for fsdp in (1, 2, 4, 8):
        cfg = sft_common.bench_config(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vision_hidden=128,
                                      vision_depth=2, vision_heads=2, image_size=56, seq_len=64, batch=8, vocab=2048,
                                      mesh=dict(data=1, fsdp=fsdp, tensor=1))
        spec = plan_lib.build_sft_step(cfg, jax.devices()[:fsdp])
        sp = spec.state_plan
        total = plan_lib.tree_bytes(sp.abstract.params) + plan_lib.tree_bytes(sp.abstract.opt_state)
        ideal = total / fsdp
        state = sp.init()
        shards = device0_bytes(state.params) + device0_bytes(state.opt_state)
        del state
        mp = plan_lib.memory_plan(spec)
        batch_per_dev = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(spec.batch)) // fsdp
        xla_state = mp.argument_bytes - batch_per_dev
        rows[fsdp] = {"ideal_b": ideal, "shards_b": shards, "xla_b": xla_state, "shards_ratio": shards / ideal,
                      "xla_ratio": xla_state / ideal, "planned_b": mp.params_bytes + mp.opt_bytes,
                      "temp_b": mp.temp_bytes}
        worst = max(worst, shards / ideal, xla_state / ideal)
        print(f"fsdp {fsdp}: ideal {ideal / 2**20:.3f} MiB  shards {shards / 2**20:.3f} MiB "
              f"({shards / ideal:.3f}x)  xla {xla_state / 2**20:.3f} MiB ({xla_state / ideal:.3f}x)  "
              f"temp {mp.temp_bytes / 2**20:.2f} MiB", flush=True)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(spec.state_plan.abstract.params)))
    timing.report("fsdp_memory", "per-device params+opt <= 1.15x total/fsdp (shards and memory_analysis)", worst,
                  params_m=n_params / 1e6, total_state_mib=total / 2**20,
                  **{f"fsdp{n}_{k}": round(v, 4) if "ratio" in k else int(v) for n, r in rows.items()
                     for k, v in r.items()})


if __name__ == "__main__":
    main()
