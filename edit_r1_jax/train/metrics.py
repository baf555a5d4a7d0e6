"""Run metrics: ``WORKDIR/metrics.jsonl`` + TensorBoard (``WORKDIR/tb/``), throughput / MFU meter, progress bar,
and loss-curve plots.

``metrics.jsonl`` holds one JSON object per logged step, e.g. ``{"step": 10, "loss": 2.31, "lr": 1e-5, ...}``;
non-finite values are written as ``null`` (strict JSON). Only process 0 writes. On resume from step k, lines with
``step > k`` (logged by the interrupted run after its last checkpoint) are dropped so the file reads as one run.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tb"


def _to_python(v: Any) -> Any:
    v = jax.device_get(v)
    if isinstance(v, np.ndarray):
        if v.size != 1:
            return v.tolist()
        v = v.reshape(()).item()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a killed process is ignored)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsWriter:
    """JSONL + TensorBoard writer. ``enabled`` defaults to ``jax.process_index() == 0``."""

    def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool | None = None,
                 tensorboard: bool = True):
        self.workdir = workdir
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._f = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = read_metrics(self.path)
        if resume_step is not None:
            kept = [r for r in kept if r.get("step", -1) <= resume_step]
        else:
            kept = []   # a fresh run starts a fresh file
        with open(self.path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(self.path + ".tmp", self.path)
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=os.path.join(workdir, TB_SUBDIR), flush_secs=10)

    def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append ``{"step": step, **metrics}`` (device arrays fetched, scalars as numbers) and flush."""
        rec = {"step": int(step)}
        for k, v in metrics.items():
            rec[k] = _to_python(v)
        if not self.enabled:
            return rec
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
        return rec

    def write_images(self, step: int, images: Mapping[str, Any], png_dir: str | None = "images") -> list[str]:
        """Images (HWC, uint8 or float in [0, 1]) to TensorBoard and, if ``png_dir``, to
        ``WORKDIR/<png_dir>/<tag>_<step>.png``. Returns the PNG paths written."""
        paths = []
        if not self.enabled:
            return paths
        from PIL import Image
        for tag, img in images.items():
            arr = np.asarray(jax.device_get(img))
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            if arr.ndim == 2:
                arr = arr[..., None].repeat(3, -1)
            if self._tb is not None:
                self._tb.add_image(tag, arr, int(step), dataformats="HWC")
            if png_dir:
                d = os.path.join(self.workdir, png_dir)
                os.makedirs(d, exist_ok=True)
                p = os.path.join(d, f"{tag.replace('/', '_')}_{int(step)}.png")
                Image.fromarray(arr).save(p)
                paths.append(p)
        return paths

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# throughput and MFU

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched against ``device.device_kind`` by substring.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops_per_device(device: Any = None) -> float | None:
    """Peak dense bf16 FLOP/s of one accelerator; None for CPUs and unknown kinds (then no MFU is reported)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key, flops in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return flops
    return None


def transformer_train_flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward): 6 N + 12 L d S (PaLM, appendix B)."""
    return 6.0 * num_params + 12.0 * num_layers * d_model * seq_len


def compiled_flops_per_device(jitted: Any, *args: Any) -> float | None:
    """XLA's FLOP count of one call of ``jitted(*args)`` per device (``cost_analysis`` is per device)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


class ThroughputMeter:
    """Steps/s, examples/s, tokens/s and MFU between successive ``update`` calls.

    Call ``update(steps, tokens=..., examples=...)`` after fetching a step's metrics (the fetch synchronises with
    the device, so wall time covers the work). MFU = flops_per_step_per_device * steps / (seconds * peak).
    """

    def __init__(self, *, flops_per_step_per_device: float | None = None, peak_flops: float | None = None):
        self.flops = flops_per_step_per_device
        self.peak = peak_flops if peak_flops is not None else peak_flops_per_device()
        self._t = time.perf_counter()

    def reset(self) -> None:
        self._t = time.perf_counter()

    def update(self, steps: int = 1, *, tokens: float | None = None, examples: float | None = None) -> dict:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        self._t = now
        out = {"steps_per_s": steps / dt, "step_time_s": dt / max(steps, 1)}
        if tokens is not None:
            out["tokens_per_s"] = float(tokens) / dt
        if examples is not None:
            out["examples_per_s"] = float(examples) / dt
        if self.flops:
            out["device_tflops_per_s"] = self.flops * steps / dt / 1e12     # achieved, per device
            if self.peak:
                out["mfu"] = self.flops * steps / (dt * self.peak)
        return out


def progress_bar(total: int, initial: int = 0, desc: str = "train", enabled: bool | None = None):
    """tqdm bar on process 0 only (a no-op bar elsewhere); ``bar.update(1)``, ``bar.set_postfix(loss=...)``."""
    from tqdm.auto import tqdm
    enabled = (jax.process_index() == 0) if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------------------------------------------
# plots

def plot_curves(metrics_jsonl: str, keys: Iterable[str], out_png: str, *, title: str | None = None) -> str:
    """One panel per key (value vs step) from a metrics.jsonl, saved as a PNG (matplotlib Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = read_metrics(metrics_jsonl)
    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves: give at least one metric key")
    fig = Figure(figsize=(4.0 * len(keys), 3.2))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
        if not pts:
            raise ValueError(f"plot_curves: no '{key}' values in {metrics_jsonl} "
                             f"(keys present: {sorted({k for r in recs for k in r})})")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
