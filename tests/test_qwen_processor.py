"""Processor wrapper: offline tiny BPE tokenizer + transformers' Qwen2VLImageProcessor (PIL backend, G10)."""
import numpy as np
import pytest
from PIL import Image

from edit_r1_jax.models.qwen2_5_vl import processor as P

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


@pytest.fixture(scope="module")
def proc():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["make the sky red", "keep the dog", "score the edit from 0 to 10"] * 20, trainer)
    tok = Qwen2TokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return P.make_processor(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def test_chat_layout_and_inputs(proc):
    msgs = P.build_messages("make the sky red", system="score the edit")
    text = P.chat_text(proc, msgs)
    assert text.index("<|im_start|>system") < text.index("<|vision_start|>") < text.index("make the sky red")
    assert text.count("<|image_pad|>") == 2 and text.endswith("<|im_start|>assistant\n")
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (60, 90, 3), np.uint8))
    edit = rng.integers(0, 255, (100, 50, 3), np.uint8)
    short = P.chat_text(proc, P.build_messages("keep", source_image=False, edited_image=False))
    out = P.prepare_inputs(proc, [text, short], [src, edit])
    grid = out["image_grid_thw"]
    assert grid.shape == (2, 3) and (grid[:, 0] == 1).all()
    pad_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (out["input_ids"][0] == pad_id).sum() == grid.prod(1).sum() // 4
    assert out["pixel_values"].shape == (grid.prod(1).sum(), 3 * 2 * 14 * 14)
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][1, -1] == 1      # left padding
    direct = proc.image_processor(images=[src, Image.fromarray(edit)], return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], direct["pixel_values"])
