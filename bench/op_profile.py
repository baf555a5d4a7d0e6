"""Where the time goes: per-op profiles of our jitted forward (XLA:CPU, from a `jax.profiler` trace) and of the
PyTorch reference (`torch.profiler`), side by side, for the benchmarks whose goal is missed.

Usage: python bench/op_profile.py {flux_forward,qwen_forward} [--iters N] [--top K]

XLA ops are grouped into what they are on CPU: library dots (YNNPACK/oneDNN/XNNPACK fusions, `dot`), layout copies
(`copy`/`transpose`/`dynamic-slice`/`concatenate` fusions: the scan's per-layer weight slices and the attention
layout changes), other generated fusions, and control flow (`while`/`cond`, whose time includes their bodies and
is therefore not added to the total). `flux_forward` profiles the per-layer inference layout (its ``ours``; the
scanned stack is ``ours_scanned``). Torch ops are grouped as matmuls (`addmm`/`mm`/`bmm`/`linear`), attention
(`scaled_dot_product`), copies (`copy_`/`cat`/`contiguous`) and the rest. Times are per forward.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# trace events that wrap other events (runtime, Python frames), never ops themselves
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "$")
_CONTROL = ("while", "cond", "call", "conditional")


def xla_group(name: str) -> str:
    base = name.split(".")[0]
    if any(k in base for k in ("ynn_fusion", "xnn_fusion", "onednn", "dot")):
        return "dots (library)"
    if base in _CONTROL or base.endswith(".clone"):
        return "control flow (incl. bodies)"
    if any(k in base for k in ("copy", "transpose", "dynamic-slice", "concatenate", "dynamic-update-slice")):
        return "layout copies"
    return "other fusions"


def xla_top_ops(fn: Callable[[], object], iters: int = 5) -> dict:
    """{op name: (ms per call of fn, calls per call of fn)} from a profiler trace of ``iters`` calls (warmed up)."""
    import jax
    for _ in range(2):
        jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(iters):
            jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        files = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))
        if not files:
            raise RuntimeError(f"op_profile: jax.profiler wrote no trace under {d}")
        with gzip.open(files[-1]) as f:
            events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith(_WRAPPERS):
            continue
        total[name] += e["dur"]
        count[name] += 1
    return {k: (v / iters / 1e3, count[k] / iters) for k, v in total.items()}


def torch_group(name: str) -> str:
    if any(k in name for k in ("addmm", "aten::mm", "bmm", "matmul", "linear")):
        return "matmuls"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (fused)"
    if any(k in name for k in ("copy_", "aten::cat", "contiguous", "clone")):
        return "copies"
    return "other"


def torch_top_ops(fn: Callable[[], object], iters: int = 3) -> dict:
    """{aten op: (self CPU ms per call of fn, calls per call)} from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    return {e.key: (e.self_cpu_time_total / iters / 1e3, e.count / iters) for e in prof.key_averages()
            if e.self_cpu_time_total > 0 and not e.key.startswith("torch.")}


def summarize(ops: dict, group: Callable[[str], str]) -> dict:
    out = collections.Counter()
    for name, (ms, _) in ops.items():
        out[group(name)] += ms
    return dict(out)


def print_table(title: str, ops: dict, group: Callable[[str], str], top: int) -> dict:
    groups = summarize(ops, group)
    counted = sum(v for k, v in groups.items() if not k.startswith("control"))
    print(f"\n== {title}: {counted:.1f} ms of ops per forward")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"   {k:28s} {v:8.1f} ms")
    print(f"   top {top} ops:")
    for name, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {ms:8.2f} ms  x{n:5.1f}  {group(name):24s} {name[:70]}")
    return groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=("flux_forward", "qwen_forward"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    import importlib
    b = importlib.import_module(args.bench).build()
    ours = print_table(f"{args.bench}: ours (XLA:CPU)", xla_top_ops(b["ours"], args.iters), xla_group, args.top)
    ref = print_table(f"{args.bench}: PyTorch reference", torch_top_ops(b["torch"], max(1, args.iters // 2)),
                      torch_group, args.top)
    print("RESULT " + json.dumps({"bench": f"op_profile/{args.bench}", "ours_ms": ours, "torch_ms": ref}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
