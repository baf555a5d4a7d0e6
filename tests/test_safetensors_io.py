"""Our safetensors reader/writer: round trip incl. bf16, sharding + index, torch interop, mismatch errors."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from edit_r1_jax.models import safetensors_io as sio


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "b.bias": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


def test_round_trip_single_file(tmp_path):
    t = _tensors()
    files = sio.write_safetensors(t, str(tmp_path / "ck"), extra_files={"config.json": "{}"})
    assert sorted(os.path.basename(f) for f in files) == ["config.json", "model.safetensors"]
    r = sio.SafetensorsReader(str(tmp_path / "ck"))
    assert sorted(r.keys()) == sorted(t)
    for k, v in t.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(v, np.float64))


def test_sharded_with_index_and_torch_reads_it(tmp_path):
    import safetensors.torch
    t = _tensors()
    sio.write_safetensors(t, str(tmp_path), basename="diffusion_pytorch_model", max_shard_bytes=40)
    index = json.load(open(tmp_path / "diffusion_pytorch_model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    r = sio.SafetensorsReader(str(tmp_path))
    np.testing.assert_array_equal(r.get("a.weight"), t["a.weight"])
    # every shard is a valid safetensors file for the reference implementation
    for shard in set(index["weight_map"].values()):
        loaded = safetensors.torch.load_file(str(tmp_path / shard))
        for k, v in loaded.items():
            np.testing.assert_array_equal(v.float().numpy(), np.asarray(t[k], np.float32))


def test_reads_torch_written_bf16(tmp_path):
    import safetensors.torch
    import torch
    x = torch.randn(3, 4).to(torch.bfloat16)
    safetensors.torch.save_file({"w": x}, str(tmp_path / "model.safetensors"))
    got = sio.SafetensorsReader(str(tmp_path)).get("w")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), x.float().numpy())


def test_check_tensors_lists_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    actual = {"a": (3, 2), "b": (4,), "d": (7,)}
    with pytest.raises(sio.CheckpointError) as e:
        sio.check_tensors(expected, actual, "ckpt_dir")
    msg = str(e.value)
    assert "missing tensor: c (expected shape (1,))" in msg
    assert "unexpected tensor: d (shape (7,))" in msg
    assert "wrong shape: a: expected (2, 3), got (3, 2)" in msg
    sio.check_tensors(expected, {"a": (2, 3), "b": (4,), "c": (1,)}, "ok")


def test_no_safetensors_and_garbage_file(tmp_path):
    with pytest.raises(sio.CheckpointError, match="no \\*.safetensors files"):
        sio.SafetensorsReader(str(tmp_path))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(sio.CheckpointError, match="not a safetensors file"):
        sio.SafetensorsReader(str(tmp_path))


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(sio.CheckpointError, match="cannot be written"):
        sio.write_safetensors({"ok": np.zeros(2, np.float32), "bad": np.array(["x"])}, str(out))
    assert not out.exists() or not os.listdir(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-save-")]
