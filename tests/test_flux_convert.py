"""FLUX transformer checkpoints: diffusers folder -> ours -> diffusers (fp32 exact, sharded index, bf16) and the
error listing missing / unexpected / mis-shaped tensors."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from edit_r1_jax.models import flux  # noqa: E402
from edit_r1_jax.models.flux import convert, parity  # noqa: E402
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = parity.torch_transformer(seed=1)
    d = str(tmp_path_factory.mktemp("flux_src"))
    m.save_pretrained(d)
    return m, d


def _state(m):
    return {k: v.detach().float().numpy() for k, v in m.state_dict().items()}


def test_roundtrip_through_diffusers_is_exact(saved, tmp_path):
    m, d = saved
    cfg, params = flux.load_transformer(d)
    assert params["transformer_blocks"]["ff"]["net_0_proj"]["kernel"].shape == (2, 32, 128)
    assert params["single_transformer_blocks"]["proj_out"]["kernel"].shape == (2, 160, 32)
    assert set(convert.expected_tensors(cfg)) == set(m.state_dict())
    out = str(tmp_path / "out")
    flux.save_transformer(cfg, params, out)
    m2 = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
    assert dict(m2.config) == {**dict(m2.config), **{k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in dict(m.config).items() if not k.startswith("_")}}
    a, b = _state(m), _state(m2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sharded_index_save_and_load(saved, tmp_path):
    m, d = saved
    cfg, params = flux.load_transformer(d)
    out = str(tmp_path / "sharded")
    files = flux.save_transformer(cfg, params, out, max_shard_bytes=64 * 1024)
    assert any(f.endswith("diffusion_pytorch_model.safetensors.index.json") for f in files)
    assert sum(f.endswith(".safetensors") for f in files) > 1
    m2 = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
    a, b = _state(m), _state(m2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    _, p2 = flux.load_transformer(out)
    np.testing.assert_array_equal(np.asarray(p2["proj_out"]["kernel"]), np.asarray(params["proj_out"]["kernel"]))


def test_bf16_checkpoint_load_and_save(saved, tmp_path):
    m, _ = saved
    src = str(tmp_path / "bf16")
    m.to(torch.bfloat16).save_pretrained(src)
    m.to(torch.float32)
    reader = SafetensorsReader(src, prefix="diffusion_pytorch_model")
    assert reader.dtype("proj_out.weight") == np.dtype(ml_dtypes.bfloat16)
    cfg32, p32 = flux.load_transformer(src)                       # upcast
    assert cfg32.dtype == jnp.float32 and p32["proj_out"]["kernel"].dtype == jnp.float32
    want = reader.get("transformer_blocks.1.attn.to_q.weight").astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(p32["transformer_blocks"]["attn"]["to_q"]["kernel"][1]), want)
    cfg16, p16 = flux.load_transformer(src, dtype=jnp.bfloat16)
    assert cfg16.dtype == jnp.bfloat16 and p16["x_embedder"]["kernel"].dtype == jnp.bfloat16
    out = str(tmp_path / "bf16_out")
    flux.save_transformer(cfg16, p16, out)
    m2 = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert m2.proj_out.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(m2.proj_out.weight.detach().float().numpy(),
                                  reader.get("proj_out.weight").astype(np.float32))


def test_error_lists_missing_extra_and_misshaped(saved, tmp_path):
    _, d = saved
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del tensors["transformer_blocks.1.ff.net_2.weight".replace("net_2", "net.2")]
    tensors["transformer_blocks.1.attn.to_q.weight"] = np.zeros((5, 32), np.float32)
    tensors["pos_embed.extra"] = np.zeros((3,), np.float32)
    bad = str(tmp_path / "bad")
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, bad, basename="diffusion_pytorch_model", extra_files={"config.json": config_text})
    with pytest.raises(CheckpointError) as e:
        flux.load_transformer(bad)
    msg = str(e.value)
    assert "missing tensor: transformer_blocks.1.ff.net.2.weight (expected shape (32, 128))" in msg
    assert "unexpected tensor: pos_embed.extra" in msg
    assert "wrong shape: transformer_blocks.1.attn.to_q.weight: expected (32, 32), got (5, 32)" in msg
    assert bad in msg


def test_error_without_config_and_wrong_class(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        flux.load_transformer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        flux.load_transformer(str(tmp_path))
