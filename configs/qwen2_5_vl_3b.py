"""Qwen2.5-VL-3B-Instruct architecture preset (Hub config.json values, models.md §1.1; tied embeddings).

``get_config()`` gives the ml_collections config (``model.hf_config`` is the Hub config.json content);
``model_config()`` the ``Qwen25VLConfig`` used by ``edit_r1_jax.models.qwen2_5_vl``.
Runs on: any (use a mesh with fsdp/tensor for training). Real weights: ``load_pretrained(<hub dir>)``.
"""
import copy

import ml_collections

HF_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 128000, "use_sliding_window": False, "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "torch_dtype": "bfloat16",
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 2048, "in_chans": 3, "patch_size": 14, "temporal_patch_size": 2,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "hidden_act": "silu"},
}


def model_config(**runtime):
    from edit_r1_jax.models.qwen2_5_vl import from_hf_dict
    return from_hf_dict(copy.deepcopy(HF_CONFIG), **runtime)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(name="qwen2_5_vl", hf_config=copy.deepcopy(HF_CONFIG), dtype="bfloat16",
                   attention_backend="xla", remat_policy="dots_no_batch")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding = dict(rules=None)
    return c
