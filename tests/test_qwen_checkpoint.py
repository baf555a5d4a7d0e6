"""Qwen2.5-VL checkpoints: round trip through transformers, both key layouts, sharded files, errors, mesh loading."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edit_r1_jax import parallel
from edit_r1_jax.models import qwen2_5_vl as q
from edit_r1_jax.models.qwen2_5_vl import testing as T
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = T.tiny_torch_model(tie=True, seed=1)
    d = str(tmp_path_factory.mktemp("qwen_tied"))
    model.save_pretrained(d)
    return model, d


def _inputs():
    grid = np.array([[1, 4, 6]])
    ids = np.array([[1, 5] + T.image_tokens(grid[0]) + [3, 4]])
    return ids, T.pixel_values_for(grid, seed=5), grid


def _torch_logits(model, ids, pv, grid):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                     mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids))).logits.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_through_transformers(tie, tied, tmp_path):
    """torch -> save_pretrained -> our load -> our save (sharded) -> transformers load: same logits (<= 1e-6 rel)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    if tie:
        model, src = tied
    else:
        model = T.tiny_torch_model(tie=False, seed=2)
        src = str(tmp_path / "src")
        model.save_pretrained(src)
    cfg, params = q.load_pretrained(src)
    assert cfg.tie_word_embeddings == tie
    assert ("lm_head" in params) == (not tie)
    out = str(tmp_path / "ours")
    files = q.save_pretrained(cfg, params, out, max_shard_bytes=100_000)
    assert any(f.endswith(".safetensors.index.json") for f in files)      # sharded with an index
    names = set(SafetensorsReader(out).keys())
    assert ("lm_head.weight" in names) == (not tie)
    assert all(n.startswith(("visual.", "model.", "lm_head.")) for n in names)   # Hub layout
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, pv, grid = _inputs()
    ref, got = _torch_logits(model, ids, pv, grid), _torch_logits(back, ids, pv, grid)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-6
    sd_a, sd_b = model.state_dict(), back.state_dict()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_v5_in_memory_layout_and_bf16_files(tied, tmp_path):
    """model.language_model.* / model.visual.* names (transformers 5 state_dict) and bf16 tensors load too."""
    model, src = tied
    d = tmp_path / "v5"
    d.mkdir()
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in sd)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    cfg, p16 = q.load_pretrained(str(d), dtype=jnp.float32)
    _, p32 = q.load_pretrained(src)
    want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), p32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), p16, want)


def test_flat_legacy_config(tied):
    _, src = tied
    nested = json.load(open(os.path.join(src, "config.json")))
    flat = {**nested, **nested["text_config"]}
    flat.pop("text_config")
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    flat.pop("rope_parameters")
    assert q.from_hf_dict(flat) == q.from_hf_dict(nested)


def _broken_copy(src, dst, edit):
    reader = SafetensorsReader(src)
    sd = {k: torch.from_numpy(np.array(reader.get(k))) for k in reader.keys()}
    edit(sd)
    os.makedirs(dst)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_missing_extra_and_wrong_shape_listed_in_one_error(tied, tmp_path):
    _, src = tied

    def edit(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]
        sd["visual.blocks.0.attn.extra.weight"] = torch.zeros(3)
        sd["visual.merger.mlp.0.bias"] = torch.zeros(7)

    dst = str(tmp_path / "broken")
    _broken_copy(src, dst, edit)
    with pytest.raises(CheckpointError) as e:
        q.load_pretrained(dst)
    msg = str(e.value)
    assert "missing tensor: model.layers.1.mlp.up_proj.weight (expected shape (128, 64))" in msg
    assert "unexpected tensor: visual.blocks.0.attn.extra.weight (shape (3,))" in msg
    assert "wrong shape: visual.merger.mlp.0.bias: expected (128,), got (7,)" in msg


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
def test_each_error_alone(kind, tied, tmp_path):
    _, src = tied
    name = "model.layers.0.self_attn.k_proj.bias"

    def edit(sd):
        if kind == "missing":
            del sd[name]
        elif kind == "extra":
            sd["model.layers.9.self_attn.k_proj.bias"] = sd[name].clone()
        else:
            sd[name] = torch.zeros(5)

    dst = str(tmp_path / kind)
    _broken_copy(src, dst, edit)
    with pytest.raises(CheckpointError, match={"missing": "missing tensor: " + name,
                                                "extra": "unexpected tensor: model.layers.9",
                                                "shape": f"wrong shape: {name}: expected \\(32,\\), got \\(5,\\)"}[kind]):
        q.load_pretrained(dst)


def test_mesh_loading_shardings_and_sharded_forward(tied, highest_precision):
    """2x2x2 mesh: every param carries the NamedSharding its logical axes give; sharded forward == unsharded."""
    _, src = tied
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, sharded = q.load_pretrained(src, mesh=mesh)
    _, plain = q.load_pretrained(src)
    want = parallel.logical_shardings(q.param_logical_axes(cfg), mesh, parallel.DEFAULT_RULES,
                                      shapes=q.param_shapes(cfg))
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), sharded, want)
    up = sharded["layers"]["mlp"]["up_proj"]["kernel"]            # [layers, embed, mlp] -> (None, fsdp, tensor)
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape == (2, 32, 64)
    ids, pv, grid = _inputs()
    ids = np.concatenate([ids] * 4)                               # batch divisible by data*fsdp
    pv4, grid4 = np.concatenate([pv] * 4), np.concatenate([grid] * 4)
    a = q.forward(cfg, sharded, ids, None, pv4, grid4)
    b = q.forward(cfg, plain, ids, None, pv4, grid4)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
