"""Shared-prefix generation: many continuations of a few prompt prefixes, each prefix prefilled once.

Editing-GRPO groups score G edits of one (source image, instruction): the reward prompt is identical up to the
edited image, so its prefix (system turn, source image, ...) is encoded once per group and its KV cache is copied
to the G rows instead of being recomputed G times (vision tower included). The result equals ``generate`` on the
concatenated prompts (``prefix + suffix`` per row), up to float summation order.

Layout (all slots of one row, ``Tp = round_up(prefix length, bucket)``, ``Ts`` likewise)::

    cache slot:  [0, Tp)            [Tp, Tp + Ts)          Tp + Ts + i
                 prefix of group g   this row's suffix      generated token i

Both parts may be padded on either side (any 0/1 mask); padding slots are masked out of attention
(``kv_segment_ids = 0``). M-RoPE positions are those of the concatenated prompt: ``get_rope_index`` is causal
(a token's position depends only on the valid tokens before it) and translation-invariant, so the prefix gets its
own positions and the suffix its own positions shifted by ``max(prefix positions) + 1`` of its group. Decoding
continues at ``max(all prompt positions) + 1 + i`` (transformers' ``rope_deltas`` rule), as in ``generate``.

Log-probs and sampling are exactly as in ``generate`` (``generate._select``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.qwen2_5_vl import rope_index as rope_lib
from edit_r1_jax.models.qwen2_5_vl import text as text_lib
from edit_r1_jax.models.qwen2_5_vl.common import sharding_context
from edit_r1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from edit_r1_jax.models.qwen2_5_vl.generate import (DecodeWeights, _select, checked_decode_layout,
                                                     rotary_at, rotary_table, round_up, step_logits,
                                                     step_vocab_axis, step_weights)
from edit_r1_jax.models.qwen2_5_vl.model import Qwen25VL, _check_image_tokens, _grid_key, embed_inputs, sharding_of


def _body(params, prepared, pre_ids_pt, pre_mask_pt, pre_pv, gidx_b, suf_ids_bt, suf_mask_bt, suf_pv, rng, eos_arr,
          pad, *, cfg, pre_grid, suf_grid, max_new, cache_len, temperature, top_k, top_p, decode_layout):
    p, tp = pre_ids_pt.shape
    b, ts = suf_ids_bt.shape
    t = cfg.text
    m = cfg.vision.spatial_merge_size
    module = Qwen25VL(cfg)
    dtype = params["embed_tokens"]["embedding"].dtype

    # M-RoPE positions of the concatenated prompt, from the two parts.
    pre_pos_3pt, pre_delta_p1 = rope_lib.get_rope_index(pre_ids_pt, pre_mask_pt, pre_grid, cfg.image_token_id, m)
    pre_next_p = jnp.sum(pre_mask_pt, axis=1) + pre_delta_p1[:, 0]            # max(prefix positions) + 1
    suf_pos_3bt, suf_delta_b1 = rope_lib.get_rope_index(suf_ids_bt, suf_mask_bt, suf_grid, cfg.image_token_id, m)
    off_b = pre_next_p[gidx_b]
    suf_pos_3bt = jnp.where(suf_mask_bt[None] > 0, suf_pos_3bt + off_b[None, :, None], 0)
    next_pos_b = off_b + jnp.sum(suf_mask_bt, axis=1) + suf_delta_b1[:, 0]    # max(all prompt positions) + 1

    kv_seg_bs = jnp.concatenate([pre_mask_pt[gidx_b], suf_mask_bt, jnp.ones((b, cache_len - tp - ts), jnp.int32)],
                                axis=1)
    pre_cache = (jnp.zeros((t.num_hidden_layers, p, tp, t.num_key_value_heads, t.head_dim), dtype),) * 2
    last_b = jnp.max(jnp.where(suf_mask_bt > 0, jnp.arange(ts)[None], -1), axis=1)

    def prefill_prefix(mdl):
        x_ptd, _ = embed_inputs(mdl, cfg, pre_ids_pt, pre_pv, pre_grid)
        _, cache, _ = mdl.decode(x_ptd, pre_pos_3pt, pre_mask_pt, pre_cache, 0, pre_mask_pt)
        return cache

    def prefill_suffix(mdl, cache):
        x_btd, _ = embed_inputs(mdl, cfg, suf_ids_bt, suf_pv, suf_grid)
        h_btd, cache, _ = mdl.decode(x_btd, suf_pos_3bt, suf_mask_bt, cache, tp, kv_seg_bs)
        h_last = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)      # [B, 1, D]
        return mdl.logits(h_last)[:, 0], cache

    layer_params, head_vd = step_weights(cfg, params, prepared, decode_layout)

    rotary = rotary_table(cfg, next_pos_b, max_new, dtype)
    vocab_axis = step_vocab_axis(head_vd, temperature)

    def step(mdl, tok_b, i, caches):
        x = mdl.embed(tok_b[:, None])
        h, caches = mdl.decode_step(x, None, jnp.ones((b, 1), jnp.int32), caches, tp + ts + i, kv_seg_bs,
                                    layer_params, decode_layout, rotary=rotary_at(rotary, i))
        return step_logits(mdl, h, head_vd, vocab_axis), caches

    variables = {"params": params}
    cache_p = nn.apply(prefill_prefix, module)(variables)                        # 2 x [L, P, Tp, Hkv, hd]
    # copy each group's prefix cache to its rows, with room for the suffix and the generated tokens
    cache_b = tuple(jnp.pad(c[:, gidx_b], ((0, 0), (0, 0), (0, cache_len - tp), (0, 0), (0, 0))) for c in cache_p)
    logits0, cache_b = nn.apply(prefill_suffix, module)(variables, cache_b)
    cache_b = text_lib.stack_cache_to_step(cache_b)                     # per layer K [B, Hkv, hd, S], V [B, Hkv, S, hd]
    rng, sub = jax.random.split(rng)
    tok0, lp0 = _select(logits0, sub, temperature, top_k, top_p)
    tokens = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok0)
    logps = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp0)
    done = jnp.isin(tok0, eos_arr)

    def cond(state):
        i, _, done_, *_ = state
        return (i < max_new - 1) & ~jnp.all(done_)

    def body(state):
        i, tok, done_, tokens_, logps_, cache_, key = state
        logits, cache_ = nn.apply(step, module)(variables, tok, i, cache_)
        key, sub_ = jax.random.split(key)
        new_tok, new_lp = _select(logits, sub_, temperature, top_k, top_p, vocab_axis)
        new_tok = jnp.where(done_, pad, new_tok)
        new_lp = jnp.where(done_, 0.0, new_lp)
        tokens_ = jax.lax.dynamic_update_slice(tokens_, new_tok[:, None], (0, i + 1))
        logps_ = jax.lax.dynamic_update_slice(logps_, new_lp[:, None], (0, i + 1))
        return i + 1, new_tok, done_ | jnp.isin(new_tok, eos_arr), tokens_, logps_, cache_, key

    state = (jnp.int32(0), tok0, done, tokens, logps, cache_b, rng)
    _, _, _, tokens, logps, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, logps


def _impl(*args, sharding=None, **static):
    with sharding_context(*(sharding or (None, ()))):
        return _body(*args, **static)


_jit = jax.jit(_impl, static_argnames=("cfg", "pre_grid", "suf_grid", "max_new", "cache_len", "temperature",
                                       "top_k", "top_p", "decode_layout", "sharding"))


def _part(cfg, params, name, ids, mask, pixel_values, grid, bucket):
    grid = _grid_key(grid)
    if (grid is None) != (pixel_values is None):
        raise ValueError(f"{name}: pixel_values and image_grid_thw must be given together")
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name}_ids must be [rows, T], got shape {ids.shape}")
    _check_image_tokens(cfg, ids, grid)
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"{name}_mask shape {mask.shape} != {name}_ids shape {ids.shape}")
    if pixel_values is not None:
        n = sum(t * h * w for t, h, w in grid)
        if tuple(pixel_values.shape) != (n, cfg.vision.patch_dim):
            raise ValueError(f"{name}_pixel_values shape {tuple(pixel_values.shape)} does not match its "
                             f"image_grid_thw {list(grid)}: expected ({n}, {cfg.vision.patch_dim})")
        pixel_values = jnp.asarray(pixel_values).astype(params["visual"]["patch_embed"]["kernel"].dtype)
    tpad = round_up(ids.shape[1], bucket) - ids.shape[1]
    fill = 0 if cfg.image_token_id != 0 else 1
    ids = np.pad(ids, ((0, 0), (0, tpad)), constant_values=fill).astype(np.int32)
    mask = np.pad(mask, ((0, 0), (0, tpad)))
    return jnp.asarray(ids), jnp.asarray(mask), pixel_values, grid


def generate_shared_prefix(cfg: Qwen25VLConfig, params: dict, prefix_ids, prefix_mask, prefix_pixel_values,
                           prefix_grid_thw, group_index, suffix_ids, suffix_mask=None, suffix_pixel_values=None,
                           suffix_grid_thw=None, max_new_tokens: int = 64, temperature: float = 0.0,
                           top_k: int | None = None, top_p: float | None = None, rng=None, eos_token_id=None, *,
                           pad_token_id: int | None = None, bucket: int = 64,
                           decode_weights: DecodeWeights | None = None):
    """Generate for rows ``prefix[group_index[b]] + suffix[b]`` -> (tokens [B, N] int32, logprobs [B, N] float32).

    prefix_ids/prefix_mask [P, Tp] with packed ``prefix_pixel_values`` / ``prefix_grid_thw`` (the images of the P
    prefixes, row-major); group_index [B] int in [0, P); suffix_ids/suffix_mask [B, Ts] with their images likewise.
    Sampling, EOS and padding of the output as in ``generate``. Shapes are bucketed (multiples of ``bucket``);
    P and B are static, so keep them fixed (pad with unused prefixes / repeated rows) to avoid recompiles.
    ``decode_weights``: `generate.prepare_decode` of ``params``, held across calls (as in ``generate``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    pre_ids, pre_mask, pre_pv, pre_grid = _part(cfg, params, "prefix", prefix_ids, prefix_mask, prefix_pixel_values,
                                                prefix_grid_thw, bucket)
    suf_ids, suf_mask, suf_pv, suf_grid = _part(cfg, params, "suffix", suffix_ids, suffix_mask, suffix_pixel_values,
                                                suffix_grid_thw, bucket)
    gidx = np.asarray(group_index, np.int32).reshape(-1)
    if gidx.shape[0] != suf_ids.shape[0]:
        raise ValueError(f"group_index has {gidx.shape[0]} entries but there are {suf_ids.shape[0]} suffix rows")
    if gidx.size and (gidx.min() < 0 or gidx.max() >= pre_ids.shape[0]):
        raise ValueError(f"group_index values must be in [0, {pre_ids.shape[0]}), got {gidx.min()}..{gidx.max()}")
    if np.any(np.asarray(suf_mask).sum(axis=1) == 0):
        raise ValueError("every suffix row needs at least one valid token (the next token is predicted from it)")
    eos = cfg.eos_token_id if eos_token_id is None else (
        (int(eos_token_id),) if np.isscalar(eos_token_id) else tuple(int(e) for e in eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    tp, ts = pre_ids.shape[1], suf_ids.shape[1]
    cache_len = round_up(tp + ts + max_new_tokens, bucket)
    rng = jax.random.key(0) if rng is None else rng
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    layout = checked_decode_layout(cfg, "auto", decode_weights, params)
    return _jit(params, decode_weights, pre_ids, pre_mask, pre_pv, jnp.asarray(gidx), suf_ids, suf_mask, suf_pv, rng,
                eos_arr, jnp.int32(pad), cfg=cfg, pre_grid=pre_grid, suf_grid=suf_grid, max_new=int(max_new_tokens),
                decode_layout=layout,
                cache_len=cache_len, temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                top_p=None if top_p is None else float(top_p), sharding=sharding_of(params))
