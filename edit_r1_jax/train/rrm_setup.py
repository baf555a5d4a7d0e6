"""Build the reward model for a training run from the config: tokenizer/processor, model config, init or load.

``config.rrm``:
  checkpoint   HF Qwen2.5-VL directory to start from ("" = a random model of the sizes below; the tokenizer then
               comes from ``tokenizer`` or, if that is empty, the synthetic world's tokenizer built in the workdir)
  tokenizer    tokenizer directory ("" = the checkpoint's / the world tokenizer)
  image_size   square image side fed to the vision tower (multiple of 28); fixes image_grid_thw
  compact_prompt  the short scoring system prompt (tiny models)
  hidden, layers, heads, kv_heads, intermediate, vision_hidden, vision_depth, vision_heads   random-model sizes
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.rrm import prompts
from edit_r1_jax.rrm.inputs import RRMInputs, make_image_processor


@dataclasses.dataclass
class RRMSetup:
    cfg: Any                  # Qwen25VLConfig
    inputs: RRMInputs
    checkpoint: str           # "" for random init
    grid_per_sample: np.ndarray   # [2, 3]: (source, edited) image grids

    def init_params(self, rng):
        if self.checkpoint:
            return qwen.load_pretrained(self.checkpoint)[1]
        return qwen.init_params(self.cfg, rng)

    def param_logical_axes(self):
        return qwen.param_logical_axes(self.cfg)

    def grid(self, batch_size: int) -> np.ndarray:
        return np.tile(self.grid_per_sample, (batch_size, 1))


def _get(c: Any, k: str, d: Any) -> Any:
    try:
        v = c[k]
    except (KeyError, TypeError, AttributeError):
        return d
    return d if v is None else v


def tiny_qwen_config(tok_ids: dict, vocab: int, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                     vision_hidden=32, vision_depth=2, vision_heads=2, tie=True) -> Any:
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    d = dict(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=1e-6, max_position_embeddings=4096, eos_token_id=tok_ids["eos"],
                         pad_token_id=tok_ids["pad"], bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3, window_size=56,
                           fullatt_block_indexes=[vision_depth - 1]),
        tie_word_embeddings=tie, image_token_id=tok_ids["image"], video_token_id=tok_ids["video"],
        vision_start_token_id=tok_ids["vision_start"], vision_end_token_id=tok_ids["vision_end"])
    return qwen.from_hf_dict(d)


def build_rrm(config: Any, workdir: str) -> RRMSetup:
    r = config.rrm
    ckpt = _get(r, "checkpoint", "")
    image_size = int(_get(r, "image_size", 112))
    compact = bool(_get(r, "compact_prompt", True))
    tok_dir = _get(r, "tokenizer", "") or ckpt
    if not tok_dir:
        from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
        tok_dir = os.path.join(workdir, "tokenizer")
        ensure_world_tokenizer(tok_dir)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    inputs = RRMInputs(tokenizer, make_image_processor(image_size=image_size, path=ckpt or None), compact=compact)
    if ckpt:
        cfg = qwen.load_config(ckpt)
    else:
        ids = {"eos": inputs.eos_id, "pad": inputs.pad_id, "image": inputs.token_id(prompts.IMAGE_PAD),
               "video": inputs.token_id(prompts.VIDEO_PAD), "vision_start": inputs.token_id(prompts.VISION_START),
               "vision_end": inputs.token_id(prompts.VISION_END)}
        cfg = tiny_qwen_config(ids, vocab=len(tokenizer), hidden=int(_get(r, "hidden", 64)),
                               layers=int(_get(r, "layers", 2)), heads=int(_get(r, "heads", 4)),
                               kv_heads=int(_get(r, "kv_heads", 2)), intermediate=int(_get(r, "intermediate", 128)),
                               vision_hidden=int(_get(r, "vision_hidden", 32)),
                               vision_depth=int(_get(r, "vision_depth", 2)),
                               vision_heads=int(_get(r, "vision_heads", 2)))
    remat = _get(r, "remat_policy", "none")
    if remat != cfg.remat_policy:
        cfg = cfg.replace(remat_policy=remat)
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    _, grid = inputs.images([blank, blank])
    return RRMSetup(cfg=cfg, inputs=inputs, checkpoint=ckpt, grid_per_sample=grid)
