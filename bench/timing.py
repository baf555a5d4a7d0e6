"""Shared timing helpers for bench/ scripts: warm up, synchronise, repeat, report median and spread.

Compilation is timed separately (first call minus steady state is not used: we lower+compile explicitly where
possible). Every benchmark prints one `RESULT` JSON line that bench/run_all.py collects into BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable


def block(x: Any) -> Any:
    import jax
    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 5, sync: Callable[[Any], Any] = block) -> dict:
    """Median/min/max seconds of ``fn()`` after ``warmup`` calls; ``sync`` waits for async results.

    ``first_s`` is the first warm-up call (for a jitted function: tracing + compilation + one run, so compilation is
    about ``first_s - median_s``; reported as ``compile_est_s``)."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        sync(fn())
        first = time.perf_counter() - t0 if first is None else first
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    out = _stats(times)
    if first is not None:
        out.update(first_s=first, compile_est_s=max(first - out["median_s"], 0.0))
    return out


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeat": len(times)}


def time_interleaved(fns: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]], *, rounds: int = 7,
                     warmup: int = 1) -> dict[str, dict]:
    """Median seconds of each ``name: (fn, sync)`` timed in alternation (one call of each per round), so slow
    drifts of a shared, noisy machine hit every contender alike; returns ``{name: time_fn-style dict}``."""
    for fn, sync in fns.values():
        for _ in range(warmup):
            sync(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (fn, sync) in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: _stats(v) for k, v in times.items()}


def time_compile(jitted, *args, **kwargs) -> tuple[Any, float]:
    """(compiled, seconds) for lower+compile of a jitted function on concrete or abstract args."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


def machine() -> dict:
    import jax
    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count()}


def report(name: str, goal: str, ratio: float | None, **fields: Any) -> dict:
    """Print a human line and a machine-readable RESULT line."""
    rec = {"bench": name, "goal": goal, "ratio": ratio, **fields, "machine": machine()}
    print(f"[{name}] ratio={ratio if ratio is None else round(ratio, 3)}  goal: {goal}")
    print("RESULT " + json.dumps(rec, default=float))
    return rec
