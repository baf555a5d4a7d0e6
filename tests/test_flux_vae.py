"""FLUX VAE (AutoencoderKL) parity with diffusers 0.42.1 on a tiny random config.

Precision: fp32 weights and activations on both sides, JAX under ``highest`` matmul precision; tolerance: relative
error ||ours - ref|| / ||ref|| <= 1e-5 (per block and end to end).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from edit_r1_jax import parallel
from edit_r1_jax.models.flux import vae as fvae
from edit_r1_jax.models.flux import vae_blocks as vb
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

TOL = 1e-5


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nchw_to_nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _tiny_torch_vae(use_quant: bool = False):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=use_quant, use_post_quant_conv=use_quant, mid_block_add_attention=True).eval()
    with torch.no_grad():  # random norms too (defaults are ones/zeros and would hide a scale/bias mix-up)
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    vae = _tiny_torch_vae()
    d = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(d)
    cfg, params = fvae.load_vae(d)
    return vae, d, cfg, params


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 48) * 2 - 1


def test_config_from_diffusers(tiny):
    vae, _, cfg, params = tiny
    assert cfg.block_out_channels == (16, 32) and cfg.latent_channels == 4 and cfg.norm_num_groups == 8
    assert cfg.shift_factor == pytest.approx(0.1159) and cfg.scaling_factor == pytest.approx(0.3611)
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    n_torch = sum(p.numel() for p in vae.parameters())
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == n_torch
    assert jax.tree.structure(params) == jax.tree.structure(fvae.init_vae(cfg, jax.random.key(0)))


def test_flux_default_config_param_count():
    shapes = fvae.vae_param_shapes(fvae.VAEConfig())
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == 83_819_683  # diffusers AutoencoderKL with the FLUX.1 config (models.md §3: 83.8 M)


def _apply(module, params, x_nchw: torch.Tensor) -> np.ndarray:
    """Run one Linen block (jitted: one compile instead of one per op) on an NCHW torch tensor; NCHW out."""
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
    return nhwc_to_nchw(fn(params, nchw_to_nhwc(x_nchw)))


def test_resnet_block_with_shortcut(tiny, highest_precision):
    vae, _, cfg, params = tiny
    torch.manual_seed(2)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        ref = vae.encoder.down_blocks[1].resnets[0](x, None)
    p = params["encoder"]["down_blocks_1"]["resnets_0"]
    assert "conv_shortcut" in p  # 16 -> 32 channels
    assert rel_err(_apply(vb.ResnetBlock2D(32, cfg.norm_num_groups), p, x), ref) <= TOL


def test_mid_block_attention(tiny, highest_precision):
    vae, _, cfg, params = tiny
    torch.manual_seed(3)
    x = torch.randn(2, 32, 8, 12)
    with torch.no_grad():
        ref_attn = vae.decoder.mid_block.attentions[0](x)
        ref_mid = vae.decoder.mid_block(x)
    p = params["decoder"]["mid_block"]
    assert rel_err(_apply(vb.MidAttention(cfg.norm_num_groups, 32), p["attentions_0"], x), ref_attn) <= TOL
    # query chunking (8*12 = 96 tokens in chunks of 32) gives the same result
    chunked = vb.MidAttention(cfg.norm_num_groups, 32, query_chunk=32)
    assert rel_err(_apply(chunked, p["attentions_0"], x), ref_attn) <= TOL
    assert rel_err(_apply(vb.MidBlock2D(cfg.norm_num_groups), p, x), ref_mid) <= TOL


def test_down_and_up_sampling_blocks(tiny, highest_precision):
    vae, _, cfg, params = tiny
    torch.manual_seed(4)
    x = torch.randn(1, 16, 9, 13)  # odd sizes exercise the asymmetric (0,1,0,1) padding
    z = torch.randn(1, 32, 5, 7)
    with torch.no_grad():
        ref_down = vae.encoder.down_blocks[0].downsamplers[0](x)
        ref_up = vae.decoder.up_blocks[0].upsamplers[0](z)
    down = _apply(vb.Downsample2D(16), params["encoder"]["down_blocks_0"]["downsamplers_0"], x)
    assert rel_err(down, ref_down) <= TOL
    up = _apply(vb.Upsample2D(32), params["decoder"]["up_blocks_0"]["upsamplers_0"], z)
    assert rel_err(up, ref_up) <= TOL


def test_encoder_and_decoder(tiny, images, highest_precision):
    """Encoder output (mean ++ logvar, before clamping) and decoder output, each against diffusers' module."""
    vae, _, cfg, params = tiny
    z = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_h = vae.encoder(images)
        ref_x = vae.decoder(z)
    assert float(ref_h[:, 4:].abs().max()) < 20  # so the logvar clamp is the identity here
    mean, logvar = fvae.vae_posterior(cfg, params, jnp.asarray(images.numpy()))
    assert rel_err(np.concatenate([mean, logvar], axis=1), ref_h) <= TOL
    assert rel_err(fvae.vae_decode(cfg, params, jnp.asarray(z.numpy())), ref_x) <= TOL


def test_encode_decode_round_trip(tiny, images, highest_precision):
    vae, _, cfg, params = tiny
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        ref_mean, ref_logvar = post.mode(), post.logvar
        ref_img = vae.decode(ref_mean).sample
    mean, logvar = fvae.vae_posterior(cfg, params, jnp.asarray(images.numpy()))
    assert mean.shape == (2, 4, 16, 24)
    assert rel_err(mean, ref_mean) <= TOL and rel_err(logvar, ref_logvar) <= TOL
    np.testing.assert_array_equal(np.asarray(fvae.vae_encode(cfg, params, jnp.asarray(images.numpy()))),
                                  np.asarray(mean))
    img = fvae.vae_decode(cfg, params, mean)
    assert img.shape == (2, 3, 32, 48)
    assert rel_err(img, ref_img) <= TOL
    lat = fvae.normalize_latents(cfg, mean)
    np.testing.assert_allclose(np.asarray(lat), (ref_mean.numpy() - 0.1159) * 0.3611, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fvae.denormalize_latents(cfg, lat)), np.asarray(mean), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_quant_convs(tmp_path, images, highest_precision):
    vae = _tiny_torch_vae(use_quant=True)
    vae.save_pretrained(str(tmp_path))
    cfg, params = fvae.load_vae(str(tmp_path))
    assert cfg.use_quant_conv and "quant_conv" in params and "post_quant_conv" in params
    with torch.no_grad():
        ref_mean = vae.encode(images).latent_dist.mode()
        ref_img = vae.decode(ref_mean).sample
    mean = fvae.vae_encode(cfg, params, jnp.asarray(images.numpy()))
    assert rel_err(mean, ref_mean) <= TOL
    assert rel_err(fvae.vae_decode(cfg, params, mean), ref_img) <= TOL


def test_save_load_round_trip_through_diffusers(tiny, images, tmp_path, highest_precision):
    from diffusers import AutoencoderKL
    vae, _, cfg, params = tiny
    out = str(tmp_path / "saved")
    fvae.save_vae(cfg, params, out)
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    reloaded = AutoencoderKL.from_pretrained(out).eval()
    assert reloaded.config.shift_factor == pytest.approx(0.1159)
    ref_sd, new_sd = vae.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        torch.testing.assert_close(new_sd[k], ref_sd[k], rtol=0, atol=0)
    cfg2, params2 = fvae.load_vae(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_sharded_checkpoint_from_pipeline_dir(tiny, tmp_path):
    vae, _, cfg, params = tiny
    pipe_dir = tmp_path / "pipe"
    vae.to(torch.bfloat16).save_pretrained(str(pipe_dir / "vae"), max_shard_size="20KB")
    vae.to(torch.float32)
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(pipe_dir / "vae"))
    cfg_b, p_b = fvae.load_vae(str(pipe_dir))                         # resolves pipe_dir/vae
    leaf = p_b["encoder"]["conv_in"]["kernel"]
    assert leaf.dtype == jnp.float32
    want = np.asarray(params["encoder"]["conv_in"]["kernel"]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(leaf), want)
    _, p_bf = fvae.load_vae(str(pipe_dir), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p_bf))
    img = fvae.vae_decode(cfg_b, p_bf, jnp.zeros((1, 4, 4, 4), jnp.bfloat16))
    assert img.dtype == jnp.bfloat16 and img.shape == (1, 3, 8, 8)


def test_checkpoint_errors_list_every_bad_tensor(tiny, tmp_path):
    _, d, _, _ = tiny
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del tensors["decoder.conv_out.bias"]                                       # missing
    tensors["decoder.extra.weight"] = np.zeros((2,), np.float32)               # unexpected
    tensors["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)    # wrong shape
    bad = tmp_path / "bad"
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, str(bad), basename="diffusion_pytorch_model", extra_files={"config.json": config_text})
    with pytest.raises(CheckpointError) as e:
        fvae.load_vae(str(bad))
    msg = str(e.value)
    assert "missing tensor: decoder.conv_out.bias" in msg
    assert "unexpected tensor: decoder.extra.weight" in msg
    assert "wrong shape: encoder.conv_in.weight: expected (16, 3, 3, 3), got (16, 3, 5, 5)" in msg


def test_unsupported_block_type_is_rejected(tiny, tmp_path):
    _, d, _, _ = tiny
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    with pytest.raises(ValueError, match="down_block_types"):
        fvae.VAEConfig.from_diffusers(cfg)


def test_load_onto_mesh(tiny):
    _, d, cfg, params = tiny
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg_m, p_m = fvae.load_vae(d, mesh=mesh)
    assert cfg_m == cfg
    k = p_m["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]            # [3,3,32,32]: conv_out on tensor
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (3, 3, 32, 16)
    axes = fvae.param_logical_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_m, params)
