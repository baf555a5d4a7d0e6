"""T5 v1.1 encoder (transformers ``T5EncoderModel``, FLUX ``text_encoder_2/``; models.md §4.1) in Flax Linen.

    x = shared[ids]                                          (no embedding scale)
    per layer (nn.scan over ``num_layers``, params stacked on a leading axis):
        x = x + o(softmax(q k^T + position_bias + mask) v)   on T5LayerNorm(x)   (scores NOT scaled)
        x = x + wo(act(wi_0 h) * wi_1 h)                      h = T5LayerNorm(x)  (gated; wo(act(wi h)) if not)
    out = T5LayerNorm_final(x)

``position_bias`` [1, H, T, T] comes from layer 0's relative-attention-bias table and is shared by every layer.
The residual stream is kept in float32: with bf16 weights transformers keeps ``wo`` in float32
(``_keep_in_fp32_modules``), which makes its residual stream float32 after the first feed-forward; ``load_t5``
keeps ``wo`` in float32 likewise (``fp32_wo=True``).

Params (nested dict)::

    shared/embedding [V, D]                relative_attention_bias/embedding [num_buckets, H]
    layers/attn_norm/scale [L, D]          layers/self_attn/{q,k,v}/kernel [L, D, H*dk], o/kernel [L, H*dk, D]
    layers/mlp_norm/scale [L, D]           layers/mlp/{wi_0,wi_1}/kernel [L, D, F] (or wi), wo/kernel [L, F, D]
    final_layer_norm/scale [D]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.flux import encoders_convert as conv
from edit_r1_jax.models.layers import attention

TRANSFORMERS_BASENAME = "model"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers T5Config fields used by the encoder (defaults: T5-v1.1-XXL as in FLUX ``text_encoder_2``)."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    attention_backend: str = "xla"                  # ours: layers.attention backend
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """transformers' rule: 'gated-gelu' means tanh GELU ('gelu_new'); otherwise the name after 'gated-'."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> "T5Config":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "hf_config_json"}
        cfg = cls(**kw, hf_config_json=json.dumps(d))
        _act(cfg.dense_act_fn)  # validate early
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        d = json.loads(self.hf_config_json) if self.hf_config_json else {
            "model_type": "t5", "is_encoder_decoder": False, "tie_word_embeddings": False, "pad_token_id": 0,
            "eos_token_id": 1, "decoder_start_token_id": 0, "dropout_rate": 0.1, "initializer_factor": 1.0}
        d["architectures"] = ["T5EncoderModel"]
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("hf_config_json", "attention_backend")})
        d.update({"dense_act_fn": self.dense_act_fn, "is_gated_act": self.is_gated})
        return d


def _act(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"T5 activation '{name}' (from feed_forward_proj) is not supported")


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[q_len, k_len] int32 bucket ids of rel = key_pos - query_pos (bidirectional), computed on the host in
    float32 exactly as transformers' ``T5Attention._relative_position_bucket``."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    nb = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * nb
    n = np.abs(rel)
    max_exact = nb // 2
    large = max_exact + (np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
                         / np.float32(math.log(max_distance / max_exact)) * (nb - max_exact)).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return (buckets + np.where(n < max_exact, n, large)).astype(np.int32)


def t5_layer_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) in float32, cast to the weight dtype if half, times weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale.dtype in (jnp.bfloat16, jnp.float16):
        y = y.astype(scale.dtype)
    return scale * y


class T5LayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return t5_layer_norm(x, scale, self.eps)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name)


class T5SelfAttention(nn.Module):
    """T5Attention (encoder self-attention): q, k, v, o without bias; unscaled scores + position bias."""
    cfg: T5Config

    @nn.compact
    def __call__(self, h_btd, bias_1htt, kv_segment_ids):
        c = self.cfg
        b, t, _ = h_btd.shape
        inner = c.num_heads * c.d_kv
        q_bthd = _dense(inner, "q")(h_btd).reshape(b, t, c.num_heads, c.d_kv)
        k_bshd = _dense(inner, "k")(h_btd).reshape(b, t, c.num_heads, c.d_kv)
        v_bshd = _dense(inner, "v")(h_btd).reshape(b, t, c.num_heads, c.d_kv)
        o_bthd = attention(q_bthd, k_bshd, v_bshd, kv_segment_ids=kv_segment_ids, bias=bias_1htt, scale=1.0,
                           backend=c.attention_backend)
        return _dense(c.d_model, "o")(o_bthd.reshape(b, t, inner))


class T5MLP(nn.Module):
    """T5DenseGatedActDense (wi_0, wi_1, wo) or T5DenseActDense (wi, wo); the input of wo is promoted to wo's
    dtype, as transformers casts it when ``wo`` is kept in float32."""
    cfg: T5Config

    @nn.compact
    def __call__(self, h_btd):
        c = self.cfg
        act = _act(c.dense_act_fn)
        if c.is_gated:
            f_btf = act(_dense(c.d_ff, "wi_0")(h_btd)) * _dense(c.d_ff, "wi_1")(h_btd)
        else:
            f_btf = act(_dense(c.d_ff, "wi")(h_btd))
        return _dense(c.d_model, "wo")(f_btf)  # Dense promotes to wo's dtype (float32 wo -> float32 matmul)


class T5Block(nn.Module):
    """One encoder block (T5LayerSelfAttention + T5LayerFF); carry = float32 residual stream."""
    cfg: T5Config

    @nn.compact
    def __call__(self, x_btd, bias_1htt, kv_segment_ids):
        eps = self.cfg.layer_norm_epsilon
        h = T5LayerNorm(eps, name="attn_norm")(x_btd)
        x_btd = x_btd + T5SelfAttention(self.cfg, name="self_attn")(h, bias_1htt, kv_segment_ids).astype(x_btd.dtype)
        h = T5LayerNorm(eps, name="mlp_norm")(x_btd)
        x_btd = x_btd + T5MLP(self.cfg, name="mlp")(h).astype(x_btd.dtype)
        return x_btd, None


class T5Encoder(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.cfg
        t = input_ids.shape[1]
        x_btd = nn.Embed(c.vocab_size, c.d_model, name="shared")(input_ids).astype(jnp.float32)
        buckets_tt = relative_position_buckets(t, t, c.relative_attention_num_buckets,
                                               c.relative_attention_max_distance)
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, name="relative_attention_bias")
        bias_1htt = jnp.transpose(table(jnp.asarray(buckets_tt)), (2, 0, 1))[None]
        kv_seg = None if attention_mask is None else attention_mask.astype(jnp.int32)
        stack = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers)
        x_btd, _ = stack(c, name="layers")(x_btd, bias_1htt, kv_seg)
        return T5LayerNorm(c.layer_norm_epsilon, name="final_layer_norm")(x_btd)


@functools.partial(jax.jit, static_argnums=0)
def t5_encode(cfg: T5Config, params: dict[str, Any], input_ids: jax.Array,
              attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T] (attention_mask [B, T] of 1/0 or None, as FLUX calls it) -> last_hidden_state [B, T, D]
    in the dtype of the final layer norm weight."""
    return T5Encoder(cfg).apply({"params": params}, input_ids, attention_mask)


# ----------------------------------------------------------------------------------------------- params
@functools.lru_cache(maxsize=32)
def _shapes(cfg: T5Config, dtype_name: str, fp32_wo: bool):
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: T5Encoder(cfg).init(jax.random.key(0), ids)["params"])
    dtype = jnp.dtype(dtype_name)
    return conv.map_with_path(
        lambda p, s: jax.ShapeDtypeStruct(s.shape, jnp.float32 if (fp32_wo and p[-2] == "wo") else dtype), shapes)


def t5_param_shapes(cfg: T5Config, dtype=jnp.float32, fp32_wo: bool = False) -> dict[str, Any]:
    return _shapes(cfg, jnp.dtype(dtype).name, fp32_wo)


def init_t5(cfg: T5Config, rng: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random params (host-side; kernels N(0, 1/fan_in), embeddings N(0, 0.02^2), norms 1)."""
    return conv.random_params(t5_param_shapes(cfg, dtype), rng)


def param_logical_axes(cfg: T5Config) -> dict[str, Any]:
    table = {"shared": ("vocab", "embed"), "relative_attention_bias": (None, "heads"),
             "q": ("layers", "embed", "q_heads_dim"), "k": ("layers", "embed", "kv_heads_dim"),
             "v": ("layers", "embed", "kv_heads_dim"), "o": ("layers", "q_heads_dim", "embed"),
             "wi": ("layers", "embed", "mlp"), "wi_0": ("layers", "embed", "mlp"),
             "wi_1": ("layers", "embed", "mlp"), "wo": ("layers", "mlp", "embed"),
             "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"), "final_layer_norm": ("norm",)}
    return conv.map_with_path(lambda p, s: table[p[-2]], t5_param_shapes(cfg))


def t5_tensor_maps(cfg: T5Config) -> list[conv.TensorMap]:
    L = range(cfg.num_layers)
    maps = [conv.TensorMap(("shared", "embedding"), ("shared.weight",)),
            conv.TensorMap(("relative_attention_bias", "embedding"),
                           ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
            conv.TensorMap(("final_layer_norm", "scale"), ("encoder.final_layer_norm.weight",))]

    def stacked(path, fmt):
        maps.append(conv.TensorMap(path, tuple(fmt.format(i=i) for i in L), stacked=True))

    stacked(("layers", "attn_norm", "scale"), "encoder.block.{i}.layer.0.layer_norm.weight")
    for n in "qkvo":
        stacked(("layers", "self_attn", n, "kernel"), "encoder.block.{i}.layer.0.SelfAttention.%s.weight" % n)
    stacked(("layers", "mlp_norm", "scale"), "encoder.block.{i}.layer.1.layer_norm.weight")
    for n in (("wi_0", "wi_1") if cfg.is_gated else ("wi",)) + ("wo",):
        stacked(("layers", "mlp", n, "kernel"), "encoder.block.{i}.layer.1.DenseReluDense.%s.weight" % n)
    return maps


def load_t5(path: str, dtype=jnp.float32, mesh=None, rules=None, fp32_wo: bool = True) -> tuple[T5Config, dict]:
    """Load a transformers T5EncoderModel folder (``text_encoder_2/`` or a pipeline directory containing it).

    ``model*.safetensors`` (sharded index, bf16) -> params in ``dtype`` (``wo`` kept float32 when ``fp32_wo``, as
    transformers does), placed onto ``mesh`` per ``param_logical_axes`` when given. ``shared.weight`` may be stored
    as ``encoder.embed_tokens.weight``. Raises ``CheckpointError`` listing every missing/extra/mis-shaped tensor.
    """
    folder = conv.resolve_folder(path, "text_encoder_2")
    raw = conv.read_json(folder)
    if raw.get("model_type", "t5") not in ("t5", "umt5"):
        raise ValueError(f"{folder}/config.json: model_type={raw.get('model_type')!r}, expected 't5'")
    cfg = T5Config.from_transformers(raw)
    shapes = t5_param_shapes(cfg, dtype, fp32_wo)
    shardings = None if mesh is None else conv.shardings_for(param_logical_axes(cfg), shapes, mesh, rules)
    reader = conv.open_reader(folder, TRANSFORMERS_BASENAME)
    params = conv.load_mapped(reader, t5_tensor_maps(cfg), conv.flatten(shapes), source=folder, shardings=shardings,
                              aliases={"shared.weight": "encoder.embed_tokens.weight"})
    return cfg, params


def save_t5(cfg: T5Config, params: dict[str, Any], out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write a folder ``T5EncoderModel.from_pretrained(out_dir)`` loads (``model.safetensors`` + config.json)."""
    return conv.save_mapped(params, t5_tensor_maps(cfg), out_dir, TRANSFORMERS_BASENAME, cfg.to_transformers(),
                            max_shard_bytes)
