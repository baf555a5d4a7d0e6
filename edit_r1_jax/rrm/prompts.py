"""RRM prompts in our own words, Qwen2.5-VL chat layout, and the assistant-output (SFT target) format.

Spec: algorithms.md §c1 (principle decomposition), §c2 (scoring prompt and output format) and decision e20 (SFT
target layout). Two prompts exist:

* **principle decomposition**: (source image, instruction) -> about 10 yes/no evaluation points in three categories
  (Follow / Keep / Quality) as a JSON array of ``{"question": ..., "category": ...}``;
* **scoring**: (original image, edited image, instruction, evaluation points) -> free-form reasoning, then the
  per-point 0/1 list, the average and a final 0-10 score in ``<score>x</score>``.

The assistant output (what the RRM generates, and the SFT target) is laid out as (decision e20)::

    <reasoning text>
    <blank line>
    [{"question": "...", "score": 1}, {"question": "...", "score": 0}, ...]
    {"average_score": 0.5}
    <score>4.5</score>

Chat layout (Qwen2.5-VL): every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; an image inside a turn is
``<|vision_start|><|image_pad|><|vision_end|>`` (the processor later repeats ``<|image_pad|>`` once per merged
vision patch); a default system turn is inserted when the conversation does not start with one; the generation
prompt is ``<|im_start|>assistant\\n``. `render_chat` reproduces this without a tokenizer, and the world tokenizer's
Jinja chat template (``edit_r1_jax.data.world_tokenizer``) renders the same string.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
DEFAULT_SYSTEM = "You are a helpful assistant."
CATEGORIES = ("Follow", "Keep", "Quality")

# --------------------------------------------------------------------------------------------------------------
# Scoring prompt (§c2), our wording.
# --------------------------------------------------------------------------------------------------------------
SCORING_SYSTEM = """You are a meticulous judge of image edits. You are shown an original image, an edited image, \
the edit instruction and a numbered list of evaluation points. Each point is a yes/no question about following the \
instruction (Follow), keeping what should not change (Keep) or the quality of the result (Quality).

How to judge:
- Give every point 1 if it clearly holds in the edited image and 0 otherwise. If you are not sure, give 0.
- A change the instruction asks for must be plainly visible: a slight shift, a faint tint or a barely bigger \
object does not count. Moves should be large, removals complete, with nothing left behind.
- If a point contradicts the instruction, the instruction wins.
- Changes that nobody asked for (new objects, other colours, moved or resized parts) are serious faults, and so \
are noise, blur, colour casts and over-sharpening.
- If the edited image is the same as the original, or nearly so, the edit failed and the final score is 0.
- When an edit is about position, say where the object ends up as a pixel box [x0, y0, x1, y1] in your reasoning.
- The final score goes from 0 to 10 and may have decimals: 0 means unusable, 5 partly usable, 8 almost right, \
10 flawless. It is your overall verdict, weighted by how much work it would take to repair what is wrong. It is \
not simply the average of the points, and passing every point does not guarantee a 10.

Write your reasoning about the points one by one first. Then, after a blank line, write the list \
[{"question": ..., "score": 0 or 1}, ...] in the given order, then {"average_score": the mean of the point \
scores}, then the final score as <score>number</score>."""

SCORING_SYSTEM_COMPACT = ("You judge image edits. Check each evaluation point against the two images (1 = yes, "
                          "0 = no), then write the point list, {\"average_score\": mean} and a final 0-10 score as "
                          "<score>x</score>.")

# --------------------------------------------------------------------------------------------------------------
# Principle-decomposition prompt (§c1), our wording, one worked example of our own.
# --------------------------------------------------------------------------------------------------------------
PRINCIPLE_SYSTEM = """You write checklists for judging image edits. Given a source image and an edit instruction, \
you list yes/no evaluation points that a judge can answer by comparing the source image with an edited version."""

PRINCIPLE_EXAMPLE_INSTRUCTION = "Give the living room walls a pale green colour."
PRINCIPLE_EXAMPLE = [
    {"question": "Are the walls of the room pale green in the edited image?", "category": "Follow"},
    {"question": "Is the green even across all visible walls, with no patches of the old colour?",
     "category": "Follow"},
    {"question": "Is the new wall colour pale rather than dark or saturated?", "category": "Follow"},
    {"question": "Do the sofa, table and rug keep their original colours and shapes?", "category": "Keep"},
    {"question": "Do the window and the view through it stay as in the source image?", "category": "Keep"},
    {"question": "Are the positions of all furniture unchanged?", "category": "Keep"},
    {"question": "Does the lighting of the room stay the same?", "category": "Keep"},
    {"question": "Is the image free of blur, noise and smeared edges?", "category": "Quality"},
    {"question": "Do the wall edges meet the ceiling and floor cleanly, without colour bleeding?",
     "category": "Quality"},
]


def principle_user_text(instruction: str, num_points: int = 10) -> str:
    """Text of the decomposition request (the source image is placed before it by `build_principle_messages`)."""
    example = json.dumps(PRINCIPLE_EXAMPLE, ensure_ascii=False)
    return (f"Edit instruction: {instruction}\n"
            f"Write {num_points} evaluation points for this edit: 3 or 4 about following the instruction "
            f"(category \"Follow\"), 3 or 4 about keeping everything the instruction does not mention (category "
            f"\"Keep\") and 2 or 3 about image quality (category \"Quality\"). Phrase every point so that \"yes\" "
            f"is the good outcome, and make it specific to this image and instruction.\n"
            f"Answer with a JSON array only: [{{\"question\": ..., \"category\": ...}}, ...].\n"
            f"Example for the instruction \"{PRINCIPLE_EXAMPLE_INSTRUCTION}\":\n{example}")


def build_principle_messages(instruction: str, source_image: Any = None, num_points: int = 10) -> list[dict]:
    """Chat messages for principle decomposition: system turn, user turn with the source image then the request."""
    return [
        {"role": "system", "content": [{"type": "text", "text": PRINCIPLE_SYSTEM}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Source image: "},
            {"type": "image", "image": source_image},
            {"type": "text", "text": "\n" + principle_user_text(instruction, num_points)},
        ]},
    ]


# --------------------------------------------------------------------------------------------------------------
# Scoring messages.
# --------------------------------------------------------------------------------------------------------------
def _question_of(p: Any) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, dict) and "question" in p:
        return str(p["question"])
    raise TypeError(f"principle must be a str or a dict with 'question', got {type(p).__name__}: {p!r}")


def format_principles(principles: Sequence[Any], with_category: bool = True) -> str:
    """Numbered list, one point per line: ``1. [Follow] Is ...?``."""
    lines = []
    for i, p in enumerate(principles, 1):
        q = _question_of(p)
        cat = p.get("category") if isinstance(p, dict) else None
        lines.append(f"{i}. [{cat}] {q}" if (with_category and cat) else f"{i}. {q}")
    return "\n".join(lines)


def scoring_user_text(instruction: str, principles: Sequence[Any]) -> str:
    """Text after the two images in the scoring user turn."""
    if not principles:
        raise ValueError("scoring prompt: the list of evaluation points (principles) is empty")
    return f"Edit instruction: {instruction}\nEvaluation points:\n{format_principles(principles)}"


def build_scoring_messages(instruction: str, principles: Sequence[Any], source_image: Any = None,
                           edited_image: Any = None, compact: bool = False) -> list[dict]:
    """Chat messages for scoring one edit: (system, user[original image, edited image, instruction + points]).

    Images are stored in the ``{"type": "image", "image": ...}`` parts (numpy HWC uint8, PIL, or None when only the
    text layout is needed); `message_images` returns them in prompt order for the processor.
    """
    system = SCORING_SYSTEM_COMPACT if compact else SCORING_SYSTEM
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Original image: "},
            {"type": "image", "image": source_image},
            {"type": "text", "text": "\nEdited image: "},
            {"type": "image", "image": edited_image},
            {"type": "text", "text": "\n" + scoring_user_text(instruction, principles)},
        ]},
    ]


def message_images(messages: Sequence[dict]) -> list[Any]:
    """The images of the ``image`` parts, in the order their placeholders appear in `render_chat`."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            out.extend(part.get("image") for part in m["content"] if _is_image_part(part))
    return out


def _is_image_part(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render messages to the Qwen2.5-VL chat string, without a tokenizer.

    Equal to ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` with the world
    tokenizer (tested), and to the layout of the public Qwen2.5-VL template for text and image parts.
    """
    out = []
    for i, m in enumerate(messages):
        role = m["role"]
        if i == 0 and role != "system":
            out.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
        content = m["content"]
        if isinstance(content, str):
            body = content
        else:
            parts = []
            for part in content:
                if _is_image_part(part):
                    parts.append(IMAGE_PLACEHOLDER)
                elif "text" in part:
                    parts.append(str(part["text"]))
            body = "".join(parts)
        out.append(f"{IM_START}{role}\n{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def render_scoring_prompt(instruction: str, principles: Sequence[Any], compact: bool = False) -> str:
    """The full scoring prompt string, ending with the assistant generation prompt."""
    return render_chat(build_scoring_messages(instruction, principles, compact=compact), add_generation_prompt=True)


def render_sft_example(messages: Sequence[dict], target: str) -> tuple[str, str]:
    """(prompt, completion) strings for SFT: the loss covers the completion only (the target and ``<|im_end|>``)."""
    return render_chat(messages, add_generation_prompt=True), target + IM_END


# --------------------------------------------------------------------------------------------------------------
# Assistant output (SFT target) formatting.
# --------------------------------------------------------------------------------------------------------------
def format_number(x: float) -> str:
    """Shortest plain decimal with at most two decimals: 7 -> '7', 7.5 -> '7.5', 2/3 -> '0.67'."""
    s = f"{round(float(x), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def format_point_list(questions: Sequence[str] | None, verdicts: Sequence[int]) -> str:
    """``[{"question": q, "score": v}, ...]``, or the bare ``[v, v, ...]`` when ``questions`` is None."""
    if questions is None:
        return "[" + ", ".join(str(int(v)) for v in verdicts) + "]"
    if len(questions) != len(verdicts):
        raise ValueError(f"format_point_list: {len(questions)} questions but {len(verdicts)} verdicts")
    items = [json.dumps({"question": str(q), "score": int(v)}, ensure_ascii=False) for q, v in zip(questions, verdicts)]
    return "[" + ", ".join(items) + "]"


def format_assistant_output(reasoning: str, questions: Sequence[Any] | None, verdicts: Sequence[int], score: float,
                            average: float | None = None) -> str:
    """The RRM output / SFT target: reasoning, blank line, per-point list, average object, ``<score>x</score>``.

    ``average`` defaults to the mean of ``verdicts`` (unweighted, §c2); ``score`` is the final 0-10 judgement and is
    written with at most two decimals. ``questions=None`` writes the bare list ``[1, 0, ...]`` (a shorter target
    for tiny runs; `edit_r1_jax.rrm.parse` reads both).
    """
    if any(int(v) not in (0, 1) for v in verdicts):
        raise ValueError(f"format_assistant_output: verdicts must be 0/1, got {list(verdicts)}")
    if not 0.0 <= float(score) <= 10.0:
        raise ValueError(f"format_assistant_output: score must be in [0, 10], got {score}")
    qs = None if questions is None else [_question_of(q) for q in questions]
    if average is None:
        average = sum(int(v) for v in verdicts) / max(len(verdicts), 1)
    head = reasoning.strip()
    body = (f"{format_point_list(qs, verdicts)}\n"
            f"{{\"average_score\": {format_number(average)}}}\n"
            f"<score>{format_number(score)}</score>")
    return f"{head}\n\n{body}" if head else body
