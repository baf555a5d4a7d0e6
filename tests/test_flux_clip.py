"""CLIP text model parity with transformers 5.24 ``CLIPTextModel`` (eager attention) on tiny random configs, and the
FLUX tokenizers loaded from a pipeline directory.

Precision: fp32 on both sides, JAX under ``highest`` matmul precision; tolerance: relative error <= 1e-5 for the
last hidden state and the pooled output.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from edit_r1_jax import parallel
from edit_r1_jax.models.flux import clip as fclip
from edit_r1_jax.models.flux.tokenization import load_tokenizers, tokenize_prompts
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

TOL = 1e-5
EOT = 99  # largest id of the tiny vocab, like <|endoftext|> = 49407 in the real one


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _tiny_torch_clip(eos_token_id=2, hidden_act="quick_gelu", seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                                         layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=eos_token_id,
                                         pad_token_id=1, projection_dim=32))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _tiny_torch_clip()
    d = str(tmp_path_factory.mktemp("clip"))
    model.save_pretrained(d)
    cfg, params = fclip.load_clip(d)
    return model, d, cfg, params


def _ids(g, lengths, total=20):
    """BOS, random tokens, EOT at position len-1, then EOT padding (as CLIP's tokenizer pads)."""
    rows = []
    for n in lengths:
        row = torch.full((total,), EOT)
        row[0] = 0
        row[1:n - 1] = torch.randint(3, EOT, (n - 2,), generator=g)
        rows.append(row)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def batch():
    ids = _ids(torch.Generator().manual_seed(1), (20, 12))
    mask = (torch.arange(20)[None] < torch.tensor([20, 12])[:, None]).long()
    return ids, mask


def test_config(tiny):
    model, _, cfg, params = tiny
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_act) == (32, 2, 4, "quick_gelu")
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())


def test_clip_encoder_layer(tiny, highest_precision):
    model, _, cfg, params = tiny
    torch.manual_seed(2)
    x = torch.randn(2, 20, 32)
    causal = torch.full((20, 20), torch.finfo(torch.float32).min).triu(1)[None, None]
    layer = jax.jit(lambda p, xx: fclip.CLIPEncoderLayer(cfg).apply({"params": p}, xx, None)[0])
    for i in range(2):
        with torch.no_grad():
            ref = model.encoder.layers[i](x, causal)
        p_i = jax.tree.map(lambda a: a[i], params["layers"])
        assert rel_err(layer(p_i, jnp.asarray(x.numpy())), ref) <= TOL


def test_hidden_states_and_pooled_with_and_without_mask(tiny, batch, highest_precision):
    model, _, cfg, params = tiny
    ids, mask = batch
    with torch.no_grad():
        ref = model(input_ids=ids)
        ref_m = model(input_ids=ids, attention_mask=mask)
    h, pooled = fclip.clip_encode(cfg, params, jnp.asarray(ids.numpy()))
    assert h.shape == (2, 20, 32) and pooled.shape == (2, 32)
    assert rel_err(h, ref.last_hidden_state) <= TOL
    assert rel_err(pooled, ref.pooler_output) <= TOL
    np.testing.assert_array_equal(np.asarray(pooled[1]), np.asarray(h[1, 11]))   # first EOT of row 1
    h_m, pooled_m = fclip.clip_encode(cfg, params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert rel_err(h_m, ref_m.last_hidden_state) <= TOL
    assert rel_err(pooled_m, ref_m.pooler_output) <= TOL
    assert rel_err(h_m[1, 12:], ref.last_hidden_state[1, 12:]) > 1e-3   # the padding mask matters there


def test_pooling_at_configured_eos_with_gelu(tmp_path, highest_precision):
    """eos_token_id != 2: pooled at the first position equal to eos_token_id (not the argmax id)."""
    model = _tiny_torch_clip(eos_token_id=50, hidden_act="gelu", seed=3)
    model.save_pretrained(str(tmp_path))
    cfg, params = fclip.load_clip(str(tmp_path))
    assert cfg.eos_token_id == 50 and cfg.hidden_act == "gelu"
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 100, (2, 16), generator=g)
    ids[ids == 50] = 51
    ids[0, 7] = 50
    ids[1, 3] = 50
    ids[1, 9] = 50
    with torch.no_grad():
        ref = model(input_ids=ids)
    h, pooled = fclip.clip_encode(cfg, params, jnp.asarray(ids.numpy()))
    assert rel_err(h, ref.last_hidden_state) <= TOL
    assert rel_err(pooled, ref.pooler_output) <= TOL
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(h)[[0, 1], [7, 3]])


def test_save_load_round_trip_through_transformers(tiny, batch, tmp_path, highest_precision):
    from transformers import CLIPTextModel
    model, _, cfg, params = tiny
    out = str(tmp_path / "saved")
    fclip.save_clip(cfg, params, out)
    names = SafetensorsReader(out).keys()
    assert all(n.startswith("text_model.") for n in names)                       # Hub layout
    reloaded = CLIPTextModel.from_pretrained(out).eval()
    ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        torch.testing.assert_close(new_sd[k], ref_sd[k], rtol=0, atol=0)
    cfg2, params2 = fclip.load_clip(out)                                         # prefix stripped on load
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_pipeline_dir_with_position_ids_buffer_onto_mesh(tiny, batch, tmp_path, highest_precision):
    _, d, cfg, params = tiny
    reader = SafetensorsReader(d)
    tensors = {"text_model." + k: np.array(reader.get(k)).astype(jnp.bfloat16) for k in reader.keys()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]   # legacy buffer
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, str(tmp_path / "text_encoder"), basename="model", max_shard_bytes=8192,
                      extra_files={"config.json": config_text})
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg_b, p_b = fclip.load_clip(str(tmp_path), dtype=jnp.bfloat16, mesh=mesh)   # resolves text_encoder/
    assert cfg_b == cfg and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p_b))
    fc1 = p_b["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    axes = fclip.param_logical_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
    ids = jnp.asarray(batch[0].numpy())
    h, pooled = fclip.clip_encode(cfg_b, p_b, ids)
    h32, pooled32 = fclip.clip_encode(cfg, params, ids)
    assert h.dtype == jnp.bfloat16
    assert rel_err(h.astype(jnp.float32), h32) < 3e-2 and rel_err(pooled.astype(jnp.float32), pooled32) < 3e-2


def test_checkpoint_errors_list_every_bad_tensor(tiny, tmp_path):
    _, d, _, _ = tiny
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del tensors["encoder.layers.0.self_attn.k_proj.bias"]
    tensors["encoder.layers.0.self_attn.extra.weight"] = np.zeros((3,), np.float32)
    tensors["embeddings.position_embedding.weight"] = np.zeros((78, 32), np.float32)
    with open(os.path.join(d, "config.json")) as f:
        config_text = f.read()
    write_safetensors(tensors, str(tmp_path), basename="model", extra_files={"config.json": config_text})
    with pytest.raises(CheckpointError) as e:
        fclip.load_clip(str(tmp_path))
    msg = str(e.value)
    assert "missing tensor: encoder.layers.0.self_attn.k_proj.bias (expected shape (32,))" in msg
    assert "unexpected tensor: encoder.layers.0.self_attn.extra.weight" in msg
    assert "wrong shape: embeddings.position_embedding.weight: expected (77, 32), got (78, 32)" in msg


def test_load_tokenizers_from_pipeline_dir(tmp_path):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, T5Tokenizer
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)                   # env-notes G13
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                         + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"], extra_ids=0)
    clip_tok.save_pretrained(str(tmp_path / "tokenizer"))
    t5_tok.save_pretrained(str(tmp_path / "tokenizer_2"))
    tok1, tok2 = load_tokenizers(str(tmp_path))
    prompts = ["make it red", "turn the sky into a starry night"]
    clip_ids, t5_ids = tokenize_prompts(tok1, tok2, prompts, max_sequence_length=16)
    assert clip_ids.shape == (2, 77) and t5_ids.shape == (2, 16) and clip_ids.dtype == np.int32
    want_clip = clip_tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    want_t5 = t5_tok(prompts, padding="max_length", max_length=16, truncation=True).input_ids
    np.testing.assert_array_equal(clip_ids, np.asarray(want_clip))
    np.testing.assert_array_equal(t5_ids, np.asarray(want_t5))
    assert clip_ids[0, 0] == vocab["<|startoftext|>"] and t5_ids[1, -1] == 1        # truncated row ends in </s>
    os.rename(tmp_path / "tokenizer_2", tmp_path / "t2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        load_tokenizers(str(tmp_path))


def test_clip_l14_param_count_matches_transformers():
    from transformers import CLIPTextConfig, CLIPTextModel
    c = fclip.CLIPTextConfig()
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                           intermediate_size=c.intermediate_size, num_hidden_layers=12,
                                           num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    n_ref = sum(p.numel() for p in ref.parameters())
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(fclip.clip_param_shapes(c)))
    assert n == n_ref == 123_060_480
