"""RRM model inputs: (instruction, principles, source image, edited image[, target]) -> Qwen2.5-VL arrays.

Uses transformers' own tokenizer and Qwen2-VL image processor (PIL backend: no torchvision, env-notes G10); the only
thing done here is what ``Qwen2_5_VLProcessor`` would do around them: expand each ``<|image_pad|>`` placeholder to
``t*h*w / merge**2`` tokens. Every sample of a batch must use one image size so that ``image_grid_thw`` (static for
the vision tower) is the same per sample; the tokenised lengths then vary only through the text.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from edit_r1_jax.rrm import prompts

PREPROCESSOR_FILE = "preprocessor_config.json"


def make_image_processor(image_size: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                         path: str | None = None):
    """Qwen2-VL image processor (PIL backend). ``path`` with a preprocessor_config.json wins; else pixel bounds
    ``image_size**2`` (fixed grid for fixed-size images) or the given min/max."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if path is not None and os.path.exists(os.path.join(path, PREPROCESSOR_FILE)):
        with open(os.path.join(path, PREPROCESSOR_FILE)) as f:
            kw = {k: v for k, v in json.load(f).items()
                  if k in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size",
                           "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize")}
        return Qwen2VLImageProcessorPil(**kw)
    if image_size is not None:
        min_pixels = max_pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels or 56 * 56, max_pixels=max_pixels or 28 * 28 * 1280,
                                    patch_size=14, merge_size=2, temporal_patch_size=2)


def save_image_processor(image_processor, out_dir: str) -> None:
    keys = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
    d = {k: getattr(image_processor, k) for k in keys if hasattr(image_processor, k)}
    d["image_processor_type"] = "Qwen2VLImageProcessor"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PREPROCESSOR_FILE), "w") as f:
        json.dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}, f, indent=2)


@dataclasses.dataclass
class RRMInputs:
    """Tokenizer + image processor for the reasoning reward model."""
    tokenizer: Any
    image_processor: Any
    compact: bool = False          # the short scoring system prompt (tiny models, the synthetic world)

    @classmethod
    def from_dir(cls, path: str, compact: bool = False, image_size: int | None = None) -> "RRMInputs":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        return cls(tok, make_image_processor(image_size=image_size, path=path), compact=compact)

    @property
    def merge(self) -> int:
        return int(getattr(self.image_processor, "merge_size", 2))

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.token_id(prompts.ENDOFTEXT))

    @property
    def eos_id(self) -> int:
        return self.token_id(prompts.IM_END)

    def images(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """-> (pixel_values [N_patches, C*T*P*P] float32, image_grid_thw [n_images, 3] int64)."""
        arrs = [np.asarray(im, dtype=np.uint8) for im in images]
        out = self.image_processor(images=arrs, return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)

    def expand_placeholders(self, text: str, grid: np.ndarray) -> str:
        parts = text.split(prompts.IMAGE_PAD)
        if len(parts) - 1 != len(grid):
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders but {len(grid)} images were given")
        out = parts[0]
        for (t, h, w), rest in zip(grid, parts[1:]):
            out += prompts.IMAGE_PAD * int(t * h * w // self.merge ** 2) + rest
        return out

    def encode_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    def scoring_prompt(self, instruction: str, principles: Sequence[Any], source: Any, edited: Any) -> dict:
        """Prompt for scoring one edit: input_ids [T], pixel_values [N, D], image_grid_thw [2, 3]."""
        msgs = prompts.build_scoring_messages(instruction, principles, compact=self.compact)
        text = prompts.render_chat(msgs, add_generation_prompt=True)
        pv, grid = self.images([source, edited])
        ids = self.encode_ids(self.expand_placeholders(text, grid))
        return {"input_ids": ids, "pixel_values": pv, "image_grid_thw": grid}

    def sft_example(self, instruction: str, principles: Sequence[Any], source: Any, edited: Any,
                    target: str) -> dict:
        """Prompt + target: input_ids [T], loss_mask [T] (1 on the target and its <|im_end|>), pixel_values."""
        p = self.scoring_prompt(instruction, principles, source, edited)
        completion = self.encode_ids(target + prompts.IM_END)
        ids = np.concatenate([p["input_ids"], completion]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(p["input_ids"]), np.int32), np.ones(len(completion), np.int32)])
        return {"input_ids": ids, "loss_mask": mask, "pixel_values": p["pixel_values"],
                "image_grid_thw": p["image_grid_thw"], "prompt_len": np.int32(len(p["input_ids"]))}

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False).split(prompts.IM_END)[0]


def pad_batch(examples: Sequence[dict], pad_id: int, length: int | None = None, left: bool = False) -> dict:
    """Stack examples: input_ids/attention_mask (and loss_mask) padded to ``length``; pixel_values concatenated
    in sample order; image_grid_thw concatenated. ``left=True`` left-pads (generation prompts)."""
    t = max(len(e["input_ids"]) for e in examples) if length is None else length
    ids = np.full((len(examples), t), pad_id, np.int32)
    att = np.zeros((len(examples), t), np.int32)
    lm = np.zeros((len(examples), t), np.int32) if "loss_mask" in examples[0] else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if n > t:
            raise ValueError(f"example {i} has {n} tokens, more than the padded length {t}")
        sl = slice(t - n, t) if left else slice(0, n)
        ids[i, sl] = e["input_ids"]
        att[i, sl] = 1
        if lm is not None:
            lm[i, sl] = e["loss_mask"]
    out = {"input_ids": ids, "attention_mask": att,
           "pixel_values": np.concatenate([e["pixel_values"] for e in examples]),
           "image_grid_thw": np.concatenate([e["image_grid_thw"] for e in examples])}
    if lm is not None:
        out["loss_mask"] = lm
    return out
