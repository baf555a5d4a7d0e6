"""Text + image preprocessing for Qwen2.5-VL through transformers' own classes (nothing reimplemented).

* ``load_processor(path)``: the checkpoint's tokenizer and ``Qwen2VLImageProcessor`` (PIL backend when torchvision
  is absent, env-notes G10) combined in ``ImageOnlyQwen25VLProcessor`` - transformers' ``Qwen2_5_VLProcessor``
  minus the video-processor check that fails without torchvision.
* ``build_messages``: chat turns laid out as (system, source image, edited image, text).
* ``prepare_inputs``: chat text(s) + PIL/NumPy images -> NumPy ``input_ids, attention_mask, pixel_values,
  image_grid_thw`` ready for ``qwen2_5_vl.forward`` / ``generate`` (left padding by default, as generation wants).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Fallback only (used when the tokenizer carries no chat template): Qwen2.5-VL's turn format.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without a video processor (no torchvision needed; env-notes G10)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen25VLProcessor


def make_processor(tokenizer, image_processor=None, chat_template: str | None = None, **image_kw):
    """Wrap an existing tokenizer (+ optional image processor, else ``Qwen2VLImageProcessor(**image_kw)``)."""
    from transformers import Qwen2VLImageProcessor
    if image_processor is None:
        image_processor = Qwen2VLImageProcessor(**image_kw)
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """Tokenizer + image processor from a checkpoint directory (offline; no hub access)."""
    import os
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kw = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels).items() if v is not None}
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        ip = Qwen2VLImageProcessor.from_pretrained(path, local_files_only=True, **kw)
    else:
        ip = Qwen2VLImageProcessor(**kw)
    return make_processor(tok, ip)


def build_messages(text: str, *, system: str | None = None, source_image: bool = True,
                   edited_image: bool = True, extra_images: int = 0) -> list[dict[str, Any]]:
    """Chat messages: optional system turn, then one user turn with [source image] [edited image] text.

    Images are placeholders (``{"type": "image"}``); pass the actual images to ``prepare_inputs`` in that order.
    """
    msgs = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"}] * (int(source_image) + int(edited_image) + extra_images)
    content.append({"type": "text", "text": text})
    msgs.append({"role": "user", "content": content})
    return msgs


def chat_text(processor, messages, add_generation_prompt: bool = True) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prepare_inputs(processor, texts: str | Sequence[str], images: Sequence | None = None,
                   padding_side: str = "left") -> dict[str, np.ndarray]:
    """Chat text(s) with ``<|image_pad|>`` placeholders + images (flat list, in order of appearance across texts;
    PIL images or HxWx3 uint8 arrays) -> dict of NumPy arrays: input_ids, attention_mask, pixel_values (float32),
    image_grid_thw. Each placeholder is expanded to ``t*h*w/4`` image tokens by transformers' processor."""
    from PIL import Image
    texts = [texts] if isinstance(texts, str) else list(texts)
    imgs = None
    if images:
        imgs = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)) for im in images]
        imgs = [im.convert("RGB") for im in imgs]
    processor.tokenizer.padding_side = padding_side
    out = processor(text=texts, images=imgs, return_tensors="np", padding=True)
    res = {"input_ids": np.asarray(out["input_ids"], np.int32),
           "attention_mask": np.asarray(out["attention_mask"], np.int32)}
    if imgs:
        res["pixel_values"] = np.asarray(out["pixel_values"], np.float32)
        res["image_grid_thw"] = np.asarray(out["image_grid_thw"], np.int64)
    return res
