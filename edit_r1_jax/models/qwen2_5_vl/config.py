"""Qwen2.5-VL configuration: one frozen (hashable) dataclass built from a transformers ``config.json``.

Accepts both layouts transformers reads:
  * v5 nested: ``{"text_config": {...}, "vision_config": {...}, "image_token_id": ...}``
  * legacy flat (the Hub's Qwen2.5-VL-3B/7B-Instruct files): text fields at the top level, ``rope_scaling``
    ``{"type": "mrope", "mrope_section": [...]}``, ``vision_config`` nested.
``to_hf_dict`` writes the v5 nested form back (transformers 5 loads it).

Runtime options (not in config.json): ``attention_backend`` ("xla" | "splash"), ``remat_policy`` (see
``text.REMAT_POLICIES``), ``scan_layers`` is always on (params carry a leading 'layers' axis).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2_5_VLVisionConfig fields used by the vision tower (§1.3)."""
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2_5_VLTextConfig fields used by the decoder (§1.5)."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    # runtime options
    attention_backend: str = "xla"
    remat_policy: str = "none"

    def replace(self, **kw) -> "Qwen25VLConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "Qwen25VLConfig":
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text_config.hidden_size={t.hidden_size} is not divisible by "
                             f"num_attention_heads={t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text_config.num_attention_heads={t.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={t.num_key_value_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"text rope mrope_section={list(t.mrope_section)} must sum to head_dim/2="
                             f"{t.head_dim // 2}")
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision_config.hidden_size={v.hidden_size} not divisible by num_heads={v.num_heads}")
        if v.head_dim % 4:
            raise ValueError(f"vision head_dim={v.head_dim} must be a multiple of 4 (2-D rotary)")
        if t.hidden_act != "silu" or v.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported (text {t.hidden_act!r}, vision {v.hidden_act!r})")
        if self.attention_backend not in ("xla", "splash"):
            raise ValueError(f"attention_backend={self.attention_backend!r}: expected 'xla' or 'splash'")
        return self


def _pick(d: dict, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _rope(d: dict) -> tuple[float, tuple[int, ...]]:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 1e6))
    section = rp.get("mrope_section", [16, 24, 24])
    return float(theta), tuple(int(s) for s in section)


def _ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_dict(d: dict[str, Any], **runtime) -> Qwen25VLConfig:
    """Build the config from a parsed HF ``config.json`` (nested v5 or flat legacy form)."""
    text_d = dict(d["text_config"]) if isinstance(d.get("text_config"), dict) else dict(d)
    theta, section = _rope(text_d if ("rope_parameters" in text_d or "rope_scaling" in text_d) else d)
    text_kw = _pick(text_d, TextConfig)
    text_kw.update(rope_theta=theta, mrope_section=section)
    text_kw.pop("head_dim", None)
    if text_kw.get("num_key_value_heads") is None:
        text_kw["num_key_value_heads"] = text_d.get("num_attention_heads", TextConfig.num_attention_heads)
    vd = dict(d.get("vision_config") or {})
    vis_kw = _pick(vd, VisionConfig)
    if "fullatt_block_indexes" in vis_kw:
        vis_kw["fullatt_block_indexes"] = tuple(int(i) for i in vis_kw["fullatt_block_indexes"])
    vrp = vd.get("rope_parameters") or {}
    if "rope_theta" in vrp:
        vis_kw["rope_theta"] = float(vrp["rope_theta"])
    for k in ("patch_size", "temporal_patch_size"):
        if isinstance(vis_kw.get(k), (list, tuple)):
            vis_kw[k] = int(vis_kw[k][0])
    tie = d.get("tie_word_embeddings")
    if tie is None:
        tie = text_d.get("tie_word_embeddings", False)
    tie = bool(tie) or bool(text_d.get("tie_word_embeddings", False))

    def tok(name, default):
        v = d.get(name, text_d.get(name, default))
        return default if v is None else int(v)

    cfg = Qwen25VLConfig(
        text=TextConfig(**text_kw), vision=VisionConfig(**vis_kw), tie_word_embeddings=tie,
        image_token_id=tok("image_token_id", 151655), video_token_id=tok("video_token_id", 151656),
        vision_start_token_id=tok("vision_start_token_id", 151652),
        vision_end_token_id=tok("vision_end_token_id", 151653),
        bos_token_id=text_d.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=_ids(text_d.get("eos_token_id", d.get("eos_token_id"))),
        pad_token_id=text_d.get("pad_token_id", d.get("pad_token_id")),
        **runtime)
    return cfg.validate()


def load_config(path: str, **runtime) -> Qwen25VLConfig:
    """``path``: a checkpoint directory (reads ``config.json``) or a JSON file."""
    fname = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(fname):
        raise FileNotFoundError(f"{fname}: no config.json (expected a transformers Qwen2.5-VL checkpoint dir)")
    with open(fname) as f:
        return from_hf_dict(json.load(f), **runtime)


def to_hf_dict(cfg: Qwen25VLConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """v5 nested ``config.json`` that ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` reads."""
    t, v = cfg.text, cfg.vision
    eos = list(cfg.eos_token_id)
    text = dict(
        model_type="qwen2_5_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        use_sliding_window=False, bos_token_id=cfg.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None, pad_token_id=cfg.pad_token_id,
        dtype=torch_dtype)
    vision = dict(
        model_type="qwen2_5_vl_vision", depth=v.depth, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_heads=v.num_heads, out_hidden_size=v.out_hidden_size,
        in_channels=v.in_channels, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second,
        hidden_act=v.hidden_act, rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        dtype=torch_dtype)
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        text_config=text, vision_config=vision, tie_word_embeddings=cfg.tie_word_embeddings,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        dtype=torch_dtype)
