"""RRM prompts: Qwen2.5-VL chat layout without a tokenizer, scoring/decomposition messages, SFT target format."""
import numpy as np
import pytest

from edit_r1_jax.rrm import parse, prompts


def test_render_chat_layout_with_images():
    msgs = [{"role": "system", "content": "Be strict."},
            {"role": "user", "content": [{"type": "text", "text": "A: "}, {"type": "image", "image": None},
                                         {"type": "text", "text": "\nB: "}, {"type": "image"},
                                         {"type": "text", "text": "\nGo."}]},
            {"role": "assistant", "content": "Done."}]
    want = ("<|im_start|>system\nBe strict.<|im_end|>\n"
            "<|im_start|>user\nA: <|vision_start|><|image_pad|><|vision_end|>\nB: "
            "<|vision_start|><|image_pad|><|vision_end|>\nGo.<|im_end|>\n"
            "<|im_start|>assistant\nDone.<|im_end|>\n")
    assert prompts.render_chat(msgs) == want
    assert prompts.render_chat(msgs, add_generation_prompt=True) == want + "<|im_start|>assistant\n"


def test_default_system_turn_is_inserted():
    out = prompts.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_scoring_messages_hold_both_images_in_order():
    src, edited = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    principles = [{"question": "Is the cup red?", "category": "Follow"}, "Is the table unchanged?"]
    msgs = prompts.build_scoring_messages("Make the cup red.", principles, src, edited)
    imgs = prompts.message_images(msgs)
    assert len(imgs) == 2 and imgs[0] is src and imgs[1] is edited
    text = prompts.render_chat(msgs, add_generation_prompt=True)
    assert text.count(prompts.IMAGE_PLACEHOLDER) == 2
    assert text.index("Original image: ") < text.index("Edited image: ") < text.index("Edit instruction: Make the")
    assert "1. [Follow] Is the cup red?\n2. Is the table unchanged?<|im_end|>" in text
    assert text.startswith("<|im_start|>system\n" + prompts.SCORING_SYSTEM + "<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    compact = prompts.render_scoring_prompt("Make the cup red.", principles, compact=True)
    assert prompts.SCORING_SYSTEM_COMPACT in compact and len(compact) < len(text)


def test_scoring_prompt_requires_principles_and_valid_items():
    with pytest.raises(ValueError, match="empty"):
        prompts.build_scoring_messages("x", [])
    with pytest.raises(TypeError, match="principle"):
        prompts.scoring_user_text("x", [3])


def test_principle_messages_and_example_parse():
    msgs = prompts.build_principle_messages("Remove the lamp.", source_image="IMG", num_points=8)
    assert prompts.message_images(msgs) == ["IMG"]
    text = prompts.render_chat(msgs, add_generation_prompt=True)
    assert "Edit instruction: Remove the lamp." in text and "Write 8 evaluation points" in text
    # the in-prompt example is itself valid decomposition output
    example = text[text.index("[{"):text.rindex("]") + 1]
    assert parse.parse_principles(example) == prompts.PRINCIPLE_EXAMPLE


def test_assistant_output_layout_and_round_trip():
    out = prompts.format_assistant_output("Point 1 holds.\nPoint 2 fails.", ["Is A?", {"question": "Is B?"}],
                                          [1, 0], 4.5)
    reasoning, body = out.split("\n\n")
    assert reasoning == "Point 1 holds.\nPoint 2 fails."
    assert body == ('[{"question": "Is A?", "score": 1}, {"question": "Is B?", "score": 0}]\n'
                    '{"average_score": 0.5}\n<score>4.5</score>')
    r = parse.parse(out, 2)
    assert (r.status, r.score, r.verdicts, r.average) == ("ok", 4.5, [1, 0], 0.5)
    bare = prompts.format_assistant_output("", None, [1, 1, 0], 7)
    assert bare == '[1, 1, 0]\n{"average_score": 0.67}\n<score>7</score>'


@pytest.mark.parametrize("bad", [dict(verdicts=[2]), dict(score=11), dict(score=-1)])
def test_assistant_output_validation(bad):
    kw = dict(reasoning="r", questions=["q"], verdicts=[1], score=5)
    kw.update(bad)
    with pytest.raises(ValueError):
        prompts.format_assistant_output(**kw)


def test_format_number():
    assert [prompts.format_number(x) for x in (7, 7.5, 2 / 3, 0, 10.0, 0.125)] == ["7", "7.5", "0.67", "0", "10",
                                                                                    "0.12"]


def test_sft_example_split():
    msgs = prompts.build_scoring_messages("Make it red.", ["Is it red?"], compact=True)
    prompt, completion = prompts.render_sft_example(msgs, "target text")
    assert prompt == prompts.render_chat(msgs, add_generation_prompt=True)
    assert completion == "target text<|im_end|>"
