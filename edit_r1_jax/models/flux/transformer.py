"""FLUX.1 / FLUX.1-Kontext transformer (diffusers `FluxTransformer2DModel`) in Flax Linen.

Params are a plain nested dict whose paths mirror diffusers' module names ('.'-separated indices folded into the
name: `to_out.0` -> `to_out_0`, `net.0.proj` -> `net_0_proj`), with the 19 double-stream and 38 single-stream blocks
each stacked on a leading layer axis (`nn.scan`):

    x_embedder, context_embedder, time_text_embed/{timestep,guidance,text}_embedder/linear_{1,2},
    transformer_blocks/{norm1,norm1_context}/linear, transformer_blocks/attn/{to_q,...,norm_q,...},
    transformer_blocks/{ff,ff_context}/{net_0_proj,net_2}, single_transformer_blocks/{norm/linear,proj_mlp,proj_out,
    attn/...}, norm_out/linear, proj_out.

Dense kernels are [in, out] (torch weight transposed), RMSNorm weights are `scale`. Optional LoRA adapters live in
a second variable collection "lora" with the same module paths (leaves `lora_a` [.., in, r], `lora_b` [.., r, out])
and add `(x @ a) @ b` inside each adapted Dense, so base weights are never copied (see models/lora.py).

Logical axis names on every param (`param_logical_axes`) and on the activations map to the mesh via
`parallel.DEFAULT_RULES` (embed -> fsdp, heads/mlp -> tensor, batch -> data+fsdp).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from edit_r1_jax import parallel
from edit_r1_jax.models import layer_layout, layers
from edit_r1_jax.models.flux.config import FluxTransformerConfig

Array = jax.Array
_KERNEL_INIT = nn.initializers.lecun_normal()
_ACT = ("activation_batch", "activation_length", "activation_embed")


# ------------------------------------------------------------------------------------------------------------------
# RoPE (diffusers FluxPosEmbed + get_1d_rotary_pos_embed + apply_rotary_emb, interleaved pairs)
# ------------------------------------------------------------------------------------------------------------------
def rope_from_ids(ids: Any, axes_dims: tuple[int, ...], theta: float = 10000.0) -> tuple[Array, Array]:
    """Per-pair rotation angles for 3-axis position ids.

    For axis i with width d_i: w_i = theta^(-arange(0, d_i, 2)/d_i), angle = ids[:, i] * w_i; the axes are
    concatenated, giving cos/sin of shape [S, head_dim/2] (one entry per interleaved pair (x[2k], x[2k+1]); diffusers
    stores the same values repeat_interleave'd to [S, head_dim]).

    Concrete (NumPy / non-traced) ids are computed in float64 on the host, as diffusers does; traced ids fall back
    to float32 (error ~|pos| * 6e-8 rad).
    """
    if not isinstance(ids, jax.core.Tracer):
        pos = np.asarray(ids, dtype=np.float64)
        ang = np.concatenate([pos[:, i:i + 1] * (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d))[None]
                              for i, d in enumerate(axes_dims)], axis=-1)
        return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
    pos = ids.astype(jnp.float32)
    ang = jnp.concatenate([pos[:, i:i + 1] * (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(
        np.float32)[None] for i, d in enumerate(axes_dims)], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_bshd: Array, cos_sk: Array, sin_sk: Array) -> Array:
    """Interleaved-pair rotation in float32: out[2k] = x0 cos - x1 sin, out[2k+1] = x1 cos + x0 sin."""
    b, s, h, d = x_bshd.shape
    xf = x_bshd.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, sn = cos_sk[None, :, None, :], sin_sk[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * sn, x1 * c + x0 * sn], axis=-1)
    return out.reshape(b, s, h, d).astype(x_bshd.dtype)


def timestep_proj(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): cat(cos(t f), sin(t f)) in float32,
    f_j = exp(-ln(max_period) j / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    e = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(e), jnp.sin(e)], axis=-1)


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------
def constrain(x: Array, logical: tuple, mesh: Mesh | None, rules) -> Array:
    """with_sharding_constraint by logical names; no-op without a mesh. Axes that do not divide a dim are dropped."""
    if mesh is None:
        return x
    spec = parallel.fit_spec_to_shape(parallel.logical_to_mesh_spec(logical, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class Dense(nn.Module):
    """torch.nn.Linear (bias=True): y = x @ kernel + bias, plus an optional LoRA update (x @ lora_a) @ lora_b."""
    features: int
    axes: tuple = (None, None)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_KERNEL_INIT, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                          (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.has_variable("lora", "lora_a"):
            a = self.get_variable("lora", "lora_a").astype(self.dtype)
            b = self.get_variable("lora", "lora_b").astype(self.dtype)
            y = y + jnp.dot(jnp.dot(x, a), b)
        return y + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm(head_dim, eps) over the last axis, weight -> `scale`."""
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",)),
                           (x.shape[-1],), self.param_dtype)
        return layers.rms_norm(x, scale, self.eps)


def _ln(x: Array) -> Array:
    """nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)."""
    return layers.layer_norm(x, None, None, 1e-6)


class AdaNorm(nn.Module):
    """The `linear(silu(temb))` projection of AdaLayerNormZero (6 chunks), AdaLayerNormZeroSingle (3) and
    AdaLayerNormContinuous (2); returns the chunks in diffusers' order, each [B, D]."""
    cfg: FluxTransformerConfig
    chunks: int
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @nn.compact
    def __call__(self, temb: Array) -> list[Array]:
        c = self.cfg
        emb = Dense(self.chunks * c.inner_dim, ("embed", "mlp"), c.dtype, c.param_dtype, name="linear")(
            nn.silu(temb))
        # [B, k*D] is small: gather it over 'tensor' before chunking. Besides being cheap, this avoids an XLA SPMD
        # miscompile (jax 0.10.2, CPU) seen when tensor-sharded chunks gate a batch-sharded attention output.
        emb = constrain(emb, ("activation_batch", None), self.mesh, self.rules)
        return jnp.split(emb, self.chunks, axis=-1)


def _modulate(x_bsd: Array, shift_bd: Array, scale_bd: Array) -> Array:
    return _ln(x_bsd) * (1 + scale_bd[:, None]) + shift_bd[:, None]


class FeedForward(nn.Module):
    """diffusers FeedForward(dim, activation_fn="gelu-approximate"): net.2(gelu_tanh(net.0.proj(x)))."""
    cfg: FluxTransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        h = Dense(c.mlp_dim, ("embed", "mlp"), c.dtype, c.param_dtype, name="net_0_proj")(x)
        h = jax.nn.gelu(h, approximate=True)
        return Dense(c.inner_dim, ("mlp", "embed"), c.dtype, c.param_dtype, name="net_2")(h)


class Attention(nn.Module):
    """diffusers FluxAttention + FluxAttnProcessor.

    joint=True (double block): image q/k/v (to_q/k/v, norm_q/k) and text q/k/v (add_*_proj, norm_added_q/k),
    concatenated text-first, RoPE, attention, split, then to_out.0 / to_add_out. joint=False (single block,
    pre_only): q/k/v of one sequence, no output projection.
    """
    cfg: FluxTransformerConfig
    joint: bool
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    def _qkv(self, x: Array, prefix: str, norm_prefix: str) -> tuple[Array, Array, Array]:
        c = self.cfg
        b, s, _ = x.shape
        names = (f"{prefix}q", f"{prefix}k", f"{prefix}v") if prefix == "to_" else \
            (f"{prefix}q_proj", f"{prefix}k_proj", f"{prefix}v_proj")
        q, k, v = (Dense(c.inner_dim, ("embed", "q_heads_dim"), c.dtype, c.param_dtype, name=n)(x)
                   .reshape(b, s, c.num_attention_heads, c.attention_head_dim) for n in names)
        q = RMSNorm(1e-6, c.param_dtype, name=f"{norm_prefix}q")(q)
        k = RMSNorm(1e-6, c.param_dtype, name=f"{norm_prefix}k")(k)
        return q, k, v

    @nn.compact
    def __call__(self, x_bsd: Array, ctx_btd: Array | None, cos: Array, sin: Array):
        c = self.cfg
        q, k, v = self._qkv(x_bsd, "to_", "norm_")                  # [B, S, H, hd]
        if self.joint:
            cq, ck, cv = self._qkv(ctx_btd, "add_", "norm_added_")  # [B, T, H, hd]
            q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in ((cq, q), (ck, k), (cv, v)))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        heads = ("activation_batch", "activation_length", "activation_heads", None)
        q, k, v = (constrain(t, heads, self.mesh, self.rules) for t in (q, k, v))
        o = layers.attention(q, k, v, backend=c.attention_backend)
        b, s = o.shape[:2]
        o = o.reshape(b, s, c.inner_dim)
        if not self.joint:
            return o
        t = ctx_btd.shape[1]
        o_ctx, o_x = o[:, :t], o[:, t:]
        o_x = Dense(c.inner_dim, ("q_heads_dim", "embed"), c.dtype, c.param_dtype, name="to_out_0")(o_x)
        o_ctx = Dense(c.inner_dim, ("q_heads_dim", "embed"), c.dtype, c.param_dtype, name="to_add_out")(o_ctx)
        return o_x, o_ctx


class DoubleBlock(nn.Module):
    """diffusers FluxTransformerBlock (MMDiT). Scan body: carry (ctx [B,T,D], x [B,S,D])."""
    cfg: FluxTransformerConfig
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @nn.compact
    def __call__(self, carry, temb: Array, cos: Array, sin: Array):
        ctx, x = carry
        mr = (self.mesh, self.rules)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaNorm(
            self.cfg, 6, *mr, name="norm1")(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaNorm(
            self.cfg, 6, *mr, name="norm1_context")(temb)
        attn_x, attn_c = Attention(self.cfg, True, self.mesh, self.rules, name="attn")(
            _modulate(x, shift_msa, scale_msa), _modulate(ctx, c_shift_msa, c_scale_msa), cos, sin)
        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * FeedForward(self.cfg, name="ff")(_modulate(x, shift_mlp, scale_mlp))
        ctx = ctx + c_gate_msa[:, None] * attn_c
        ctx = ctx + c_gate_mlp[:, None] * FeedForward(self.cfg, name="ff_context")(
            _modulate(ctx, c_shift_mlp, c_scale_mlp))
        if x.dtype == jnp.float16:  # the reference clips fp16 activations
            x, ctx = jnp.clip(x, -65504, 65504), jnp.clip(ctx, -65504, 65504)
        x = constrain(x, _ACT, self.mesh, self.rules)
        ctx = constrain(ctx, _ACT, self.mesh, self.rules)
        return (ctx, x), None


class SingleBlock(nn.Module):
    """diffusers FluxSingleTransformerBlock on the joint sequence h = cat(ctx, x) [B, T+S, D] (scan carry)."""
    cfg: FluxTransformerConfig
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @nn.compact
    def __call__(self, h: Array, temb: Array, cos: Array, sin: Array):
        c = self.cfg
        shift, scale, gate = AdaNorm(c, 3, self.mesh, self.rules, name="norm")(temb)
        n = _modulate(h, shift, scale)
        mlp = jax.nn.gelu(Dense(c.mlp_dim, ("embed", "mlp"), c.dtype, c.param_dtype, name="proj_mlp")(n),
                          approximate=True)
        attn = Attention(c, False, self.mesh, self.rules, name="attn")(n, None, cos, sin)
        out = Dense(c.inner_dim, ("mlp", "embed"), c.dtype, c.param_dtype, name="proj_out")(
            jnp.concatenate([attn, mlp], axis=-1))          # input order [attn (D) | mlp (4D)]
        h = h + gate[:, None] * out
        if h.dtype == jnp.float16:
            h = jnp.clip(h, -65504, 65504)
        return constrain(h, _ACT, self.mesh, self.rules), None


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding / PixArtAlphaTextProjection(act="silu"): linear_2(silu(linear_1(x)))."""
    cfg: FluxTransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        h = nn.silu(Dense(c.inner_dim, (None, "embed"), c.dtype, c.param_dtype, name="linear_1")(x))
        return Dense(c.inner_dim, ("embed", None), c.dtype, c.param_dtype, name="linear_2")(h)


class TimeTextEmbed(nn.Module):
    """CombinedTimestepGuidanceTextProjEmbeddings (guidance_embeds=True) / CombinedTimestepTextProjEmbeddings."""
    cfg: FluxTransformerConfig

    @nn.compact
    def __call__(self, timestep: Array, guidance: Array | None, pooled: Array) -> Array:
        c = self.cfg
        temb = TimestepEmbedding(c, name="timestep_embedder")(timestep_proj(timestep).astype(pooled.dtype))
        if c.guidance_embeds:
            if guidance is None:
                raise ValueError("transformer_forward: this model has guidance_embeds=True; pass `guidance` [B]")
            temb = temb + TimestepEmbedding(c, name="guidance_embedder")(timestep_proj(guidance).astype(pooled.dtype))
        return temb + TimestepEmbedding(c, name="text_embedder")(pooled)


class LayerLoop(nn.Module):
    """The per-layer layout (cfg.scan_layers=False): `length` blocks called in order, params `layers_{i}/...`,
    same carry/broadcast signature and results as the scanned stack."""
    block_cls: Any
    cfg: FluxTransformerConfig
    length: int
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @nn.compact
    def __call__(self, carry, temb: Array, cos: Array, sin: Array):
        for i in range(self.length):
            carry, _ = self.block_cls(self.cfg, self.mesh, self.rules, name=layer_layout.layer_name(i))(
                carry, temb, cos, sin)
        return carry, None


def _block_stack(block_cls, cfg: FluxTransformerConfig, length: int, name: str, mesh, rules):
    if cfg.remat != "none":
        policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
    if not cfg.scan_layers:
        return LayerLoop(block_cls, cfg, length, mesh, rules, name=name)
    scanned = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, mesh, rules, name=name)


class FluxTransformer(nn.Module):
    """diffusers FluxTransformer2DModel.forward, with RoPE tables precomputed (see `rope_from_ids`).

    out_len: keep only the first out_len image tokens before norm_out/proj_out (Kontext drops the reference tokens;
    identical to slicing the full output).
    """
    cfg: FluxTransformerConfig
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, cos, sin,
                 out_len: int | None = None):
        c = self.cfg
        dt = c.dtype
        x = Dense(c.inner_dim, (None, "embed"), dt, c.param_dtype, name="x_embedder")(hidden_states)
        # diffusers: timestep.to(hidden_states.dtype) * 1000 (rounded in the activation dtype)
        t = timestep.astype(dt) * jnp.asarray(1000, dt)
        g = None if guidance is None else guidance.astype(dt) * jnp.asarray(1000, dt)
        temb = TimeTextEmbed(c, name="time_text_embed")(t, g, pooled_projections.astype(dt))
        ctx = Dense(c.inner_dim, (None, "embed"), dt, c.param_dtype, name="context_embedder")(encoder_hidden_states)
        x = constrain(x, _ACT, self.mesh, self.rules)
        ctx = constrain(ctx, _ACT, self.mesh, self.rules)

        if c.num_layers:
            (ctx, x), _ = _block_stack(DoubleBlock, c, c.num_layers, "transformer_blocks", self.mesh, self.rules)(
                (ctx, x), temb, cos, sin)
        t_len = ctx.shape[1]
        if c.num_single_layers:
            h = jnp.concatenate([ctx, x], axis=1)
            h, _ = _block_stack(SingleBlock, c, c.num_single_layers, "single_transformer_blocks", self.mesh,
                                self.rules)(h, temb, cos, sin)
            x = h[:, t_len:]
        if out_len is not None:
            x = x[:, :out_len]
        # AdaLayerNormContinuous chunks (scale, shift), in this order
        scale, shift = AdaNorm(c, 2, self.mesh, self.rules, name="norm_out")(temb)
        x = _ln(x) * (1 + scale[:, None]) + shift[:, None]
        return Dense(c.out_dim, ("embed", None), dt, c.param_dtype, name="proj_out")(x)


# ------------------------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------------------------
def _mesh_of(tree) -> Mesh | None:
    """The mesh of the first leaf when params were placed with a NamedSharding over >1 device (else None)."""
    leaves = jax.tree.leaves(tree)
    sh = getattr(leaves[0], "sharding", None) if leaves and not isinstance(leaves[0], jax.core.Tracer) else None
    return sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None


BLOCK_KEYS = ("transformer_blocks", "single_transformer_blocks")


def unstack_layers(cfg: FluxTransformerConfig, tree: dict) -> tuple[FluxTransformerConfig, dict]:
    """Stacked (scan) params or LoRA tree -> the per-layer inference layout; returns (cfg with scan_layers=False,
    tree). Outside jit this copies each block's weights once (jax.Arrays keep their devices/shardings)."""
    return cfg.replace(scan_layers=False), layer_layout.unstack_layers(tree, BLOCK_KEYS)


def stack_layers(cfg: FluxTransformerConfig, tree: dict) -> tuple[FluxTransformerConfig, dict]:
    """Per-layer tree -> the stacked (scan) layout; returns (cfg with scan_layers=True, tree)."""
    return cfg.replace(scan_layers=True), layer_layout.stack_layers(tree, BLOCK_KEYS)


def check_layout(cfg: FluxTransformerConfig, tree: dict, what: str = "params") -> None:
    """Raise a ValueError naming the block when a tree's layer layout does not match cfg.scan_layers."""
    for key in BLOCK_KEYS:
        if key in tree and layer_layout.is_per_layer(tree[key]) == cfg.scan_layers:
            have, want = (("per-layer", "stacked") if cfg.scan_layers else ("stacked", "per-layer"))
            fix = "flux.stack_layers" if cfg.scan_layers else "flux.unstack_layers"
            raise ValueError(f"transformer_forward: {what}['{key}'] is in the {have} layout but the config has "
                             f"scan_layers={cfg.scan_layers} ({want}); convert with {fix}(cfg, {what})")


def init_params(cfg: FluxTransformerConfig, rng: Array | int = 0, boxed: bool = False) -> dict:
    """Random params (tests, eval_shape). boxed=True keeps flax LogicallyPartitioned leaves."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    params = _init(cfg, rng)
    return params if boxed else nn.meta.unbox(params)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: FluxTransformerConfig, rng: Array) -> dict:
    b, s, t = 1, 4, 2
    half = cfg.attention_head_dim // 2
    cos, sin = jnp.ones((t + s, half), jnp.float32), jnp.zeros((t + s, half), jnp.float32)
    return FluxTransformer(cfg).init(
        rng, jnp.zeros((b, s, cfg.in_channels), cfg.dtype), jnp.zeros((b, t, cfg.joint_attention_dim), cfg.dtype),
        jnp.zeros((b, cfg.pooled_projection_dim), cfg.dtype), jnp.zeros((b,), jnp.float32),
        jnp.zeros((b,), jnp.float32) if cfg.guidance_embeds else None, cos, sin)["params"]


def param_logical_axes(cfg: FluxTransformerConfig) -> dict:
    """Tree (same structure as params) of PartitionSpecs of *logical* axis names, e.g. ('layers','embed','mlp')."""
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), boxed=True))
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: FluxTransformerConfig) -> dict:
    """Tree of jax.ShapeDtypeStruct without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_shardings(cfg: FluxTransformerConfig, mesh: Mesh, rules=None) -> dict:
    rules = parallel.DEFAULT_RULES if rules is None else rules
    return parallel.logical_shardings(param_logical_axes(cfg), mesh, rules, shapes=param_shapes(cfg))


def forward_with_rope(cfg: FluxTransformerConfig, params: dict, hidden_states, encoder_hidden_states,
                      pooled_projections, timestep, cos, sin, guidance=None, *, lora: dict | None = None,
                      lora_scale: float = 1.0, out_len: int | None = None, mesh: Mesh | None = None,
                      rules=None) -> Array:
    """Core forward given RoPE tables (cos, sin [S_txt+S_img, head_dim/2]); see `transformer_forward`."""
    from edit_r1_jax.models.lora import scale_lora
    mesh = _mesh_of(params) if mesh is None else mesh
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    check_layout(cfg, params)
    variables = {"params": params}
    if lora:
        variables["lora"] = scale_lora(lora, lora_scale)
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
        timestep = jnp.broadcast_to(timestep, (hidden_states.shape[0],))
    if guidance is not None:
        guidance = jnp.asarray(guidance)
        if guidance.ndim == 0:
            guidance = jnp.broadcast_to(guidance, (hidden_states.shape[0],))
    return _apply(cfg, mesh, rules, out_len, variables, jnp.asarray(hidden_states),
                  jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections), timestep, guidance, cos, sin)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _apply(cfg, mesh, rules, out_len, variables, hidden_states, encoder_hidden_states, pooled_projections, timestep,
           guidance, cos, sin):
    if "lora" in variables and not cfg.scan_layers:   # a stacked LoRA tree is sliced per layer inside the jit
        variables = {**variables, "lora": layer_layout.unstack_layers(variables["lora"], BLOCK_KEYS)}
    return FluxTransformer(cfg, mesh, rules).apply(variables, hidden_states, encoder_hidden_states,
                                                   pooled_projections, timestep, guidance, cos, sin, out_len)


def transformer_forward(tcfg: FluxTransformerConfig, tparams: dict, hidden_states, encoder_hidden_states,
                        pooled_projections, timestep, img_ids, txt_ids, guidance=None, *, lora: dict | None = None,
                        lora_scale: float = 1.0, mesh: Mesh | None = None, rules=None) -> Array:
    """Same semantics as diffusers `FluxTransformer2DModel.forward(..., return_dict=False)[0]`.

    hidden_states [B, S_img, in_channels] (Kontext: target tokens then reference tokens), encoder_hidden_states
    [B, S_txt, joint_attention_dim], pooled_projections [B, pooled_projection_dim], timestep [B] in [0, 1] (scaled by
    1000 inside), img_ids [S_img, 3], txt_ids [S_txt, 3] (a leading batch dim is dropped, as diffusers does),
    guidance [B] or None. Returns the velocity [B, S_img, out_channels] in tcfg.dtype.

    lora, lora_scale: optional adapter tree (models/lora.py `init_lora`) and its scale alpha/r, applied inside each
    adapted Dense as (x A)(scale B); the base params are not modified.
    mesh: apply activation sharding constraints on this mesh (default: the mesh of sharded params, if any).
    """
    img_ids = img_ids[0] if np.ndim(img_ids) == 3 else img_ids
    txt_ids = txt_ids[0] if np.ndim(txt_ids) == 3 else txt_ids
    if isinstance(img_ids, jax.core.Tracer) or isinstance(txt_ids, jax.core.Tracer):
        ids = jnp.concatenate([jnp.asarray(txt_ids, jnp.float32), jnp.asarray(img_ids, jnp.float32)], axis=0)
    else:
        ids = np.concatenate([np.asarray(txt_ids, np.float64), np.asarray(img_ids, np.float64)], axis=0)
    s_txt, s_img = np.shape(txt_ids)[0], np.shape(img_ids)[0]
    if np.shape(encoder_hidden_states)[1] != s_txt or np.shape(hidden_states)[1] != s_img:
        raise ValueError(f"transformer_forward: txt_ids has {s_txt} rows and img_ids {s_img}, but "
                         f"encoder_hidden_states is {tuple(np.shape(encoder_hidden_states))} and hidden_states "
                         f"{tuple(np.shape(hidden_states))}")
    cos, sin = rope_from_ids(ids, tcfg.axes_dims_rope, tcfg.theta)
    return forward_with_rope(tcfg, tparams, hidden_states, encoder_hidden_states, pooled_projections, timestep, cos,
                             sin, guidance, lora=lora, lora_scale=lora_scale, mesh=mesh, rules=rules)
