"""Metrics writer (JSONL + TensorBoard), resume truncation, throughput/MFU meter, progress bar, curve plots."""
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.train import metrics as M


def test_jsonl_and_tensorboard(tmp_path):
    with M.MetricsWriter(str(tmp_path)) as w:
        rec = w.write_scalars(1, {"loss": jnp.float32(2.5), "finite": jnp.int32(1), "lr": 1e-3,
                                  "bad": float("nan"), "vec": np.arange(2)})
        w.write_scalars(2, {"loss": 2.0})
        # flushed line by line: readable while the run is going
        assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 2
        paths = w.write_images(2, {"eval/grid": np.zeros((8, 12, 3), np.float32), "gray": np.ones((4, 4), np.uint8)})
    assert rec == {"step": 1, "loss": 2.5, "finite": 1, "lr": 1e-3, "bad": None, "vec": [0, 1]}
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]    # strict JSON (NaN -> null)
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["loss"] == 2.0
    assert sorted(os.path.basename(p) for p in paths) == ["eval_grid_2.png", "gray_2.png"]


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    with M.MetricsWriter(str(tmp_path)) as w:
        for s in range(1, 4):
            w.write_scalars(s, {"loss": 1.0 / s})
    files = [f for f in os.listdir(tmp_path / "tb") if "tfevents" in f]
    assert files
    from tensorboardX.proto import event_pb2
    import struct
    data = open(tmp_path / "tb" / files[0], "rb").read()
    vals, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in ev.summary.value:
            vals.append((ev.step, v.tag, round(v.simple_value, 6)))
    assert vals == [(1, "loss", 1.0), (2, "loss", 0.5), (3, "loss", round(1 / 3, 6))]


def test_resume_drops_lines_after_the_checkpoint_and_fresh_run_truncates(tmp_path):
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        for s in range(1, 6):
            w.write_scalars(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                    # torn line of a killed process
    with M.MetricsWriter(str(tmp_path), resume_step=3, tensorboard=False) as w:
        w.write_scalars(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in M.read_metrics(str(tmp_path / "metrics.jsonl"))] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write_scalars(1, {"loss": 9.0})
    assert M.read_metrics(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 9.0}]
    off = M.MetricsWriter(str(tmp_path / "other"), enabled=False)      # non-zero processes write nothing
    off.write_scalars(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "other")


def test_throughput_meter_mfu_and_flops_helpers():
    meter = M.ThroughputMeter(flops_per_step_per_device=2e12, peak_flops=1e14)
    meter._t -= 0.5                                    # pretend 0.5 s passed
    out = meter.update(2, tokens=1000, examples=8)
    assert out["steps_per_s"] == pytest.approx(4.0, rel=0.05) and out["tokens_per_s"] == pytest.approx(2000, rel=0.05)
    assert out["mfu"] == pytest.approx(2e12 * 2 / (0.5 * 1e14), rel=0.05)
    assert out["device_tflops_per_s"] == pytest.approx(2 * 2 / 0.5, rel=0.05)
    assert "mfu" not in M.ThroughputMeter(flops_per_step_per_device=None, peak_flops=1e14).update(1)
    assert M.peak_flops_per_device() is None           # CPU: no MFU
    assert M.transformer_train_flops_per_token(100, 2, 8, 16) == 6 * 100 + 12 * 2 * 8 * 16

    class Dev:
        device_kind = "TPU v5 lite"
    assert M.peak_flops_per_device(Dev()) == 197e12

    import jax
    f = jax.jit(lambda a, b: a @ b)
    flops = M.compiled_flops_per_device(f, jnp.ones((32, 64)), jnp.ones((64, 16)))
    assert flops == pytest.approx(2 * 32 * 64 * 16, rel=0.01)


def test_progress_bar_and_plot_curves(tmp_path):
    bar = M.progress_bar(10, initial=3, enabled=False)
    bar.update(1)
    bar.close()
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        for s in range(1, 11):
            w.write_scalars(s, {"loss": math.exp(-s / 3), "lr": 1e-3})
    out = M.plot_curves(str(tmp_path / "metrics.jsonl"), ["loss", "lr"], str(tmp_path / "plots" / "curves.png"))
    from PIL import Image
    im = Image.open(out)
    assert im.size[0] > im.size[1] > 100 and im.format == "PNG"
    with pytest.raises(ValueError, match="no 'acc' values"):
        M.plot_curves(str(tmp_path / "metrics.jsonl"), ["acc"], str(tmp_path / "x.png"))
