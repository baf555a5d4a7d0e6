"""Whole model (transformers ``Qwen2_5_VLForConditionalGeneration``) and its pure functions.

Params are a plain nested dict **without** the ``{'params': ...}`` wrapper:
  visual/{patch_embed, blocks (stacked), merger}   <- visual.*  (Hub layout) / model.visual.* (v5 in-memory)
  embed_tokens/embedding, layers (stacked), norm    <- model.{embed_tokens, layers.i, norm}
  lm_head/kernel (only when tie_word_embeddings is False; tied models use embed_tokens.T)
``param_logical_axes(cfg)`` gives the matching tree of logical PartitionSpecs (leading 'layers' on stacked weights).

Inputs are transformers-style: ``input_ids [B,T]``, ``attention_mask [B,T]`` (1 = token, 0 = padding, any side),
packed ``pixel_values [N, C*T*P*P]`` and ``image_grid_thw [n_img, 3]``. The grid must be concrete (NumPy / list):
it fixes the vision tower's shapes, exactly as in torch where it is read with ``.tolist()``.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.qwen2_5_vl import rope_index as rope_lib
from edit_r1_jax.models.qwen2_5_vl.common import (RMSNorm, constrain, current_sharding, default_init, dense,
                                                  sharding_context)
from edit_r1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from edit_r1_jax.models.qwen2_5_vl.text import decode_layers_unrolled, decoder_stack, mrope_cos_sin
from edit_r1_jax.models.qwen2_5_vl.vision import VisionTower, meta_arrays
from edit_r1_jax.models.qwen2_5_vl.vision_meta import vision_meta
from edit_r1_jax.native import panel_matmul as pm


@flax.struct.dataclass
class HeadPanels:
    """The LM head packed for the native CPU decode kernel (decode layout "panel"): ``kernel_p`` [ceil(V / 32), D, 32]
    (`native.panel_matmul.pack_panels` of the [V, D] head), ``vocab`` V."""
    kernel_p: jax.Array
    vocab: int = flax.struct.field(pytree_node=False)


def _float_logits(out_btv):
    return constrain(out_btv.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))


class Qwen25VL(nn.Module):
    cfg: Qwen25VLConfig
    collect_hidden: bool = False

    def setup(self):
        c = self.cfg
        self.visual = VisionTower(c.vision, c.attention_backend, c.remat_policy, self.collect_hidden)
        self.embed_tokens = nn.Embed(c.text.vocab_size, c.text.hidden_size,
                                     embedding_init=nn.with_logical_partitioning(default_init, ("vocab", "embed")))
        self.layers = decoder_stack(c.text, c.attention_backend, c.remat_policy, self.collect_hidden)
        self.norm = RMSNorm(c.text.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head")

    def encode_images(self, pixel_values, meta):
        return self.visual(pixel_values, meta)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def decode(self, x_btd, position_ids, segment_ids, cache=None, cache_index=None, kv_segment_ids=None):
        """Decoder stack + final norm. -> (hidden [B,T,D] normed, new_cache, per-layer hidden or None)."""
        t = self.cfg.text
        x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, x_btd.dtype)
        x_btd, (new_cache, hidden) = self.layers(x_btd, cache, cos, sin, segment_ids, cache_index, kv_segment_ids)
        return self.norm(x_btd), new_cache, hidden

    def decode_step(self, x_btd, position_ids, segment_ids, caches, cache_index, kv_segment_ids, layer_params,
                    kernel_layout: str = "in_out", rotary=None):
        """``decode`` for a KV-cache decode step: layers unrolled on ``layer_params`` (``text.unstack_layers``, each
        through ``text.to_out_in`` and ``text.fuse_projections`` for ``kernel_layout="out_in"``), per-layer caches
        K [B, Hkv, hd, S], V [B, Hkv, S, hd] (``text.stack_cache_to_step``). ``rotary``: (cos, sin) [B, T, hd] of ``position_ids`` made beforehand
        (``rotary_table``), else made here. -> (hidden [B,T,D] normed, new caches)."""
        t = self.cfg.text
        x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rotary if rotary is not None else mrope_cos_sin(position_ids, t.head_dim, t.rope_theta,
                                                                   t.mrope_section, x_btd.dtype)
        x_btd, caches = decode_layers_unrolled(t, layer_params, x_btd, caches, cos, sin, segment_ids, cache_index,
                                               kv_segment_ids, kernel_layout)
        return self.norm(x_btd), caches

    def logits_out_in(self, h_btd, head_vd):
        """``logits`` with the LM head given output-major, ``head_vd`` [vocab, D] (the tied embedding itself, or
        ``lm_head`` kernel transposed), as the left operand of the dot (see ``common.DenseOutIn``)."""
        out_vbt = jax.lax.dot_general(head_vd.astype(h_btd.dtype), h_btd, (((1,), (2,)), ((), ())))
        return _float_logits(jnp.transpose(out_vbt, (1, 2, 0)))

    def logits_panels(self, h_btd, head: HeadPanels):
        """``logits`` with the LM head packed in panels (`HeadPanels`), through the native kernel
        (`common.DensePanel`). -> [B, T, vocab] float32."""
        out_nv = pm.panel_matmul(head.kernel_p, h_btd.reshape(-1, h_btd.shape[-1]), head.vocab)
        return _float_logits(out_nv.reshape(h_btd.shape[:2] + (head.vocab,)))

    def logits_vocab_major(self, h_bd, head_vd):
        """Logits [vocab, B] float32 of one token per row, as the output-major head's product yields them (no
        transpose; the greedy decode step reduces over the vocabulary on this layout directly)."""
        out_vb = jax.lax.dot_general(head_vd.astype(h_bd.dtype), h_bd, (((1,), (1,)), ((), ())))
        return constrain(out_vb.astype(jnp.float32), ("activation_vocab", "activation_batch"))

    def logits(self, h_btd):
        if self.cfg.tie_word_embeddings:
            return _float_logits(self.embed_tokens.attend(h_btd))
        return _float_logits(self.lm_head(h_btd))

    def __call__(self, input_ids, pixel_values, meta):   # used by init only: touches every parameter
        feats = self.encode_images(pixel_values, meta)
        x = self.embed(input_ids) + jnp.sum(feats) * 0
        pos = rope_lib.text_position_ids(input_ids)
        h, _, _ = self.decode(x, pos, None)
        return self.logits(h)


# ----------------------------------------------------------------------------------------------------------- init

def _dummy_inputs(cfg: Qwen25VLConfig):
    m = cfg.vision.spatial_merge_size
    grid = np.array([[1, 2 * m, 2 * m]])
    meta = meta_arrays(vision_meta(grid, cfg.vision))
    return jnp.zeros((1, 4), jnp.int32), jnp.zeros((int(grid.prod()), cfg.vision.patch_dim), jnp.float32), meta


def _boxed_init(cfg: Qwen25VLConfig, rng):
    ids, pv, meta = _dummy_inputs(cfg)
    return Qwen25VL(cfg).init(rng, ids, pv, meta)["params"]


def init_params(cfg: Qwen25VLConfig, rng=None, dtype=jnp.float32) -> dict:
    """Random params (normal(0.02) kernels, ones for norms), unboxed plain dicts."""
    rng = jax.random.key(0) if rng is None else rng
    params = nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(cfg, rng))
    return jax.tree.map(lambda x: x.astype(dtype), params)


@functools.lru_cache(maxsize=16)
def param_shapes(cfg: Qwen25VLConfig) -> dict:
    """Tree of ShapeDtypeStruct (float32) without allocating anything (jax.eval_shape)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0)))


@functools.lru_cache(maxsize=16)
def param_logical_axes(cfg: Qwen25VLConfig) -> dict:
    """Tree (matching params) of logical PartitionSpecs, e.g. P('layers', 'embed', 'heads', 'head_dim')."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0)))


def num_params(cfg: Qwen25VLConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg))))


# -------------------------------------------------------------------------------------------------------- forward

def _grid_key(image_grid_thw) -> tuple | None:
    if image_grid_thw is None:
        return None
    if isinstance(image_grid_thw, jax.core.Tracer):
        raise TypeError("image_grid_thw must be concrete (NumPy array or list), not a traced value: it fixes the "
                        "vision tower's shapes. Pass it as a static/closure value when jitting.")
    return tuple(tuple(int(v) for v in row) for row in np.asarray(image_grid_thw).reshape(-1, 3))


def _check_image_tokens(cfg, input_ids, grid):
    if isinstance(input_ids, jax.core.Tracer):
        return
    n_tok = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
    u = cfg.vision.spatial_merge_size ** 2
    n_feat = 0 if grid is None else int(sum(t * h * w for t, h, w in grid)) // u
    if n_tok != n_feat:
        raise ValueError(f"Image features and image tokens do not match: {n_tok} tokens with id "
                         f"image_token_id={cfg.image_token_id} in input_ids, but image_grid_thw={list(grid or [])} "
                         f"gives {n_feat} merged image features")


def splice_images(x_btd, input_ids, feats_md, image_token_id: int):
    """masked_scatter of image features into image-token positions, row-major over (batch, seq)."""
    is_img = input_ids == image_token_id
    b, t = input_ids.shape
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats_md.shape[0] - 1)
    gathered = feats_md[idx].reshape(b, t, -1).astype(x_btd.dtype)
    return jnp.where(is_img[..., None], gathered, x_btd)


def position_ids_for(cfg, input_ids, attention_mask, grid):
    """M-RoPE ids: ``get_rope_index`` (padding-aware) whenever there are images or an attention mask; ``arange``
    otherwise. Same rule as transformers' ``generate``; transformers' *forward* uses ``arange`` for text-only input
    even with left padding, which differs from this by a per-row constant shift (identical attention in exact
    arithmetic, since RoPE only sees relative positions)."""
    if grid is None and attention_mask is None:
        return rope_lib.text_position_ids(input_ids)
    return rope_lib.get_rope_index(input_ids, attention_mask, None if grid is None else np.asarray(grid),
                                   cfg.image_token_id,
                                   cfg.vision.spatial_merge_size)[0]


def row_grid(grid, batch: int) -> np.ndarray | None:
    """The per-row image grid [k, 3] when ``grid`` is the same k images' grid repeated for each of ``batch`` rows
    (e.g. the RRM's (source, edited) pair), else None."""
    if grid is None or batch <= 1:
        return None
    g = np.asarray(grid).reshape(-1, 3)
    if len(g) % batch:
        return None
    per = g.reshape(batch, -1, 3)
    return per[0] if (per == per[0]).all() else None


def splice_images_per_row(x_btd, input_ids, feats_bmd, image_token_id: int):
    """``splice_images`` when row b's image tokens take ``feats_bmd[b]`` (in order). A row whose image-token count is
    not M gets NaN at its image positions (loud, e.g. for the train step's NaN guard) instead of wrong features."""
    is_img = input_ids == image_token_id
    m = feats_bmd.shape[1]
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, m - 1)                       # [B, T]
    gathered = jnp.take_along_axis(feats_bmd, idx[..., None], axis=1).astype(x_btd.dtype)
    ok_b = jnp.sum(is_img, axis=1) == m
    gathered = jnp.where(ok_b[:, None, None], gathered, jnp.nan)
    return jnp.where(is_img[..., None], gathered, x_btd)


def encode_images_per_row(module: Qwen25VL, cfg, pixel_values, grid_row: np.ndarray, batch: int):
    """The vision tower once per row (``jax.vmap`` over rows of [B, P, patch_dim]): every gather (windows, merge
    order) stays inside a row, so rows split over the data-parallel axes without any device holding the patches of
    the whole batch (the flat path's gathers over all B*P patches make XLA all-gather them). -> [B, M, D]."""
    vparams = module.variables["params"]["visual"]
    tower = VisionTower(cfg.vision, cfg.attention_backend, cfg.remat_policy, False)
    meta = meta_arrays(vision_meta(np.asarray(grid_row), cfg.vision))
    pv_bpd = constrain(pixel_values.reshape(batch, -1, pixel_values.shape[-1]), ("activation_batch", None, None))
    ctx = current_sharding()
    inner, spmd_axes = (None, ()), None
    if ctx is not None:
        # inside the vmap the row axis is the batch: vmap's spmd_axis_name adds the data-parallel mesh axes to every
        # constraint of the tower at the row dim, and the tower's own "batch" names map to nothing
        mesh, rules = ctx
        table = dict(rules)
        axes = table.get("activation_batch")
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and batch % size == 0:
            spmd_axes = axes if len(axes) > 1 else axes[0]
            inner = (mesh, tuple((k, None if k in ("batch", "activation_batch") else v) for k, v in rules))
    with sharding_context(*inner):
        feats = jax.vmap(lambda pv: tower.apply({"params": vparams}, pv, meta), spmd_axis_name=spmd_axes)(pv_bpd)
    return constrain(feats, ("activation_batch", None, "activation_embed"))


def embed_inputs(module: Qwen25VL, cfg, input_ids, pixel_values, grid):
    """Token embeddings with image features spliced in (inside ``module.apply``).

    When every row has the same images' grid (``row_grid``) the vision tower runs per row (``encode_images_per_row``;
    rows must then hold their own images' tokens, in order) except when collecting hidden states.
    -> (inputs_embeds [B,T,D], vision output or None: features, or (features, per-block hidden) if collecting).
    """
    x = module.embed(input_ids)
    vis = None
    per_row = None if module.collect_hidden else row_grid(grid, input_ids.shape[0])
    if per_row is not None:
        feats_bmd = encode_images_per_row(module, cfg, pixel_values, per_row, input_ids.shape[0])
        x = splice_images_per_row(x, input_ids, feats_bmd, cfg.image_token_id)
        return x, feats_bmd.reshape(-1, feats_bmd.shape[-1])
    if grid is not None:
        meta = meta_arrays(vision_meta(np.asarray(grid), cfg.vision))
        vis = module.encode_images(pixel_values, meta)
        feats = vis[0] if module.collect_hidden else vis
        x = splice_images(x, input_ids, feats, cfg.image_token_id)
    return x, vis


def _forward_impl(params, input_ids, attention_mask, pixel_values, position_ids, *, cfg, grid, return_hidden,
                  sharding=None):
    with sharding_context(*(sharding or (None, ()))):
        return _forward_body(params, input_ids, attention_mask, pixel_values, position_ids, cfg, grid, return_hidden)


def _forward_body(params, input_ids, attention_mask, pixel_values, position_ids, cfg, grid, return_hidden):
    module = Qwen25VL(cfg, collect_hidden=return_hidden)
    seg = None if attention_mask is None else attention_mask.astype(jnp.int32)

    def body(mdl):
        x, vis = embed_inputs(mdl, cfg, input_ids, pixel_values, grid)
        pos = position_ids if position_ids is not None else position_ids_for(cfg, input_ids, attention_mask, grid)
        h, _, hidden = mdl.decode(x, pos, seg)
        logits = mdl.logits(h)
        if not return_hidden:
            return logits
        return dict(logits=logits, last_hidden=h, layer_hidden=hidden, inputs_embeds=x, vision=vis)

    return nn.apply(body, module)({"params": params})


_forward_jit = jax.jit(_forward_impl, static_argnames=("cfg", "grid", "return_hidden", "sharding"))


def sharding_of(params, mesh=None, rules=None):
    """Static (mesh, rules) for activation constraints: the given mesh, else the mesh the params live on (if they
    carry a NamedSharding over more than one device), else -- params are tracers inside a caller's jit, e.g. the
    train step -- the mesh of an enclosing ``with mesh:`` / ``jax.set_mesh`` (more than one device), else None.

    Without constraints inside a sharded train step XLA is free to replicate the batch dimension of activations
    (FSDP params sharded on 'embed' make that a likely choice), which multiplies activation memory by the
    data-parallel size."""
    if mesh is None:
        leaf = jax.tree.leaves(params)[0]
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
            mesh = sh.mesh
    if mesh is None and isinstance(jax.tree.leaves(params)[0], jax.core.Tracer):
        mesh = _context_mesh()
    if mesh is None:
        return None
    from edit_r1_jax import parallel
    return mesh, tuple(parallel.DEFAULT_RULES if rules is None else rules)


def _context_mesh():
    """The concrete mesh of an enclosing ``with mesh:`` (or ``jax.set_mesh``) with more than one device, else None."""
    from jax._src import mesh as mesh_lib
    env = mesh_lib.thread_resources.env.physical_mesh
    if not env.empty and env.size > 1:
        return env
    try:
        concrete = jax.sharding.get_mesh()
    except Exception:  # noqa: BLE001 - older/newer JAX without a concrete context mesh
        return None
    if concrete is not None and not getattr(concrete, "empty", True) and concrete.size > 1:
        return concrete
    return None


def _prep(cfg, params, input_ids, attention_mask, pixel_values, image_grid_thw):
    grid = _grid_key(image_grid_thw)
    if grid is not None and pixel_values is None:
        raise ValueError("image_grid_thw given without pixel_values")
    if pixel_values is not None and grid is None:
        raise ValueError("pixel_values given without image_grid_thw")
    _check_image_tokens(cfg, input_ids, grid)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if pixel_values is not None:
        n = sum(t * h * w for t, h, w in grid)
        if tuple(pixel_values.shape) != (n, cfg.vision.patch_dim):
            raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)} does not match image_grid_thw "
                             f"{list(grid)}: expected ({n}, {cfg.vision.patch_dim})")
        pixel_values = jnp.asarray(pixel_values).astype(params["visual"]["patch_embed"]["kernel"].dtype)
    return grid, input_ids, attention_mask, pixel_values


def forward(cfg: Qwen25VLConfig, params: dict, input_ids, attention_mask=None, pixel_values=None,
            image_grid_thw=None, *, position_ids=None, mesh=None, rules=None) -> jax.Array:
    """Logits ``[B, T, vocab]`` float32, same semantics as transformers' forward. Jitted; differentiable in params.

    ``position_ids`` [3, B, T] overrides the M-RoPE ids (default: see ``position_ids_for``). ``mesh``/``rules``:
    activation sharding constraints (default: the mesh the params are sharded on, ``parallel.DEFAULT_RULES``).
    """
    grid, input_ids, attention_mask, pixel_values = _prep(cfg, params, input_ids, attention_mask, pixel_values,
                                                          image_grid_thw)
    return _forward_jit(params, input_ids, attention_mask, pixel_values, position_ids, cfg=cfg, grid=grid,
                        return_hidden=False, sharding=sharding_of(params, mesh, rules))


def forward_with_hidden(cfg: Qwen25VLConfig, params: dict, input_ids, attention_mask=None, pixel_values=None,
                        image_grid_thw=None, *, position_ids=None, mesh=None, rules=None) -> dict[str, Any]:
    """Like ``forward`` but returns a dict: logits, last_hidden (after the final norm; Qwen-Image's prompt
    embedding), layer_hidden [L, B, T, D] (after each decoder layer), inputs_embeds, and vision =
    (merged features, per-block hidden [depth, N, Dv] in window order) when images are given."""
    grid, input_ids, attention_mask, pixel_values = _prep(cfg, params, input_ids, attention_mask, pixel_values,
                                                          image_grid_thw)
    return _forward_jit(params, input_ids, attention_mask, pixel_values, position_ids, cfg=cfg, grid=grid,
                        return_hidden=True, sharding=sharding_of(params, mesh, rules))


def token_logprobs(cfg: Qwen25VLConfig, params: dict, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, temperature: float = 1.0, position_ids=None) -> jax.Array:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t in [0, T-1) -> [B, T-1] float32 (differentiable).

    ``log_softmax(logits / temperature)`` gathered at the next token; the same quantity ``generate`` returns for
    the tokens it sampled (use the same temperature). Positions whose next token is padding are set to 0.
    """
    logits = forward(cfg, params, input_ids, attention_mask, pixel_values, image_grid_thw,
                     position_ids=position_ids)
    ids = jnp.asarray(input_ids, jnp.int32)
    lp = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    out = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
    if attention_mask is not None:
        out = jnp.where(jnp.asarray(attention_mask)[:, 1:] > 0, out, 0.0)
    return out


def completion_logprobs(cfg: Qwen25VLConfig, params: dict, prompt_ids, prompt_mask, completion_ids,
                        completion_mask=None, pixel_values=None, image_grid_thw=None, *,
                        temperature: float = 1.0) -> jax.Array:
    """Log-probs of ``completion_ids [B, n]`` given the prompt, aligned with ``generate``'s output: ``[B, n]``
    float32, ``log_softmax(logits / temperature)`` at each completion token, 0 where ``completion_mask`` is 0
    (e.g. the padding after EOS). Differentiable in ``params`` (the GCPO / SFT recompute)."""
    prompt_ids = np.asarray(prompt_ids) if not isinstance(prompt_ids, jax.Array) else prompt_ids
    b, t = prompt_ids.shape
    n = completion_ids.shape[1]
    pm = jnp.ones((b, t), jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    cm = jnp.ones((b, n), jnp.int32) if completion_mask is None else jnp.asarray(completion_mask, jnp.int32)
    full = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(completion_ids, jnp.int32)], axis=1)
    if not isinstance(prompt_ids, jax.core.Tracer) and not isinstance(completion_ids, jax.core.Tracer):
        full = np.asarray(full)                      # keeps the host-side image-token count check
    lp = token_logprobs(cfg, params, full, jnp.concatenate([pm, cm], axis=1), pixel_values, image_grid_thw,
                        temperature=temperature)
    return lp[:, t - 1:]
