"""T5 v1.1 encoder parity with transformers 5.24 ``T5EncoderModel`` (eager attention) on a tiny random config.

Precision: fp32 on both sides, JAX under ``highest`` matmul precision; tolerance: relative error <= 1e-5.
The tiny config (8 buckets, max distance 16, 40 tokens) exercises the exact, log-bucket and clamp branches.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from edit_r1_jax import parallel
from edit_r1_jax.models.flux import t5 as ft5
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

TOL = 1e-5


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _tiny_torch_t5(feed_forward_proj="gated-gelu", seed=0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    feed_forward_proj=feed_forward_proj, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                                    tie_word_embeddings=False))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _tiny_torch_t5()
    d = str(tmp_path_factory.mktemp("t5"))
    model.save_pretrained(d)
    cfg, params = ft5.load_t5(d)
    return model, d, cfg, params


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0                      # second prompt right-padded after 25 tokens
    ids[1, 25:] = 0
    return ids, mask


def test_config(tiny):
    model, _, cfg, params = tiny
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (32, 2, 4, 8, 64)
    assert cfg.is_gated and cfg.dense_act_fn == "gelu_new"
    assert params["layers"]["self_attn"]["q"]["kernel"].shape == (2, 32, 32)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-700, 701)[None]
    for nb, md in ((32, 128), (8, 16)):
        ref = T5Attention._relative_position_bucket(rel, True, nb, md).numpy()[0]
        # rel = k - q: row q=700 over keys 0..1400 spans -700..700
        ours = ft5.relative_position_buckets(701, 1401, nb, md)[700]
        np.testing.assert_array_equal(ours, ref)


def test_t5_block_with_relative_bias(tiny, highest_precision):
    model, _, cfg, params = tiny
    torch.manual_seed(2)
    x = torch.randn(2, 40, 32)
    attn0 = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        ref_bias = attn0.compute_bias(40, 40)                                          # [1, H, T, T]
        ref0 = model.encoder.block[0](x)[0]
        ref1 = model.encoder.block[1](x, position_bias=ref_bias)[0]
    table = params["relative_attention_bias"]["embedding"]
    buckets = ft5.relative_position_buckets(40, 40, 8, 16)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]
    assert rel_err(bias, ref_bias) <= TOL
    block = jax.jit(lambda p, xx, b: ft5.T5Block(cfg).apply({"params": p}, xx, b, None)[0])
    for i, ref in ((0, ref0), (1, ref1)):
        p_i = jax.tree.map(lambda a: a[i], params["layers"])
        assert rel_err(block(p_i, jnp.asarray(x.numpy()), bias), ref) <= TOL


def test_last_hidden_state_with_and_without_padding_mask(tiny, batch, highest_precision):
    model, _, cfg, params = tiny
    ids, mask = batch
    with torch.no_grad():
        ref_nomask = model(input_ids=ids).last_hidden_state
        ref_mask = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours_nomask = ft5.t5_encode(cfg, params, jnp.asarray(ids.numpy()))
    ours_mask = ft5.t5_encode(cfg, params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert ours_nomask.shape == (2, 40, 32) and ours_nomask.dtype == jnp.float32
    assert rel_err(ours_nomask, ref_nomask) <= TOL
    assert rel_err(ours_mask, ref_mask) <= TOL
    assert rel_err(ours_mask[1, :25], ref_mask[1, :25]) <= TOL
    assert rel_err(ours_mask[1, :25], ref_nomask[1, :25]) > 1e-3  # the mask matters


def test_non_gated_relu_variant(tmp_path, batch, highest_precision):
    model = _tiny_torch_t5("relu", seed=3)
    model.save_pretrained(str(tmp_path))
    cfg, params = ft5.load_t5(str(tmp_path))
    assert not cfg.is_gated and "wi" in params["layers"]["mlp"]
    ids, _ = batch
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    assert rel_err(ft5.t5_encode(cfg, params, jnp.asarray(ids.numpy())), ref) <= TOL


def test_save_load_round_trip_through_transformers(tiny, batch, tmp_path, highest_precision):
    from transformers import T5EncoderModel
    model, _, cfg, params = tiny
    out = str(tmp_path / "saved")
    ft5.save_t5(cfg, params, out)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    reloaded = T5EncoderModel.from_pretrained(out).eval()
    ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        torch.testing.assert_close(new_sd[k], ref_sd[k], rtol=0, atol=0)
    cfg2, params2 = ft5.load_t5(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_sharded_embed_tokens_alias_and_mesh(tiny, batch, tmp_path, highest_precision):
    _, d, cfg, params = tiny
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)).astype(jnp.bfloat16) for k in reader.keys()}
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")      # older exports name it so
    pipe = tmp_path / "pipe"
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, str(pipe / "text_encoder_2"), basename="model", max_shard_bytes=4096,
                      extra_files={"config.json": config_text})
    assert os.path.isfile(pipe / "text_encoder_2" / "model.safetensors.index.json")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg_b, p_b = ft5.load_t5(str(pipe), dtype=jnp.bfloat16, mesh=mesh)          # resolves text_encoder_2/
    assert cfg_b == cfg
    assert p_b["layers"]["mlp"]["wo"]["kernel"].dtype == jnp.float32           # kept fp32 like transformers
    assert p_b["layers"]["mlp"]["wi_0"]["kernel"].dtype == jnp.bfloat16
    q = p_b["layers"]["self_attn"]["q"]["kernel"]                                # [L, embed, heads*dk]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    want = np.asarray(params["shared"]["embedding"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(p_b["shared"]["embedding"]), want)
    axes = ft5.param_logical_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
    ids = jnp.asarray(batch[0].numpy())
    h_bf16 = ft5.t5_encode(cfg_b, p_b, ids)                                      # bf16 weights, sharded
    assert h_bf16.dtype == jnp.bfloat16
    assert rel_err(h_bf16.astype(jnp.float32), ft5.t5_encode(cfg, params, ids)) < 3e-2


def test_checkpoint_errors_list_every_bad_tensor(tiny, tmp_path):
    _, d, _, _ = tiny
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    tensors["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
    tensors["encoder.final_layer_norm.weight"] = np.zeros((31,), np.float32)
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, str(tmp_path), basename="model", extra_files={"config.json": config_text})
    with pytest.raises(CheckpointError) as e:
        ft5.load_t5(str(tmp_path))
    msg = str(e.value)
    assert "missing tensor: encoder.block.1.layer.1.DenseReluDense.wo.weight (expected shape (32, 64))" in msg
    assert "unexpected tensor: encoder.block.2.layer.0.SelfAttention.q.weight" in msg
    assert "wrong shape: encoder.final_layer_norm.weight: expected (32,), got (31,)" in msg


def test_init_matches_loaded_structure(tiny):
    _, _, cfg, params = tiny
    init = ft5.init_t5(cfg, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, params)


def test_t5_v1_1_xxl_param_count_matches_transformers():
    from transformers import T5Config, T5EncoderModel
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                      num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    n_ref = sum(p.numel() for p in ref.parameters())
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(ft5.t5_param_shapes(ft5.T5Config())))
    assert n == n_ref == 4_762_310_656
