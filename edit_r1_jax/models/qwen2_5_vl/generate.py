"""Generation: one prefill pass filling a KV cache, then a jitted ``lax.while_loop`` of single-token decode steps.

Shapes are bucketed so new prompt lengths do not recompile each time: the prompt is right-padded (mask 0) to a
multiple of ``bucket`` (``Tp``) and the cache holds ``S = round_up(Tp + max_new_tokens, bucket)`` slots. Prompt
rows may be left- or right-padded (any 0/1 ``attention_mask``). Generated token i of every row sits in cache slot
``Tp + i`` with M-RoPE position ``max(prompt positions) + 1 + i`` (transformers' ``rope_deltas`` rule), and attends
to valid prompt slots and earlier generated slots only.

Log-probs: ``log_softmax(logits / temperature)[token]`` in float32 (``temperature = 0`` -> plain
``log_softmax(logits)``), i.e. under the temperature-scaled full distribution, before top-k / top-p filtering;
``token_logprobs(..., temperature=T)`` recomputes exactly this from a forward pass.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.qwen2_5_vl import rope_index as rope_lib
from edit_r1_jax.models.qwen2_5_vl import text as text_lib
from edit_r1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from edit_r1_jax.models.qwen2_5_vl.common import sharding_context
from edit_r1_jax.models.qwen2_5_vl.model import HeadPanels, Qwen25VL, _prep, embed_inputs, sharding_of
from edit_r1_jax.native import panel_matmul


def round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _select(logits_bv, key, temperature, top_k, top_p, vocab_axis: int = -1):
    """-> (token [B] int32, log-prob [B] float32) for one step. ``vocab_axis=0``: logits given [vocab, B]
    (greedy only, `step_logits`)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        # argmax as max + first index at the max, and the chosen token's log-prob as -log(sum(exp(logits - max))):
        # the same token (ties -> lowest id, like argmax) and log_softmax's value, from plain reductions (XLA:CPU's
        # variadic argmax reduce and a full log_softmax cost ~0.2 ms per decode step at vocab 4096)
        axis = vocab_axis % logits_bv.ndim
        max_ = jnp.max(logits_bv, axis=axis, keepdims=True)
        ids = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, axis)
        tok = jnp.min(jnp.where(logits_bv == max_, ids, logits_bv.shape[axis]), axis=axis)
        return tok, -jnp.log(jnp.sum(jnp.exp(logits_bv - max_), axis=axis))
    if vocab_axis % logits_bv.ndim != logits_bv.ndim - 1:
        raise ValueError("_select: sampling takes logits [B, vocab]")
    scaled = logits_bv / temperature
    lp = jax.nn.log_softmax(scaled, axis=-1)
    filt = scaled
    if top_k is not None and top_k > 0:
        kth = jax.lax.top_k(scaled, min(int(top_k), scaled.shape[-1]))[0][:, -1:]
        filt = jnp.where(scaled < kth, -jnp.inf, filt)
    if top_p is not None and top_p < 1.0:
        sorted_desc = -jnp.sort(-filt, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        cum_before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each sorted token
        keep = cum_before < top_p                                 # always keeps the top token
        thresh = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        filt = jnp.where(filt < thresh, -jnp.inf, filt)
    tok = jax.random.categorical(key, filt, axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


DECODE_LAYOUTS = ("auto", "in_out", "out_in", "panel")
HELD_LAYOUTS = ("out_in", "panel")     # layouts whose decode weights are a re-laid-out copy worth holding (CPU)


def resolve_decode_layout(layout: str, params: dict | None = None) -> str:
    """The decode step's weight layout. "auto" on CPU: "panel" (the native kernel `native.panel_matmul`, which
    streams a step's weights once for all its rows; 0.65 of XLA's product time for 8 rows, BENCHMARKS.md session 8)
    where it builds and the CPU has AVX-512, the params are float32 and not sharded over several devices (the custom
    call has no partitioning rule: on a mesh XLA would gather its weights every step); else "out_in" (XLA's library
    GEMM streams an output-major weight given as the left operand about twice as fast as the [in, out] right
    operand for the step's few rows). On GPU/TPU "in_out" (their compilers pick layouts themselves, and a re-laid-out
    copy would double the weights' memory during generation)."""
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"decode_layout={layout!r}: expected one of {DECODE_LAYOUTS}")
    if layout == "panel" and jax.default_backend() != "cpu":
        raise ValueError(f"decode_layout='panel' is the native CPU kernel; the backend here is "
                         f"{jax.default_backend()!r} (use 'auto' or 'in_out')")
    if layout != "auto":
        return layout
    if jax.default_backend() != "cpu":
        return "in_out"
    return "panel" if _panel_fits(params) else "out_in"


def _panel_fits(params: dict | None) -> bool:
    if params is not None:
        if params["embed_tokens"]["embedding"].dtype != jnp.float32:
            return False
        sharding = sharding_of(params)
        if sharding is not None and sharding[0].size > 1:
            return False
    return panel_matmul.preferred()


def decode_weights(cfg: Qwen25VLConfig, params: dict, layout: str) -> tuple[list, jax.Array | HeadPanels | None]:
    """(per-layer decoder params, LM head) for the decode loop; call once, outside it.
    "in_out": the scanned stack's layers unstacked, head None (``params``' own head is used).
    "out_in": kernels transposed by ``text.to_out_in`` (q/k/v and gate/up fused, ``text.fuse_projections``) and the
    head output-major [vocab, D], behind an optimization barrier so that XLA cannot fold the transposes back into
    the loop's dots. "panel": those kernels packed for the native kernel (``text.to_panels``), head `HeadPanels`."""
    layer_params = text_lib.unstack_layers(params["layers"], cfg.text.num_hidden_layers)
    if layout == "in_out":
        return layer_params, None
    head_vd = params["embed_tokens"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"].T
    layers = [text_lib.fuse_projections(text_lib.to_out_in(p)) for p in layer_params]
    if layout == "panel":
        layers = [text_lib.to_panels(p) for p in layers]
        return jax.lax.optimization_barrier((layers, HeadPanels(panel_matmul.pack_panels(head_vd), head_vd.shape[0])))
    return jax.lax.optimization_barrier((layers, head_vd))


@flax.struct.dataclass
class DecodeWeights:
    """The text decoder's weights in the form generation reads them (`prepare_decode`), held by a caller that
    generates many times with the same parameters (a reward model scoring batch after batch) so that ``generate``
    does not re-make them on every call. It is a second copy of the decoder's weights next to ``params``.

    layers: per-layer param trees (torch ``layers.i``), kernels output-major (``kernel_t``) for "out_in", packed in
    panels (``kernel_p``) for "panel";
    head_vd: the LM head, [vocab, D] for "out_in", `HeadPanels` for "panel", None for "in_out" (``params``' own
    head is used);
    layout: "in_out", "out_in" or "panel" (`resolve_decode_layout`)."""
    layers: tuple
    head_vd: jax.Array | HeadPanels | None
    layout: str = flax.struct.field(pytree_node=False)


_decode_weights_jit = jax.jit(decode_weights, static_argnames=("cfg", "layout"))


def prepare_decode(cfg: Qwen25VLConfig, params: dict, decode_layout: str = "auto") -> DecodeWeights:
    """``DecodeWeights`` for ``generate(..., decode_weights=...)``: make once, reuse while ``params`` are unchanged
    (remake after every optimizer step of the model itself). On CPU ("panel", "out_in") this saves the per-call
    re-layout of every projection kernel (20-40 ms per call for the 20 M-parameter benchmark model)."""
    layout = resolve_decode_layout(decode_layout, params)
    with sharding_context(*(sharding_of(params) or (None, ()))):
        layer_params, head_vd = _decode_weights_jit(cfg, params, layout)
    return DecodeWeights(tuple(layer_params), head_vd, layout)


def checked_decode_layout(cfg: Qwen25VLConfig, decode_layout: str, held: DecodeWeights | None,
                          params: dict | None = None) -> str:
    """The decode layout a call uses: ``held``'s when weights are held (an explicit other layout is an error)."""
    layout = resolve_decode_layout(decode_layout, params)
    if held is None:
        return layout
    if decode_layout != "auto" and layout != held.layout:
        raise ValueError(f"decode_layout={decode_layout!r} but decode_weights were prepared for {held.layout!r}")
    if len(held.layers) != cfg.text.num_hidden_layers:
        raise ValueError(f"decode_weights hold {len(held.layers)} layers, the config {cfg.text.num_hidden_layers}: "
                         f"prepared for another model?")
    return held.layout


def step_weights(cfg: Qwen25VLConfig, params: dict, held: DecodeWeights | None, layout: str):
    """Inside a generation jit: (per-layer params, head or None) of the decode loop, ``held``'s when the caller
    holds them, else made here once, outside the loop (`decode_weights`)."""
    if held is None:
        return decode_weights(cfg, params, layout)
    return list(held.layers), held.head_vd


def rotary_table(cfg: Qwen25VLConfig, next_pos_b, steps: int, dtype):
    """(cos, sin) [B, steps, hd] for decode step i's token at position ``next_pos_b + i`` (generated text: the three
    M-RoPE axes equal), made once before the decode loop. Made inside it, XLA:CPU fuses cos/sin into every consumer
    (each layer's q and k rotation, the key-cache write) and evaluates them per element there."""
    t = cfg.text
    pos_bs = next_pos_b[:, None] + jnp.arange(steps, dtype=next_pos_b.dtype)[None]
    return text_lib.mrope_cos_sin(jnp.broadcast_to(pos_bs[None], (3,) + pos_bs.shape), t.head_dim, t.rope_theta,
                                  t.mrope_section, dtype)


def rotary_at(table, i):
    """Step ``i``'s (cos, sin) [B, 1, hd] from ``rotary_table``."""
    return tuple(jax.lax.dynamic_slice_in_dim(a, i, 1, axis=1) for a in table)


def step_vocab_axis(head_vd, temperature: float) -> int:
    """Where a decode step's logits hold the vocabulary (`step_logits`): 0 ([vocab, B], as the output-major head's
    product yields them) for greedy decoding with the CPU head, whose reductions then read them without a transpose
    (in-loop measurement: head product + selection 0.56 instead of 0.76 ms per step); else -1 ([B, vocab])."""
    output_major = head_vd is not None and not isinstance(head_vd, HeadPanels)   # panels yield [B, vocab]
    return 0 if output_major and temperature == 0.0 else -1


def step_logits(mdl, h_b1d, head_vd, vocab_axis: int):
    """A decode step's logits from its hidden state [B, 1, D], laid out as `step_vocab_axis` says."""
    if vocab_axis == 0:
        return mdl.logits_vocab_major(h_b1d[:, 0], head_vd)
    return decode_logits(mdl, h_b1d, head_vd)[:, 0]


def decode_logits(mdl, h_btd, head_vd):
    """Logits of a decode step: ``mdl.logits`` ("in_out", head None), the output-major head or `HeadPanels`."""
    if head_vd is None:
        return mdl.logits(h_btd)
    if isinstance(head_vd, HeadPanels):
        return mdl.logits_panels(h_btd, head_vd)
    return mdl.logits_out_in(h_btd, head_vd)


def _generate_impl(params, prepared, ids_bt, mask_bt, pixel_values, rng, eos_arr, pad, *, sharding=None, **static):
    with sharding_context(*(sharding or (None, ()))):
        return _generate_body(params, prepared, ids_bt, mask_bt, pixel_values, rng, eos_arr, pad, **static)


def _generate_body(params, prepared, ids_bt, mask_bt, pixel_values, rng, eos_arr, pad, *, cfg, grid, max_new,
                   cache_len, temperature, top_k, top_p, decode_layout):
    b, tp = ids_bt.shape
    t = cfg.text
    module = Qwen25VL(cfg)
    dtype = params["embed_tokens"]["embedding"].dtype
    pos_3bt, deltas_b1 = rope_lib.get_rope_index(ids_bt, mask_bt, None if grid is None else np.asarray(grid),
                                                 cfg.image_token_id, cfg.vision.spatial_merge_size)
    next_pos_b = jnp.sum(mask_bt, axis=1) + deltas_b1[:, 0]          # = max(prompt positions) + 1
    kv_seg_bs = jnp.concatenate([mask_bt, jnp.ones((b, cache_len - tp), jnp.int32)], axis=1)
    last_b = jnp.max(jnp.where(mask_bt > 0, jnp.arange(tp)[None], -1), axis=1)
    layer_params, head_vd = step_weights(cfg, params, prepared, decode_layout)

    def prefill_scanned(mdl):       # the scanned stack (compile time flat in depth), then the step's cache layout
        x, _ = embed_inputs(mdl, cfg, ids_bt, pixel_values, grid)
        cache_shape = (t.num_hidden_layers, b, cache_len, t.num_key_value_heads, t.head_dim)
        h, cache, _ = mdl.decode(x, pos_3bt, mask_bt, (jnp.zeros(cache_shape, dtype),) * 2, 0, kv_seg_bs)
        h_last = jnp.take_along_axis(h, last_b[:, None, None], axis=1)    # [B, 1, D]
        return mdl.logits(h_last)[:, 0], text_lib.stack_cache_to_step(cache)

    def prefill_unrolled(mdl):      # the decode step's own layers, weights and cache layout: no slices, no transposes
        x, _ = embed_inputs(mdl, cfg, ids_bt, pixel_values, grid)
        empty = (jnp.zeros((b, t.num_key_value_heads, t.head_dim, cache_len), dtype),      # K [B, Hkv, hd, S]
                 jnp.zeros((b, t.num_key_value_heads, cache_len, t.head_dim), dtype))      # V [B, Hkv, S, hd]
        h, caches = mdl.decode_step(x, pos_3bt, mask_bt, (empty,) * t.num_hidden_layers, 0, kv_seg_bs,
                                    layer_params, decode_layout)
        h_last = jnp.take_along_axis(h, last_b[:, None, None], axis=1)    # [B, 1, D]
        return decode_logits(mdl, h_last, head_vd)[:, 0], caches

    rotary = rotary_table(cfg, next_pos_b, max_new, dtype)
    vocab_axis = step_vocab_axis(head_vd, temperature)

    def step(mdl, tok_b, i, caches):
        x = mdl.embed(tok_b[:, None])
        h, caches = mdl.decode_step(x, None, jnp.ones((b, 1), jnp.int32), caches, tp + i, kv_seg_bs, layer_params,
                                    decode_layout, rotary=rotary_at(rotary, i))
        return step_logits(mdl, h, head_vd, vocab_axis), caches

    variables = {"params": params}
    # CPU ("out_in", "panel") with weights held by the caller: prefill unrolled on them, 20 % faster
    # (bench/qwen_decode.py). Otherwise the scanned prefill, which runs alongside the transposes `decode_weights`
    # makes (about 5 % faster than an unrolled prefill waiting for them), and on accelerators keeps compile time
    # flat in depth.
    prefill = prefill_unrolled if decode_layout in HELD_LAYOUTS and prepared is not None else prefill_scanned
    logits0, cache = nn.apply(prefill, module)(variables)          # per layer K [B, Hkv, hd, S], V [B, Hkv, S, hd]
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
        done_ = done_ | jnp.isin(new_tok, eos_arr)
        return i + 1, new_tok, done_, tokens_, logps_, cache_, key

    state = (jnp.int32(0), tok0, done, tokens, logps, cache, rng)
    _, _, _, tokens, logps, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, logps


_generate_jit = jax.jit(_generate_impl, static_argnames=("cfg", "grid", "max_new", "cache_len", "temperature",
                                                          "top_k", "top_p", "decode_layout", "sharding"))


def generate(cfg: Qwen25VLConfig, params: dict, input_ids, attention_mask=None, pixel_values=None,
             image_grid_thw=None, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng=None, eos_token_id=None, *, pad_token_id: int | None = None,
             bucket: int = 64, decode_layout: str = "auto", decode_weights: DecodeWeights | None = None):
    """-> (tokens [B, max_new_tokens] int32, logprobs [B, max_new_tokens] float32).

    ``temperature=0``: greedy. Sampling needs ``rng`` (a PRNG key). ``eos_token_id``: int or list; ``None`` uses
    the config's EOS ids; ``[]`` disables stopping. After a row's EOS its tokens are ``pad_token_id`` (default:
    config pad id, else the first EOS id, else 0) and its log-probs 0. The loop stops when every row is done.
    ``decode_layout``: the decode step's weight layout (`resolve_decode_layout`; same results either way).
    ``decode_weights``: `prepare_decode` of these ``params``, reused across calls (its layout is used; an explicit
    ``decode_layout`` must match it). Without it the weights are prepared inside every call.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    layout = checked_decode_layout(cfg, decode_layout, decode_weights, params)
    grid, ids, mask, pv = _prep(cfg, params, input_ids, attention_mask, pixel_values, image_grid_thw)
    b, t = ids.shape
    mask = jnp.ones((b, t), jnp.int32) if mask is None else mask
    eos = cfg.eos_token_id if eos_token_id is None else (
        (int(eos_token_id),) if np.isscalar(eos_token_id) else tuple(int(e) for e in eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    tp = round_up(t, bucket)
    fill = 0 if cfg.image_token_id != 0 else 1
    ids = jnp.pad(ids, ((0, 0), (0, tp - t)), constant_values=fill)
    mask = jnp.pad(mask, ((0, 0), (0, tp - t)))
    cache_len = round_up(tp + max_new_tokens, bucket)
    rng = jax.random.key(0) if rng is None else rng
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    return _generate_jit(params, decode_weights, ids, mask, pv, rng, eos_arr, jnp.int32(pad), cfg=cfg, grid=grid,
                         max_new=int(max_new_tokens), cache_len=cache_len, temperature=float(temperature),
                         top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
                         decode_layout=layout, sharding=sharding_of(params))
