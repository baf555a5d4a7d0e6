"""CLIP text model (transformers ``CLIPTextModel``, FLUX ``text_encoder/``; models.md §4.2) in Flax Linen.

    x = token_embedding[ids] + position_embedding[0..T-1]
    per layer (nn.scan, params stacked on a leading axis), pre-LN, causal self-attention:
        x = x + out_proj(attn(LN1(x)))          q/k/v/out with bias, scale head_dim^-0.5
        x = x + fc2(act(fc1(LN2(x))))           act = quick_gelu (x*sigmoid(1.702x)) or as configured
    h = final_layer_norm(x)
    pooled = h[b, argmax(ids[b])]               if eos_token_id == 2 (legacy configs: EOT has the largest id)
           = h[b, first t with ids[b,t] == eos_token_id]   otherwise

Params (nested dict)::

    token_embedding/embedding [V, D]        position_embedding/embedding [P, D]
    layers/layer_norm1/{scale,bias} [L, D]  layers/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel [L,D,D], bias}
    layers/layer_norm2/{scale,bias}         layers/mlp/fc1/{kernel [L,D,F], bias}, fc2/{kernel [L,F,D], bias}
    final_layer_norm/{scale,bias} [D]
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edit_r1_jax.models.flux import encoders_convert as conv
from edit_r1_jax.models.layers import attention, layer_norm

TRANSFORMERS_BASENAME = "model"
HUB_PREFIX = "text_model."          # Hub files (and our saves) carry it; transformers 5 strips it on load
IGNORED = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields (defaults: CLIP ViT-L/14 text model as in FLUX ``text_encoder``)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    projection_dim: int = 768
    attention_backend: str = "xla"                   # ours: layers.attention backend
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        if d.get("model_type") == "clip" and "text_config" in d:    # a full CLIPConfig: take its text part
            d = {**d["text_config"], "model_type": "clip_text_model"}
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "hf_config_json"}
        cfg = cls(**kw, hf_config_json=json.dumps(d))
        _act(cfg.hidden_act)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size={cfg.hidden_size} is not divisible by "
                             f"num_attention_heads={cfg.num_attention_heads}")
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        d = json.loads(self.hf_config_json) if self.hf_config_json else {
            "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
        d.update({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"})
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("hf_config_json", "attention_backend")})
        return d


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"CLIP hidden_act '{name}' is not supported")


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm(D, eps): params scale, bias."""
    eps: float

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return layer_norm(x, scale, bias, self.eps)


class CLIPAttention(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, h_btd, kv_segment_ids):
        c = self.cfg
        b, t, d = h_btd.shape
        shape = (b, t, c.num_attention_heads, c.head_dim)
        q_bthd = nn.Dense(d, name="q_proj")(h_btd).reshape(shape)
        k_bshd = nn.Dense(d, name="k_proj")(h_btd).reshape(shape)
        v_bshd = nn.Dense(d, name="v_proj")(h_btd).reshape(shape)
        o_bthd = attention(q_bthd, k_bshd, v_bshd, causal=True, kv_segment_ids=kv_segment_ids,
                           scale=c.head_dim ** -0.5, backend=c.attention_backend)
        return nn.Dense(d, name="out_proj")(o_bthd.reshape(b, t, d))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(h)))."""
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, h_btd):
        c = self.cfg
        h_btf = _act(c.hidden_act)(nn.Dense(c.intermediate_size, name="fc1")(h_btd))
        return nn.Dense(c.hidden_size, name="fc2")(h_btf)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN layer: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x_btd, kv_segment_ids):
        c = self.cfg
        x_btd = x_btd + CLIPAttention(c, name="self_attn")(LayerNorm(c.layer_norm_eps, name="layer_norm1")(x_btd),
                                                            kv_segment_ids)
        h = LayerNorm(c.layer_norm_eps, name="layer_norm2")(x_btd)
        return x_btd + CLIPMLP(c, name="mlp")(h), None


class CLIPTextTransformer(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.cfg
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ValueError(f"CLIP: sequence length {t} exceeds max_position_embeddings={c.max_position_embeddings}")
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(jnp.arange(t))
        x_btd = tok + pos[None]
        kv_seg = None if attention_mask is None else attention_mask.astype(jnp.int32)
        stack = nn.scan(CLIPEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,), length=c.num_hidden_layers)
        x_btd, _ = stack(c, name="layers")(x_btd, kv_seg)
        h_btd = LayerNorm(c.layer_norm_eps, name="final_layer_norm")(x_btd)
        if c.eos_token_id == 2:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled_bd = jnp.take_along_axis(h_btd, eos_pos[:, None, None], axis=1)[:, 0]
        return h_btd, pooled_bd


@functools.partial(jax.jit, static_argnums=0)
def clip_encode(cfg: CLIPTextConfig, params: dict[str, Any], input_ids: jax.Array,
                attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """input_ids [B, T<=77] (attention_mask [B, T] 1/0 or None, as FLUX calls it) ->
    (last_hidden_state [B, T, D], pooled_output [B, D]) exactly as CLIPTextModel returns them."""
    return CLIPTextTransformer(cfg).apply({"params": params}, input_ids, attention_mask)


# ----------------------------------------------------------------------------------------------- params
@functools.lru_cache(maxsize=32)
def _shapes(cfg: CLIPTextConfig, dtype_name: str):
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: CLIPTextTransformer(cfg).init(jax.random.key(0), ids)["params"])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype_name)), shapes)


def clip_param_shapes(cfg: CLIPTextConfig, dtype=jnp.float32) -> dict[str, Any]:
    return _shapes(cfg, jnp.dtype(dtype).name)


def init_clip(cfg: CLIPTextConfig, rng: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random params (host-side; kernels N(0, 1/fan_in), embeddings N(0, 0.02^2), norms 1/0, biases 0)."""
    return conv.random_params(clip_param_shapes(cfg, dtype), rng)


def param_logical_axes(cfg: CLIPTextConfig) -> dict[str, Any]:
    kernels = {"q_proj": ("layers", "embed", "q_heads_dim"), "k_proj": ("layers", "embed", "kv_heads_dim"),
               "v_proj": ("layers", "embed", "kv_heads_dim"), "out_proj": ("layers", "q_heads_dim", "embed"),
               "fc1": ("layers", "embed", "mlp"), "fc2": ("layers", "mlp", "embed")}

    def axes(p, s):
        mod, leaf = p[-2], p[-1]
        if mod == "token_embedding":
            return ("vocab", "embed")
        if mod == "position_embedding":
            return (None, "embed")
        if mod.startswith("layer_norm") or mod == "final_layer_norm":
            return ("layers", "norm") if p[0] == "layers" else ("norm",)
        if leaf == "kernel":
            return kernels[mod]
        return ("layers", kernels[mod][-1])   # bias: the kernel's output axis
    return conv.map_with_path(axes, clip_param_shapes(cfg))


def clip_tensor_maps(cfg: CLIPTextConfig) -> list[conv.TensorMap]:
    """Canonical (transformers 5 module) names, without the Hub ``text_model.`` prefix."""
    L = range(cfg.num_hidden_layers)
    maps = [conv.TensorMap(("token_embedding", "embedding"), ("embeddings.token_embedding.weight",)),
            conv.TensorMap(("position_embedding", "embedding"), ("embeddings.position_embedding.weight",)),
            conv.TensorMap(("final_layer_norm", "scale"), ("final_layer_norm.weight",)),
            conv.TensorMap(("final_layer_norm", "bias"), ("final_layer_norm.bias",))]
    subs = [("layer_norm1",), ("layer_norm2",), ("self_attn", "q_proj"), ("self_attn", "k_proj"),
            ("self_attn", "v_proj"), ("self_attn", "out_proj"), ("mlp", "fc1"), ("mlp", "fc2")]
    for sub in subs:
        norm = sub[0].startswith("layer_norm")
        torch_mod = ".".join(sub)
        for leaf, tleaf in ((("scale" if norm else "kernel"), "weight"), ("bias", "bias")):
            maps.append(conv.TensorMap(("layers",) + sub + (leaf,),
                                       tuple(f"encoder.layers.{i}.{torch_mod}.{tleaf}" for i in L), stacked=True))
    return maps


def _strip_prefix(name: str) -> str:
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name


def load_clip(path: str, dtype=jnp.float32, mesh=None, rules=None) -> tuple[CLIPTextConfig, dict[str, Any]]:
    """Load a transformers CLIPTextModel folder (``text_encoder/`` or a pipeline directory containing it).

    Accepts Hub names (``text_model.`` prefix) and transformers-5 names; ignores the ``position_ids`` buffer.
    Raises ``CheckpointError`` listing every missing/extra/mis-shaped tensor.
    """
    folder = conv.resolve_folder(path, "text_encoder")
    raw = conv.read_json(folder)
    if raw.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"{folder}/config.json: model_type={raw.get('model_type')!r}, expected 'clip_text_model'")
    cfg = CLIPTextConfig.from_transformers(raw)
    shapes = clip_param_shapes(cfg, dtype)
    shardings = None if mesh is None else conv.shardings_for(param_logical_axes(cfg), shapes, mesh, rules)
    reader = conv.open_reader(folder, TRANSFORMERS_BASENAME)
    params = conv.load_mapped(reader, clip_tensor_maps(cfg), conv.flatten(shapes), source=folder,
                              shardings=shardings, rename=_strip_prefix, ignore=IGNORED)
    return cfg, params


def save_clip(cfg: CLIPTextConfig, params: dict[str, Any], out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write a folder ``CLIPTextModel.from_pretrained(out_dir)`` loads, in the Hub layout (``text_model.`` names,
    which transformers 4.x and 5.x both read)."""
    maps = [dataclasses.replace(m, torch_names=tuple(HUB_PREFIX + n for n in m.torch_names))
            for m in clip_tensor_maps(cfg)]
    return conv.save_mapped(params, maps, out_dir, TRANSFORMERS_BASENAME, cfg.to_transformers(), max_shard_bytes)
