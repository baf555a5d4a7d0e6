"""Per-module Qwen2.5-VL parity with weights copied from torch (tiny config, fp32, highest precision, 1e-5)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from edit_r1_jax.models import qwen2_5_vl as q
from edit_r1_jax.models.qwen2_5_vl import rope_index, testing as T, text, vision, vision_meta
from edit_r1_jax.models.qwen2_5_vl.model import Qwen25VL

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = T.tiny_torch_model(tie=False, seed=3)
    d = str(tmp_path_factory.mktemp("qwen_mod"))
    model.save_pretrained(d)
    cfg, params = q.load_pretrained(d)
    return model, cfg, params


def close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref.detach().numpy() if torch.is_tensor(ref) else ref,
                                                          np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= tol, f"relative error {err:.3e} > {tol}"


def layer(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


GRID = np.array([[1, 10, 14], [1, 4, 6]])


def test_window_index_positions_and_seqlens_match_transformers(tiny):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    _, cfg, _ = tiny
    v = cfg.vision
    widx, cu = vision_meta.window_index(GRID[:1], 2, v.window_size, v.patch_size)
    assert cu.tolist() == [0, 16, 32, 48, 56, 72, 88, 104, 112, 120, 128, 136, 140]   # models.md §1.8
    ref_idx, ref_cu = get_vision_window_index(torch.tensor(GRID), 2, v.window_size, v.patch_size)
    widx, cu = vision_meta.window_index(GRID, 2, v.window_size, v.patch_size)
    np.testing.assert_array_equal(widx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    np.testing.assert_array_equal(vision_meta.position_ids(GRID, 2), get_vision_position_ids(torch.tensor(GRID), 2))


def test_patch_embed_and_vision_rotary(tiny, highest_precision):
    model, cfg, params = tiny
    from transformers.vision_utils import get_vision_position_ids
    vis = model.model.visual
    pv = T.pixel_values_for(GRID, seed=4)
    with torch.no_grad():
        ref = vis.patch_embed(torch.tensor(pv))
        pos = get_vision_position_ids(torch.tensor(GRID), 2)
        cos_ref, sin_ref = vis.rotary_pos_emb(ref, pos)
    close(jnp.asarray(pv) @ params["visual"]["patch_embed"]["kernel"], ref)
    cos, sin = vision.vision_rotary(jnp.asarray(pos.numpy()), cfg.vision.head_dim, cfg.vision.rope_theta)
    close(cos, cos_ref)
    close(sin, sin_ref)


def _block_inputs(model, cfg, seed):
    from transformers.vision_utils import get_vision_position_ids
    vis = model.model.visual
    meta = vision_meta.vision_meta(GRID, cfg.vision)
    n = meta.num_patches
    x = torch.tensor(np.random.default_rng(seed).standard_normal((n, cfg.vision.hidden_size)).astype(np.float32))
    with torch.no_grad():
        cos, sin = vis.rotary_pos_emb(x, get_vision_position_ids(torch.tensor(GRID), 2))
        cos, sin = (vis.permute_input_for_window_attn(f, torch.tensor(meta.window_index).long(), n) for f in (cos, sin))
    return x, (cos, sin), meta


@pytest.mark.parametrize("block_idx", [0, 1])   # 0 = windowed, 1 = full attention (fullatt_block_indexes=[1])
def test_vision_block(tiny, block_idx, highest_precision):
    model, cfg, params = tiny
    x, (cos, sin), meta = _block_inputs(model, cfg, seed=block_idx)
    is_full = block_idx in cfg.vision.fullatt_block_indexes
    cu = torch.tensor(meta.cu_seqlens if is_full else meta.cu_window_seqlens, dtype=torch.int32)
    with torch.no_grad():
        ref = model.model.visual.blocks[block_idx](x, cu_seqlens=cu, position_embeddings=(cos, sin))
    m = vision.meta_arrays(meta)
    run = jax.jit(lambda p, x_, c, s: vision.VisionBlock(cfg.vision).apply({"params": p}, x_, is_full, c, s,
                                                                           m["win"], m["full"]))
    out, _ = run(layer(params["visual"]["blocks"], block_idx), jnp.asarray(x.numpy()), jnp.asarray(cos.numpy()),
                 jnp.asarray(sin.numpy()))
    close(out, ref)


def test_merger(tiny, highest_precision):
    model, cfg, params = tiny
    x = torch.randn(96, cfg.vision.hidden_size)
    with torch.no_grad():
        ref = model.model.visual.merger(x)
    run = jax.jit(lambda p, x_: vision.PatchMerger(cfg.vision).apply({"params": p}, x_))
    close(run(params["visual"]["merger"], jnp.asarray(x.numpy())), ref)


def test_vision_tower_and_no_cross_image_leakage(tiny, highest_precision):
    model, cfg, params = tiny
    pv = T.pixel_values_for(GRID, seed=5)
    with torch.no_grad():
        ref = model.model.visual(torch.tensor(pv), grid_thw=torch.tensor(GRID)).pooler_output
    tower = vision.VisionTower(cfg.vision)
    run = jax.jit(lambda p, x: tower.apply({"params": p}, x, vision.meta_arrays(vision_meta.vision_meta(GRID, cfg.vision))))
    feats = run(params["visual"], jnp.asarray(pv))
    close(feats, ref)
    n0, m0 = int(np.prod(GRID[0])), int(np.prod(GRID[0])) // 4
    pv2 = pv.copy()
    pv2[n0:] += 1.0                                     # change only the second image
    feats2 = run(params["visual"], jnp.asarray(pv2))
    np.testing.assert_array_equal(np.asarray(feats2[:m0]), np.asarray(feats[:m0]))
    assert not np.allclose(np.asarray(feats2[m0:]), np.asarray(feats[m0:]))


def _layouts():
    """(rows, grids per row, padding side) covering text-only, one/two images, images in several rows, padding."""
    g1, g2, g3 = [1, 4, 6], [1, 6, 4], [1, 10, 14]
    it = lambda g: T.image_tokens(g)
    return [
        ([[1, 5, 6, 7]], [], "none"),
        ([[1, 2] + it(g3) + [3, 4, 5]], [g3], "none"),
        ([[1] + it(g1) + [2] + it(g2) + [3, 4]], [g1, g2], "none"),
        ([[1, 5] + it(g1) + [7, 3], [1] + it(g2) + [6] + it(g1) + [4]], [g1, g2, g1], "left"),
        ([[1, 5] + it(g1) + [7, 3], [1, 9, 9, 9, 9, 9], [7] + it(g2)], [g1, g2], "right"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mrope_position_ids_match_get_rope_index(tiny, case):
    model, cfg, _ = tiny
    rows, grids, side = _layouts()[case]
    t = max(map(len, rows)) + (2 if side != "none" else 0)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    grid = np.array(grids).reshape(-1, 3)
    with torch.no_grad():
        ref_pos, ref_delta = model.model.get_rope_index(
            torch.tensor(ids), torch.tensor(T.mm_token_type_ids(ids)), torch.tensor(grid) if len(grid) else None,
            attention_mask=torch.tensor(mask))
    run = jax.jit(lambda i, m: rope_index.get_rope_index(i, m, grid if len(grid) else None, cfg.image_token_id, 2))
    pos, delta = run(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())


def test_mrope_cos_sin_and_decoder_layer(tiny, highest_precision):
    model, cfg, params = tiny
    lm = model.model.language_model
    grid = np.array([[1, 4, 6]])
    ids = np.array([[1, 5] + T.image_tokens(grid[0]) + [7, 3]])
    pos, _ = jax.jit(lambda i: rope_index.get_rope_index(i, None, grid, cfg.image_token_id, 2))(jnp.asarray(ids))
    t_len = ids.shape[1]
    x = torch.randn(1, t_len, cfg.text.hidden_size)
    with torch.no_grad():
        cos_ref, sin_ref = lm.rotary_emb(x, torch.tensor(np.asarray(pos)).long())
        causal = torch.full((t_len, t_len), torch.finfo(torch.float32).min).triu(1)[None, None]
        ref = lm.layers[1](x, attention_mask=causal, position_embeddings=(cos_ref, sin_ref))
    t = cfg.text
    cos, sin = jax.jit(lambda p: text.mrope_cos_sin(p, t.head_dim, t.rope_theta, t.mrope_section, jnp.float32))(pos)
    close(cos, cos_ref)
    close(sin, sin_ref)
    run = jax.jit(lambda p, x_: text.DecoderLayer(t).apply({"params": p}, x_, None, cos, sin, None, None, None))
    out, _ = run(layer(params["layers"], 1), jnp.asarray(x.numpy()))
    close(out, ref)


def _expected_count(tc, vc, vocab, tie):
    """Parameter count from the tensor shapes of models.md §1.6 (torch layout)."""
    d, f, h, kv, hd = tc["hidden"], tc["inter"], tc["heads"], tc["kv"], tc["hidden"] // tc["heads"]
    dv, fv = vc["hidden"], vc["inter"]
    vision_block = 2 * dv + (3 * dv * dv + 3 * dv) + (dv * dv + dv) + 2 * (fv * dv + fv) + (dv * fv + dv)
    vis = dv * 3 * 2 * 14 * 14 + vc["depth"] * vision_block + dv + (4 * dv) ** 2 + 4 * dv + d * 4 * dv + d
    layer_ = (d * h * hd + h * hd) + 2 * (d * kv * hd + kv * hd) + h * hd * d + 3 * d * f + 2 * d
    return vis + vocab * d + tc["layers"] * layer_ + d + (0 if tie else vocab * d)


@pytest.mark.parametrize("preset,tie,vocab,tc,approx", [
    ("qwen2_5_vl_3b", True, 151936, dict(hidden=2048, inter=11008, heads=16, kv=2, layers=36), 3.75e9),
    ("qwen2_5_vl_7b", False, 152064, dict(hidden=3584, inter=18944, heads=28, kv=4, layers=28), 8.29e9),
])
def test_preset_parameter_counts(preset, tie, vocab, tc, approx):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{preset}.py")
    spec = importlib.util.spec_from_file_location(preset, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.model_config()
    assert cfg.tie_word_embeddings == tie
    n = q.num_params(cfg)              # jax.eval_shape of init: nothing allocated
    want = _expected_count(tc, dict(hidden=1280, inter=3420, depth=32), vocab, tie)
    assert n == want
    assert abs(n - approx) / approx < 0.01
    assert mod.get_config().model.hf_config["tie_word_embeddings"] == tie
