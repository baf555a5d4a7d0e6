"""A pixel-space "autoencoder" for the synthetic world: latents are the image itself, optionally average-pooled.

The tiny editor has no trained VAE, so its latent space is pixel space (decision for the synthetic world and
``configs/tiny.py``; the FLUX.1-Kontext config uses the real VAE). With an integer factor f:

    encode:  images [B, 3, H, W] in [-1, 1]  ->  latents [B, 3, H/f, W/f],  latent = mean of each f x f block
    decode:  latents [B, 3, h, w]            ->  images [B, 3, f*h, f*w],    every pixel of a block = its latent

i.e. decode(encode(x)) is the f x f block average of x and encode(decode(z)) == z exactly. The interface mirrors
``flux.vae_encode`` / ``flux.vae_decode`` (NCHW, images in [-1, 1], "unscaled" latents) and
``vae.normalize_latents`` / ``denormalize_latents`` (identity here), so the Kontext packing (2x2 patches ->
[B, (h/2)(w/2), 12]) and the pipeline code are shared with the VAE path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LATENT_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class PixelCodecConfig:
    """factor: integer down-sampling factor between pixels and latents (1 = latents are the pixels)."""
    factor: int = 1

    def __post_init__(self):
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"PixelCodecConfig.factor must be a positive integer, got {self.factor!r}")

    @property
    def latent_channels(self) -> int:
        return LATENT_CHANNELS

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (``KontextPipeline.vae_scale_factor`` for the VAE)."""
        return int(self.factor)

    def to_json(self) -> dict:
        return {"type": "pixel", "factor": int(self.factor)}

    @classmethod
    def from_json(cls, d: dict) -> "PixelCodecConfig":
        if d.get("type", "pixel") != "pixel":
            raise ValueError(f"PixelCodecConfig.from_json: type={d.get('type')!r}, expected 'pixel'")
        return cls(factor=int(d.get("factor", 1)))


def _check(x: jax.Array, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"pixel codec {what}: expected [B, 3, H, W], got shape {tuple(x.shape)}")


def encode(cfg: PixelCodecConfig, images_nchw: jax.Array) -> jax.Array:
    """Images [B, 3, H, W] in [-1, 1] -> latents [B, 3, H/f, W/f] (block means, float32)."""
    x = jnp.asarray(images_nchw, jnp.float32)
    _check(x, "encode")
    f = cfg.factor
    b, c, h, w = x.shape
    if h % f or w % f:
        raise ValueError(f"pixel codec encode: image size {h}x{w} is not divisible by factor {f}")
    if f == 1:
        return x
    return x.reshape(b, c, h // f, f, w // f, f).mean(axis=(3, 5))


def decode(cfg: PixelCodecConfig, latents_nchw: jax.Array) -> jax.Array:
    """Latents [B, 3, h, w] -> images [B, 3, f*h, f*w] in the latents' range (nearest up-sampling)."""
    z = jnp.asarray(latents_nchw, jnp.float32)
    _check(z, "decode")
    f = cfg.factor
    if f == 1:
        return z
    return jnp.repeat(jnp.repeat(z, f, axis=2), f, axis=3)


def normalize_latents(cfg: PixelCodecConfig, latents_nchw: jax.Array) -> jax.Array:
    """Identity (the VAE path applies (mean - shift) * scale here)."""
    del cfg
    return latents_nchw


def denormalize_latents(cfg: PixelCodecConfig, latents_nchw: jax.Array) -> jax.Array:
    """Identity (inverse of ``normalize_latents``)."""
    del cfg
    return latents_nchw
