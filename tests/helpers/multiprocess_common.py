"""Shared pieces of the multi-process tests (`test_multiprocess_training.py`, `test_multiprocess_rl.py`): the
subprocess environment, launching a worker on N simulated hosts (or one plain 8-device process), and reading back
metrics and exported tensors."""
from __future__ import annotations

import glob
import json
import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XLA_EXTRA = "--xla_backend_optimization_level=0"      # halves compile time; both sides of a comparison use it


def subprocess_env(**extra) -> dict:
    """Environment for a worker process.

    No persistent compilation cache: its keys differ per process and only process 0 writes it, so with a warm cache
    process 0 would reach the first collective long before process 1 has compiled, past gloo's fixed 30 s rendezvous
    timeout ("Gloo context initialization failed").
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDIT_R1_", "JAX_COMPILATION_CACHE"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", EDIT_R1_TEST_XLA_EXTRA=XLA_EXTRA,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def launch(nproc: int, worker: list, timeout: int, log_tail: int = 5000) -> str:
    """``worker`` (argv) through launchers/local_multiprocess.sh on ``nproc`` processes, or (``nproc=0``) one plain
    process with 8 devices. Returns the combined log (asserts rc 0, showing the log's tail)."""
    if nproc:
        cmd, env = ["bash", "launchers/local_multiprocess.sh", str(nproc), *worker], subprocess_env()
    else:
        cmd, env = worker, subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-log_tail:]
    return log


def read_metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def load_safetensors_dir(d: str) -> dict:
    """Every tensor of every ``*.safetensors`` file in ``d`` (asserts there is at least one file)."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    assert out, f"no safetensors in {d}"
    return out


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare_exports(dir_a: str, dir_b: str) -> tuple[float, str, float]:
    """Two exported safetensors directories with the same tensor names -> (relative error of the whole parameter
    vector, name of the worst tensor, its relative error), ``b`` as the reference; prints them."""
    a, b = load_safetensors_dir(dir_a), load_safetensors_dir(dir_b)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    errs = {k: rel_err(a[k], b[k]) for k in b}
    worst = max(errs, key=errs.get)
    overall = float(np.sqrt(num / max(den, 1e-300)))
    print(f"params: relative error {overall:.2e} overall, worst tensor {errs[worst]:.2e} ({worst})")
    return overall, worst, errs[worst]
