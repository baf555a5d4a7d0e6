"""FLUX prompt tokenizers: transformers' CLIP (``tokenizer/``) and T5 (``tokenizer_2/``) tokenizers, used as the
diffusers FLUX pipelines use them (pad to max length, truncate, no attention mask passed to the encoders)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

CLIP_MAX_LENGTH = 77


def load_tokenizers(pipeline_dir: str):
    """(CLIPTokenizer from ``pipeline_dir/tokenizer``, T5 tokenizer from ``pipeline_dir/tokenizer_2``)."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    out = []
    for sub, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast)):
        folder = os.path.join(pipeline_dir, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{pipeline_dir}: no {sub}/ folder (expected a diffusers FLUX pipeline directory)")
        out.append(cls.from_pretrained(folder))
    return tuple(out)


def tokenize_prompts(clip_tokenizer, t5_tokenizer, prompts: str | Sequence[str],
                     max_sequence_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (clip_ids [B, 77], t5_ids [B, max_sequence_length]) int32, as FluxKontextPipeline.encode_prompt
    tokenizes (padding="max_length", truncation=True). CLIP's length is the tokenizer's model_max_length (77 for
    real checkpoints; an offline tokenizer without model_max_length would give ~1e30, env-notes G13, so it is
    capped at 77)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clip_len = min(int(clip_tokenizer.model_max_length), CLIP_MAX_LENGTH)
    clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_len, truncation=True,
                              return_tensors="np").input_ids
    t5_ids = t5_tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                          return_tensors="np").input_ids
    return clip_ids.astype(np.int32), t5_ids.astype(np.int32)
