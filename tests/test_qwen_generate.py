"""Qwen2.5-VL generation: greedy parity with transformers, log-prob identity with a forward recompute, sampling,
EOS/padding, and cache-length buckets (fp32, highest matmul precision)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from edit_r1_jax.models import qwen2_5_vl as q
from edit_r1_jax.models.qwen2_5_vl import testing as T

N_NEW = 40
gen_lib = importlib.import_module("edit_r1_jax.models.qwen2_5_vl.generate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = T.tiny_torch_model(tie=False, seed=0)
    d = str(tmp_path_factory.mktemp("qwen_gen"))
    model.save_pretrained(d)
    cfg, params = q.load_pretrained(d)
    grid = np.array([[1, 4, 6], [1, 6, 4]])
    pv = T.pixel_values_for(grid, seed=7)
    rows = [[1, 5] + T.image_tokens(grid[0]) + [7, 3], [1] + T.image_tokens(grid[1]) + [6, 20, 21, 22, 23]]
    return model, cfg, params, grid, pv, rows


def pad_rows(rows, side):
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def recompute(cfg, params, ids, mask, pv, grid, toks, temperature=1.0):
    """Log-probs of the generated tokens via token_logprobs on [prompt, generated]."""
    full = np.concatenate([ids, toks], axis=1)
    fmask = np.concatenate([mask, np.ones_like(toks)], axis=1)
    lp = np.asarray(q.token_logprobs(cfg, params, full, fmask, pv, grid, temperature=temperature))
    return lp[:, ids.shape[1] - 1:]


@pytest.mark.slow
def test_greedy_matches_transformers_and_logprobs_match_forward(setup, highest_precision):
    model, cfg, params, grid, pv, rows = setup
    ids, mask = pad_rows(rows, "left")            # transformers' batched generation wants left padding
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                             mm_token_type_ids=torch.tensor(T.mm_token_type_ids(ids)), max_new_tokens=N_NEW,
                             do_sample=False, pad_token_id=0)
    ref = out[:, ids.shape[1]:].numpy()
    assert ref.shape == (2, N_NEW)                # no early EOS in the reference
    toks, lps = q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=N_NEW)
    toks, lps = np.asarray(toks), np.asarray(lps)
    assert lps.dtype == np.float32
    np.testing.assert_array_equal(toks, ref)
    np.testing.assert_allclose(lps, recompute(cfg, params, ids, mask, pv, grid, toks), atol=1e-5, rtol=0)
    np.testing.assert_allclose(lps, q.completion_logprobs(cfg, params, ids, mask, toks, None, pv, grid), atol=1e-5,
                               rtol=0)
    # right-padded prompts give the same continuation (same compiled program: the prompt bucket is identical)
    ids_r, mask_r = pad_rows(rows, "right")
    toks_r, lps_r = q.generate(cfg, params, ids_r, mask_r, pv, grid, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(np.asarray(toks_r), toks)
    np.testing.assert_allclose(np.asarray(lps_r), lps, atol=1e-5)


@pytest.mark.slow
def test_sampling_logprobs_match_forward_and_key_determinism(setup, highest_precision):
    _, cfg, params, grid, pv, rows = setup
    ids, mask = pad_rows(rows, "left")
    kw = dict(max_new_tokens=N_NEW, temperature=0.8, top_k=40, top_p=0.95, eos_token_id=[])
    t1, l1 = q.generate(cfg, params, ids, mask, pv, grid, rng=jax.random.key(1), **kw)
    t2, _ = q.generate(cfg, params, ids, mask, pv, grid, rng=jax.random.key(1), **kw)
    t3, _ = q.generate(cfg, params, ids, mask, pv, grid, rng=jax.random.key(2), **kw)
    t1, l1 = np.asarray(t1), np.asarray(l1)
    np.testing.assert_array_equal(t1, np.asarray(t2))
    assert not np.array_equal(t1, np.asarray(t3))
    np.testing.assert_allclose(l1, recompute(cfg, params, ids, mask, pv, grid, t1, temperature=0.8),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="PRNG key"):
        q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=4, temperature=0.8)


def test_eos_stops_row_and_pads(setup):
    _, cfg, params, grid, pv, rows = setup
    ids, mask = pad_rows([[1, 5, 6, 7, 30], [1, 40, 41]], "left")
    toks, lps = q.generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=[])
    toks, lps = np.asarray(toks), np.asarray(lps)
    eos = int(toks[0, 3])
    first = int(np.argmax(toks[0] == eos))
    t2, l2 = q.generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    t2, l2 = np.asarray(t2), np.asarray(l2)
    np.testing.assert_array_equal(t2[0, :first + 1], toks[0, :first + 1])
    assert (t2[0, first + 1:] == 0).all() and (l2[0, first + 1:] == 0).all()
    row1_eos = np.flatnonzero(toks[1] == eos)
    stop1 = row1_eos[0] + 1 if len(row1_eos) else 12
    np.testing.assert_array_equal(t2[1, :stop1], toks[1, :stop1])


def test_prompt_length_buckets_do_not_recompile(setup):
    _, cfg, params, *_ = setup
    ids, mask = pad_rows([[1, 5, 6, 7, 30], [1, 40, 41]], "left")
    q.generate(cfg, params, ids, mask, max_new_tokens=12)
    n = gen_lib._generate_jit._cache_size()
    for rows in ([[1, 5, 6], [1, 40, 41, 42, 43, 44, 45, 46]], [[1] * 30, [3]]):
        ids, mask = pad_rows(rows, "right")
        q.generate(cfg, params, ids, mask, max_new_tokens=12)
    assert gen_lib._generate_jit._cache_size() == n


@pytest.mark.parametrize("tie", [False, True])
def test_decode_weight_layouts_agree(tmp_path, tie, highest_precision):
    """The CPU decode step's output-major weights ("out_in": kernels transposed, weight as the dot's left operand)
    and its native-kernel panels ("panel": `native.panel_matmul`) give the tokens and log-probs of the Flax-layout
    step ("in_out"), for an untied LM head and a tied one."""
    from edit_r1_jax.native import panel_matmul
    model = T.tiny_torch_model(tie=tie, seed=3)
    model.save_pretrained(str(tmp_path))
    cfg, params = q.load_pretrained(str(tmp_path))
    grid = np.array([[1, 4, 6]])
    pv = T.pixel_values_for(grid, seed=1)
    ids, mask = pad_rows([[1, 5] + T.image_tokens(grid[0]) + [7, 3], [1, 9, 8, 7]], "left")
    layouts = ("in_out", "out_in", "panel")
    outs = {lay: q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=16, eos_token_id=[],
                            decode_layout=lay) for lay in layouts}
    for lay in ("out_in", "panel"):
        np.testing.assert_array_equal(np.asarray(outs[lay][0]), np.asarray(outs["in_out"][0]))
        np.testing.assert_allclose(np.asarray(outs[lay][1]), np.asarray(outs["in_out"][1]), atol=1e-6, rtol=0)
    # tests run on CPU: "auto" takes the native kernel where it is built and the CPU has AVX-512
    assert gen_lib.resolve_decode_layout("auto", params) == ("panel" if panel_matmul.preferred() else "out_in")
    assert gen_lib.resolve_decode_layout("auto", jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)) == "out_in"
    with pytest.raises(ValueError, match="decode_layout"):
        q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=2, decode_layout="rows")
    # weights prepared once and held by the caller give the same tokens and log-probs, in every layout
    held_weights = {}
    for lay in layouts:
        dw = held_weights[lay] = q.prepare_decode(cfg, params, lay)
        assert dw.layout == lay and len(dw.layers) == cfg.text.num_hidden_layers
        held = q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=16, eos_token_id=[], decode_weights=dw)
        np.testing.assert_array_equal(np.asarray(held[0]), np.asarray(outs[lay][0]))
        np.testing.assert_allclose(np.asarray(held[1]), np.asarray(outs[lay][1]), atol=1e-6, rtol=0)
    head_p = held_weights["panel"].head_vd
    assert head_p.vocab == cfg.text.vocab_size
    assert head_p.kernel_p.shape == (-(-cfg.text.vocab_size // 32), cfg.text.hidden_size, 32)
    dw = held_weights["out_in"]
    assert dw.head_vd.shape == (cfg.text.vocab_size, cfg.text.hidden_size)
    with pytest.raises(ValueError, match="prepared for 'out_in'"):
        q.generate(cfg, params, ids, mask, max_new_tokens=2, decode_layout="in_out", decode_weights=dw)
    with pytest.raises(ValueError, match="hold 1 layers"):
        q.generate(cfg, params, ids, mask, max_new_tokens=2, decode_weights=dw.replace(layers=dw.layers[:1]))


@pytest.mark.parametrize("tokens", [3, 40])
def test_dense_out_in_equals_dense(tokens):
    """common.DenseOutIn on kernel_t == nn.DenseGeneral on the kernel, for q_proj-like ([D] -> [H, hd], bias) and
    o_proj-like ([H, hd] -> [D], axis=(-2, -1)) projections (text.to_out_in does the transposes), in both of its
    forms: 6 rows (the weight as the dot's left operand) and 80 rows (x on the left, the prefill's GEMM)."""
    import jax.numpy as jnp
    from edit_r1_jax.models.qwen2_5_vl import common, text
    assert (2 * tokens > common.OUT_IN_MAX_LEFT_WEIGHT_ROWS) == (tokens == 40)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, tokens, 8)), jnp.float32)
    xh = jnp.asarray(rng.standard_normal((2, tokens, 4, 5)), jnp.float32)
    tree = {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((8, 4, 5)), jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)},
            "o_proj": {"kernel": jnp.asarray(rng.standard_normal((4, 5, 8)), jnp.float32)}}
    tree_t = text.to_out_in(tree)
    assert tree_t["q_proj"]["kernel_t"].shape == (4, 5, 8) and tree_t["o_proj"]["kernel_t"].shape == (8, 4, 5)
    with jax.default_matmul_precision("highest"):
        for name, inp, kw in (("q_proj", x, dict(features=(4, 5), use_bias=True)),
                              ("o_proj", xh, dict(features=8, axis=(-2, -1), use_bias=False))):
            want = common.dense(kw["features"], (None,) * 3, use_bias=kw["use_bias"], name=name,
                                axis=kw.get("axis", -1)).apply({"params": tree[name]}, inp)
            got = common.DenseOutIn(**kw, name=name).apply({"params": tree_t[name]}, inp)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [3, 40])
def test_fused_decode_layer_equals_flax_layer(setup, tokens, highest_precision):
    """A decoder layer on `to_out_in` + `fuse_projections` weights (q/k/v and gate/up read as one product each, the
    CPU decode step's form) equals the Flax-layout layer, at 3 tokens (the weight as the dot's left operand) and 40
    (x on the left, the prefill's GEMM); the fused kernels hold the separate ones in order. The same for those
    weights packed in panels (`to_panels`, the native kernel)."""
    import jax.numpy as jnp
    from edit_r1_jax.models.qwen2_5_vl import text
    _, cfg, params, *_ = setup
    t = cfg.text
    layer = text.unstack_layers(params["layers"], t.num_hidden_layers)[1]
    fused = text.fuse_projections(text.to_out_in(layer))
    sep = text.to_out_in(layer)
    qkv = np.asarray(fused["self_attn"]["qkv_proj"]["kernel_t"])
    nkv, rep = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads
    assert qkv.shape == (nkv, rep + 2, t.head_dim, t.hidden_size)       # per KV group: its query heads, k, v
    np.testing.assert_array_equal(qkv[:, :rep].reshape((-1,) + qkv.shape[2:]),
                                  np.asarray(sep["self_attn"]["q_proj"]["kernel_t"]))
    np.testing.assert_array_equal(qkv[:, rep], np.asarray(sep["self_attn"]["k_proj"]["kernel_t"]))
    np.testing.assert_array_equal(np.asarray(fused["self_attn"]["qkv_proj"]["bias"][:, rep + 1]),
                                  np.asarray(sep["self_attn"]["v_proj"]["bias"]))
    np.testing.assert_array_equal(np.asarray(fused["mlp"]["gate_up_proj"]["kernel_t"][:, 1]),
                                  np.asarray(sep["mlp"]["up_proj"]["kernel_t"]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, tokens, t.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(tokens)[None, None], (3, 2, tokens))
    cos, sin = text.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section, jnp.float32)
    outs = {}
    for lay, p in (("in_out", layer), ("out_in", fused), ("panel", text.to_panels(fused))):
        mod = text.DecoderLayer(t, "xla", False, "bshd", lay)
        outs[lay] = np.asarray(mod.apply({"params": p}, x, None, cos, sin, None, None, None)[0])
    np.testing.assert_allclose(outs["out_in"], outs["in_out"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs["panel"], outs["in_out"], atol=1e-5, rtol=0)


def test_greedy_select_on_vocab_major_logits():
    """Greedy selection on [vocab, B] logits (the CPU decode step's head output, `step_logits`) picks the token
    argmax picks on [B, vocab] (ties -> the lowest id) with the same log-prob; sampling refuses that layout."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[1, [17, 40, 250]] = 9.0                                   # a three-way tie at the max
    logits[3, [0, 299]] = 7.5
    key = jax.random.key(0)
    tok_bv, lp_bv = gen_lib._select(jnp.asarray(logits), key, 0.0, None, None)
    tok_vb, lp_vb = gen_lib._select(jnp.asarray(logits.T), key, 0.0, None, None, vocab_axis=0)
    np.testing.assert_array_equal(np.asarray(tok_vb), np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(tok_vb), np.asarray(tok_bv))
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))[np.arange(5), np.argmax(logits, axis=-1)]
    np.testing.assert_allclose(np.asarray(lp_vb), want, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(lp_bv), want, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="sampling"):
        gen_lib._select(jnp.asarray(logits.T), key, 1.0, None, None, vocab_axis=0)


def test_rotary_table_equals_per_step_rotary(setup):
    """The decode loop's (cos, sin) table, made once before it (`rotary_table`), holds at step i what the step would
    compute from its M-RoPE position ids next_pos + i (all three axes equal for generated text)."""
    import jax.numpy as jnp
    from edit_r1_jax.models.qwen2_5_vl import text
    _, cfg, *_ = setup
    t = cfg.text
    next_pos = jnp.asarray([7, 30], jnp.int32)
    table = gen_lib.rotary_table(cfg, next_pos, 12, jnp.float32)
    assert table[0].shape == (2, 12, t.head_dim)
    for i in (0, 5, 11):
        pos = jnp.broadcast_to((next_pos + i)[None, :, None], (3, 2, 1))
        want = text.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section, jnp.float32)
        got = gen_lib.rotary_at(table, jnp.int32(i))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _compiled_generate_hlo(setup, monkeypatch, layout: str) -> str:
    """The compiled HLO text of a 2-token `generate` on held decode weights of ``layout``."""
    _, cfg, params, grid, pv, rows = setup
    ids, mask = pad_rows(rows, "left")
    hlo = {}
    real = gen_lib._generate_jit

    def spy(*args, **kw):
        hlo["text"] = real.lower(*args, **kw).compile().as_text()
        return real(*args, **kw)
    monkeypatch.setattr(gen_lib, "_generate_jit", spy)
    q.generate(cfg, params, ids, mask, pv, grid, max_new_tokens=2, decode_weights=q.prepare_decode(cfg, params, layout))
    return hlo["text"]


def test_cpu_decode_step_reads_weights_as_left_operand(setup, monkeypatch):
    """Guard for the CPU decode speed (bench/qwen_decode.py): in the compiled decode loop every projection's dot has
    the weight as its left operand, i.e. yields [out, rows]. XLA rewrites some equivalent forms back into the
    x-left product (``x @ W^T``, about half the weight-read rate for a decode step's few rows), silently."""
    import re
    _, cfg, params, grid, pv, rows = setup
    hlo = {"text": _compiled_generate_hlo(setup, monkeypatch, "out_in")}
    t = cfg.text
    # q/k/v and gate/up are read as one product each (text.fuse_projections)
    out_features = {"qkv_proj": (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim,
                    "o_proj": t.hidden_size, "gate_up_proj": 2 * t.intermediate_size, "down_proj": t.hidden_size}
    found = []
    for m in re.finditer(r"= f32\[([\d,]+)\]\S* fusion\([^\n]*op_name=\"[^\"]*while/body/Qwen25VL.decode_step[^\"]*/(\w+_proj)/dot_general",
                         hlo["text"]):
        dims, name = [int(d) for d in m.group(1).split(",")], m.group(2)
        found.append(name)
        assert dims[0] == out_features[name] and dims[1] == len(rows), (name, dims)
    assert sorted(set(found)) == sorted(out_features) and len(found) == 4 * t.num_hidden_layers


def test_panel_decode_step_runs_native_kernel(setup, monkeypatch):
    """Decode layout "panel": in the compiled decode loop every projection (4 per layer after fusion) and the LM head
    is the native kernel's custom call with the step's rows, and no projection is left to an XLA dot."""
    import re
    _, cfg, params, grid, pv, rows = setup
    hlo = {"text": _compiled_generate_hlo(setup, monkeypatch, "panel")}
    body = [ln for ln in hlo["text"].splitlines()                # the decode loop (not the vision tower's scan)
            if "/while/body/Qwen25VL." in ln and "encode_images" not in ln]
    calls = [ln for ln in body if 'custom_call_target="edit_r1_panel_matmul"' in ln]
    assert len(calls) == 4 * cfg.text.num_hidden_layers + 1
    for ln in calls:
        assert re.search(rf"= f32\[{len(rows)},\d+\]", ln), ln
    assert not [ln for ln in body if re.search(r"_proj/dot_general", ln)]


@pytest.mark.parametrize("held", [False, True])
def test_shared_prefix_equals_generate_on_concatenated_prompts(setup, held, highest_precision):
    """prefix.generate_shared_prefix (one prefilled prefix with an image, two suffix rows) == generate on the
    concatenated prompts, with the decode weights made per call and held by the caller."""
    from edit_r1_jax.models.qwen2_5_vl.prefix import generate_shared_prefix
    _, cfg, params, grid, pv, _ = setup
    g0 = grid[:1]
    pv0 = pv[: int(np.prod(g0[0]))]
    prefix = [1, 5] + T.image_tokens(g0[0]) + [7]
    suffixes = [[3, 9], [6, 20, 21]]
    dw = q.prepare_decode(cfg, params) if held else None
    toks, lps = generate_shared_prefix(cfg, params, np.array([prefix]), None, pv0, g0, [0, 0],
                                       *pad_rows(suffixes, "right"), max_new_tokens=8, eos_token_id=[],
                                       decode_weights=dw)
    ids, mask = pad_rows([prefix + s for s in suffixes], "left")
    want_t, want_lp = q.generate(cfg, params, ids, mask, np.concatenate([pv0, pv0]), np.concatenate([g0, g0]),
                                 max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(want_t))
    np.testing.assert_allclose(np.asarray(lps), np.asarray(want_lp), atol=1e-5, rtol=0)
