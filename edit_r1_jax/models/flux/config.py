"""FLUX.1 transformer config (mirrors diffusers `FluxTransformer2DModel`'s config.json, plus JAX-only knobs).

Diffusers fields keep diffusers' names so `config.json` round-trips. JAX-only fields (dtype, remat, attention
backend) never go into config.json.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# config.json keys written by save_transformer (diffusers' register_to_config arguments).
DIFFUSERS_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                    "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                    "guidance_embeds", "axes_dims_rope")


@dataclasses.dataclass(frozen=True)
class FluxTransformerConfig:
    """Architecture (diffusers names) + JAX execution options.

    dtype: activation/compute dtype; param_dtype: dtype params are created/loaded in.
    remat: "none" | "full" | "dots" (jax.checkpoint policy per block; "dots" saves matmul outputs without batch dims).
    attention_backend: passed to `layers.attention` ("xla" | "splash").
    scan_layers: True (default; training, checkpoints) runs each block group with `nn.scan` over params stacked on
        a leading layer axis; False runs a Python loop over per-layer params (`transformer_blocks/layers_{i}/...`,
        see models/layer_layout.py), an inference layout without per-iteration weight slices (~3 % faster on the
        CPU benchmark), one compiled body per block. Convert with `flux.unstack_layers` / `flux.stack_layers`, or
        load with scan_layers=False.
    """
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000           # hard-coded in diffusers (FluxPosEmbed(theta=10000))
    mlp_ratio: float = 4.0       # hard-coded in diffusers (FluxSingleTransformerBlock / FeedForward mult=4)
    # JAX-only
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_backend: str = "xla"
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"FluxTransformerConfig: sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                             f"attention_head_dim={self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError("FluxTransformerConfig: every axes_dims_rope entry must be even, got "
                             f"{self.axes_dims_rope}")
        if self.patch_size != 1:
            raise ValueError(f"FluxTransformerConfig: patch_size={self.patch_size} is not supported (FLUX uses 1; "
                             "2x2 packing happens in the pipeline)")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"FluxTransformerConfig: remat must be 'none', 'full' or 'dots', got {self.remat!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    def replace(self, **kw) -> "FluxTransformerConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> "FluxTransformerConfig":
        """From a diffusers config.json dict (unknown/private keys such as `_class_name` are ignored)."""
        cls_name = d.get("_class_name")
        if cls_name not in (None, "FluxTransformer2DModel"):
            raise ValueError(f"transformer config.json: _class_name is {cls_name!r}, expected 'FluxTransformer2DModel'")
        kw = {k: d[k] for k in DIFFUSERS_FIELDS if k in d}
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers(self) -> dict:
        out = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}
        for k in DIFFUSERS_FIELDS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def kontext_dev_config(**overrides) -> FluxTransformerConfig:
    """FLUX.1-Kontext-dev transformer (models.md 2.1): 19 double + 38 single blocks, 24x128 heads, guidance embeds."""
    base = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    base.update(overrides)
    return FluxTransformerConfig(**base)
