"""Qwen2.5-VL in Flax Linen: the reward model's backbone.

Public API (stable): ``load_pretrained``, ``forward``, ``save_pretrained``, ``generate``; plus ``token_logprobs``, ``completion_logprobs``,
``forward_with_hidden``, ``init_params``, ``param_logical_axes``, ``num_params``, ``Qwen25VLConfig``,
``prepare_decode`` (weights held across ``generate`` calls).
Params are plain nested dicts without a ``{'params': ...}`` wrapper (see model.py for the tree).
"""
from edit_r1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig, from_hf_dict, load_config
from edit_r1_jax.models.qwen2_5_vl.model import (completion_logprobs, forward, forward_with_hidden, init_params,
                                                 num_params, param_logical_axes, param_shapes, token_logprobs)
from edit_r1_jax.models.qwen2_5_vl.convert import load_pretrained, save_pretrained
from edit_r1_jax.models.qwen2_5_vl.generate import DecodeWeights, generate, prepare_decode

__all__ = ["Qwen25VLConfig", "TextConfig", "VisionConfig", "from_hf_dict", "load_config", "forward",
           "forward_with_hidden", "init_params", "num_params", "param_logical_axes", "param_shapes",
           "token_logprobs", "completion_logprobs", "load_pretrained", "save_pretrained", "generate",
           "prepare_decode", "DecodeWeights"]
