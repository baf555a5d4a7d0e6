"""FLUX VAE (diffusers ``AutoencoderKL``, models.md §3): config, init, encode/decode, checkpoint load/save.

Inputs and outputs are NCHW like diffusers; the convolutions run NHWC inside. Params are a plain nested dict::

    {"encoder": {...}, "decoder": {...}, ["quant_conv": {...}], ["post_quant_conv": {...}]}

``vae_encode`` returns the posterior mean (``latent_dist.mode()``), *unscaled*; diffusion latents are
``normalize_latents(cfg, mean) = (mean - shift_factor) * scaling_factor`` and ``denormalize_latents`` undoes it
before ``vae_decode``. ``vae_decode`` returns the raw decoder output (images in about [-1, 1]); postprocess with
``clip(x / 2 + 0.5, 0, 1)``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.flux import encoders_convert as conv
from edit_r1_jax.models.flux.vae_blocks import Decoder, Encoder
from edit_r1_jax.models.safetensors_io import CheckpointError

DIFFUSERS_BASENAME = "diffusion_pytorch_model"
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Fields of diffusers' AutoencoderKL config.json (defaults: FLUX.1 VAE). Only DownEncoderBlock2D /
    UpDecoderBlock2D blocks exist in this architecture; ``from_diffusers`` rejects anything else."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    attn_query_chunk: int = 4096           # ours: query chunking of the mid-block attention (no numeric effect)
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)  # original config.json

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "VAEConfig":
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = list(d.get(key, [want] * n))
            if got != [want] * n:
                raise ValueError(f"VAE config.json: {key}={got} is not supported; expected {n} x '{want}'")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("hf_config_json", "attn_query_chunk"):
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw, hf_config_json=json.dumps(d))

    def to_diffusers(self) -> dict[str, Any]:
        d = json.loads(self.hf_config_json) if self.hf_config_json else {}
        n = len(self.block_out_channels)
        d.update({"_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D"] * n,
                  "up_block_types": ["UpDecoderBlock2D"] * n})
        d.setdefault("_diffusers_version", "0.42.1")
        for f in dataclasses.fields(self):
            if f.name in ("hf_config_json", "attn_query_chunk"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def _encoder(cfg: VAEConfig) -> Encoder:
    return Encoder(cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, cfg.norm_num_groups,
                   cfg.act_fn, cfg.mid_block_add_attention, cfg.attn_query_chunk)


def _decoder(cfg: VAEConfig) -> Decoder:
    return Decoder(cfg.block_out_channels, cfg.layers_per_block, cfg.out_channels, cfg.norm_num_groups,
                   cfg.act_fn, cfg.mid_block_add_attention, cfg.attn_query_chunk)


def _conv1x1(features: int) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding="VALID")


def _flax_init(cfg: VAEConfig, rng: jax.Array) -> dict[str, Any]:
    """Flax init of every submodule (only ever traced, through ``jax.eval_shape``, for the param structure)."""
    r_enc, r_dec, r_q, r_pq = jax.random.split(rng, 4)
    f = 2 ** (len(cfg.block_out_channels) - 1)
    img = jnp.zeros((1, 8 * f, 8 * f, cfg.in_channels), jnp.float32)
    lat = jnp.zeros((1, 8, 8, cfg.latent_channels), jnp.float32)
    params = {"encoder": _encoder(cfg).init(r_enc, img)["params"],
              "decoder": _decoder(cfg).init(r_dec, lat)["params"]}
    if cfg.use_quant_conv:
        params["quant_conv"] = _conv1x1(2 * cfg.latent_channels).init(
            r_q, jnp.zeros((1, 8, 8, 2 * cfg.latent_channels)))["params"]
    if cfg.use_post_quant_conv:
        params["post_quant_conv"] = _conv1x1(cfg.latent_channels).init(r_pq, lat)["params"]
    return params


@functools.lru_cache(maxsize=32)
def _shapes(cfg: VAEConfig, dtype_name: str):
    dtype = jnp.dtype(dtype_name)
    shapes = jax.eval_shape(lambda: _flax_init(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def vae_param_shapes(cfg: VAEConfig, dtype=jnp.float32) -> dict[str, Any]:
    """Tree of ShapeDtypeStructs matching ``init_vae`` (no allocation)."""
    return _shapes(cfg, jnp.dtype(dtype).name)


def init_vae(cfg: VAEConfig, rng: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random params for ``cfg`` (kernels N(0, 1/fan_in), norms 1/0, biases 0), drawn on the host so no XLA
    compilation is needed; deterministic in ``rng``."""
    return conv.random_params(vae_param_shapes(cfg, dtype), rng)


def _param_dtype(params) -> jnp.dtype:
    return params["encoder"]["conv_in"]["kernel"].dtype if "encoder" in params else \
        params["decoder"]["conv_in"]["kernel"].dtype


@functools.partial(jax.jit, static_argnums=0)
def vae_posterior(cfg: VAEConfig, params: dict[str, Any], images_nchw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B,C,H,W] (in [-1, 1]) -> (mean, logvar) each [B, latent, H/f, W/f]; logvar clamped to [-30, 20]."""
    x_bhwc = jnp.transpose(images_nchw, (0, 2, 3, 1)).astype(_param_dtype(params))
    m_bhwc = _encoder(cfg).apply({"params": params["encoder"]}, x_bhwc)
    if cfg.use_quant_conv:
        m_bhwc = _conv1x1(2 * cfg.latent_channels).apply({"params": params["quant_conv"]}, m_bhwc)
    mean_bhwc, logvar_bhwc = jnp.split(m_bhwc, 2, axis=-1)   # torch.chunk(2, dim=1): mean first
    logvar_bhwc = jnp.clip(logvar_bhwc, LOGVAR_MIN, LOGVAR_MAX)
    return jnp.transpose(mean_bhwc, (0, 3, 1, 2)), jnp.transpose(logvar_bhwc, (0, 3, 1, 2))


def vae_encode(cfg: VAEConfig, params: dict[str, Any], images_nchw: jax.Array) -> jax.Array:
    """Images [B,C,H,W] in [-1, 1] -> posterior mean (``latent_dist.mode()``), unscaled, [B, latent, H/f, W/f]."""
    return vae_posterior(cfg, params, images_nchw)[0]


@functools.partial(jax.jit, static_argnums=0)
def vae_decode(cfg: VAEConfig, params: dict[str, Any], latents_nchw: jax.Array) -> jax.Array:
    """Unscaled latents [B, latent, h, w] -> decoder output [B, out_channels, h*f, w*f] (about [-1, 1])."""
    z_bhwc = jnp.transpose(latents_nchw, (0, 2, 3, 1)).astype(_param_dtype(params))
    if cfg.use_post_quant_conv:
        z_bhwc = _conv1x1(cfg.latent_channels).apply({"params": params["post_quant_conv"]}, z_bhwc)
    x_bhwc = _decoder(cfg).apply({"params": params["decoder"]}, z_bhwc)
    return jnp.transpose(x_bhwc, (0, 3, 1, 2))


def normalize_latents(cfg: VAEConfig, mean_nchw: jax.Array) -> jax.Array:
    """Posterior mean -> diffusion latents: (mean - shift_factor) * scaling_factor."""
    return (mean_nchw - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def denormalize_latents(cfg: VAEConfig, latents_nchw: jax.Array) -> jax.Array:
    """Diffusion latents -> VAE latents: latents / scaling_factor + shift_factor."""
    return latents_nchw / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def postprocess_images(images_nchw: jax.Array) -> jax.Array:
    """Decoder output -> [0, 1]: clip(x / 2 + 0.5, 0, 1) (diffusers VaeImageProcessor.denormalize)."""
    return jnp.clip(images_nchw / 2 + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- sharding
def param_logical_axes(cfg: VAEConfig) -> dict[str, Any]:
    """Logical axis names per leaf: conv kernels (None, None, conv_in, conv_out), Dense (1x1 attention
    projections) (conv_in, conv_out), biases (conv_out,), GroupNorm (norm,)."""
    def axes(path, s):
        leaf = path[-1]
        if leaf == "kernel":
            return (None, None, "conv_in", "conv_out") if len(s.shape) == 4 else ("conv_in", "conv_out")
        if leaf == "bias" and not _is_norm(path):
            return ("conv_out",)
        return ("norm",)
    return conv.map_with_path(axes, vae_param_shapes(cfg))


def _is_norm(path) -> bool:
    return any("norm" in p for p in path[-2:-1])


# ----------------------------------------------------------------------------------------------- checkpoints
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_name(path: tuple[str, ...]) -> str:
    """("encoder","down_blocks_0","resnets_1","norm1","scale") -> "encoder.down_blocks.0.resnets.1.norm1.weight"."""
    parts = []
    for p in path[:-1]:
        m = _INDEXED.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


def vae_tensor_maps(cfg: VAEConfig) -> list[conv.TensorMap]:
    return [conv.TensorMap(p, (_torch_name(p),)) for p in conv.flatten(vae_param_shapes(cfg))]


def load_vae(path: str, dtype=jnp.float32, mesh=None, rules=None) -> tuple[VAEConfig, dict[str, Any]]:
    """Load a diffusers AutoencoderKL folder (``vae/`` or a pipeline directory containing it).

    Reads ``config.json`` and ``diffusion_pytorch_model*.safetensors`` (sharded index and bf16 included), casts to
    ``dtype`` and, with ``mesh``, places every tensor directly onto its NamedSharding (``param_logical_axes``).
    Raises ``CheckpointError`` listing every missing/unexpected/mis-shaped tensor.
    """
    folder = conv.resolve_folder(path, "vae")
    raw = conv.read_json(folder)
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{folder}/config.json: _class_name={raw['_class_name']!r}, expected 'AutoencoderKL'")
    cfg = VAEConfig.from_diffusers(raw)
    shapes = vae_param_shapes(cfg, dtype)
    shardings = None if mesh is None else conv.shardings_for(param_logical_axes(cfg), shapes, mesh, rules)
    reader = conv.open_reader(folder, DIFFUSERS_BASENAME)
    params = conv.load_mapped(reader, vae_tensor_maps(cfg), conv.flatten(shapes), source=folder, shardings=shardings)
    return cfg, params


def save_vae(cfg: VAEConfig, params: dict[str, Any], out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write a folder ``AutoencoderKL.from_pretrained(out_dir)`` loads (params keep their dtype)."""
    maps = vae_tensor_maps(cfg)
    expected = {m.flax_path: s.shape for m, s in zip(maps, conv.flatten(vae_param_shapes(cfg)).values())}
    got = {p: np.shape(v) for p, v in conv.flatten(params).items()}
    bad = [f"{'/'.join(p)}: expected {s}, got {got.get(p)}" for p, s in expected.items() if got.get(p) != s]
    if bad or set(got) - set(expected):
        extra = ["unexpected leaf " + "/".join(p) for p in set(got) - set(expected)]
        raise CheckpointError("save_vae: params do not match the config:\n  " + "\n  ".join(bad + extra))
    return conv.save_mapped(params, maps, out_dir, DIFFUSERS_BASENAME, cfg.to_diffusers(), max_shard_bytes)
