"""Tiny random Qwen2.5-VL configs and inputs shared by tests, the parity tool and benches (torch only here)."""
from __future__ import annotations

import numpy as np

# models.md §1.8: several windows, ragged padded windows, one windowed + one full block, GQA, M-RoPE
TINY_IDS = dict(image_token_id=10, video_token_id=11, vision_start_token_id=8, vision_end_token_id=9)


def tiny_hf_config(tie: bool = False, vocab: int = 128, text_layers: int = 2, depth: int = 2, hidden: int = 64,
                   intermediate: int = 128, heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32,
                   vision_heads: int = 2, fullatt=(1,)):
    from transformers import Qwen2_5_VLConfig
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(depth=depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3, window_size=56, fullatt_block_indexes=list(fullatt)),
        tie_word_embeddings=tie, **TINY_IDS)


def tiny_torch_model(tie: bool = False, seed: int = 0, **kw):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_hf_config(tie=tie, **kw),
                                                            attn_implementation="eager")
    # random (non-trivial) norm scales and biases so that their conversion is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval().float()


def image_tokens(grid_row, merge=2, image_token_id=10, start=8, end=9):
    t, h, w = grid_row
    return [start] + [image_token_id] * (t * h * w // (merge * merge)) + [end]


def pixel_values_for(grid, patch_dim=3 * 2 * 14 * 14, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(np.asarray(grid), axis=1).sum())
    return rng.standard_normal((n, patch_dim)).astype(np.float32)


def mm_token_type_ids(ids, image_token_id=10):
    return (np.asarray(ids) == image_token_id).astype(np.int64)
