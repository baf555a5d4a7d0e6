"""SFT target traces of the synthetic world, in the RRM output format (algorithms.md §c2, decision e20).

A trace is: free-form reasoning that walks through the evaluation points one by one (each sentence grounded in what
the edited image shows, with a pixel box for positional points), the average, a sentence justifying the final
score; a blank line; the per-point list; the ``average_score`` object; ``<score>x</score>``. Wording varies with the
rng (openings, connectives, verdict phrases).

Styles: ``"full"`` (the layout above, ~550 tokens with the world tokenizer), ``"compact"`` (one short observation
line per point, then the same list; ~320 tokens), ``"brief"`` (the compact observation lines, then the bare list
``[1, 0, ...]``, average and score; ~165 tokens) and ``"minimal"`` (no reasoning, bare list, average and score; ~40
tokens), the last three for tiny CPU runs where decoding length dominates. ``"brief"`` puts each verdict right after a
grounded observation of what the point is about (denser supervision than ``"minimal"`` at half the length of
``"compact"``).
"""
from __future__ import annotations

import numpy as np

from edit_r1_jax.data.synthetic_perception import expected_cell_box
from edit_r1_jax.data.synthetic_principles import View
from edit_r1_jax.data.synthetic_scene import CELL_NAMES
from edit_r1_jax.rrm.prompts import format_assistant_output, format_number

STYLES = ("full", "compact", "minimal", "brief")   # world_texts() trains the tokenizer on the first three
OPENINGS = ("Let me go through the evaluation points one by one.",
            "I will compare the original and the edited image point by point.",
            "Checking each evaluation point against the two images:",
            "Let me look at the edit carefully, point by point.")
LEADS = ("", "In the edited image, ", "Looking at the edited image, ", "Comparing with the original, ")
YES = ("so this point is met: 1.", "so it gets 1.", "which satisfies the point (1).", "so the answer is yes (1).")
NO = ("so this point fails: 0.", "so it gets 0.", "which does not satisfy the point (0).", "so the answer is no (0).")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _describe(view: View, cell: int) -> str:
    o = view.cells.get(cell)
    if o is None:
        return "nothing but background"
    s = f"a {o.size} {o.colour} {o.shape}"
    return s + f" whose left part is still {o.patch}" if o.patch else s


def _where(cell: int) -> str:
    return "the centre" if cell == 4 else f"the {CELL_NAMES[cell]}"


def _box(view: View, cell: int, size: int) -> str:
    o = view.cells.get(cell)
    return f" (box {expected_cell_box(cell, o.size, size)})" if (o is not None and size) else ""


def explain(check: dict, ok: bool, src: View, cand: View, image_size: int) -> str:
    """One grounded observation about a check on the candidate (no verdict phrase)."""
    kind = check["kind"]
    cell = check.get("cell")
    if kind in ("colour_shape_at", "shape_at", "colour_at", "size_at", "shape_size_at", "whole_colour_at",
                "bigger_at", "smaller_at", "unchanged"):
        now = _describe(cand, cell)
        before = _describe(src, cell)
        box = _box(cand, cell, image_size) if kind in ("colour_shape_at", "shape_at") else ""
        if before != now and kind not in ("shape_at", "colour_at", "size_at"):
            return f"{_where(cell)} shows {now}{box}; the original had {before} there"
        return f"{_where(cell)} shows {now}{box}"
    if kind == "empty":
        return (f"{_where(cell)} is plain background now" if ok
                else f"{_where(cell)} still shows {_describe(cand, cell)}")
    if kind == "gone":
        cells = cand.find(check["colour"], check["shape"])
        name = f"{check['colour']} {check['shape']}"
        return (f"no {name} is visible anywhere" if ok
                else f"the {name} is still visible in {_where(cells[0])}")
    if kind == "background":
        return f"the background is {cand.background}"
    if kind == "no_extra":
        extra = sorted(set(cand.cells) - set(check["allowed"]))
        return ("no new object appears" if ok
                else f"there is an unrequested {_describe(cand, extra[0])} in {_where(extra[0])}")
    if kind == "clean":
        return ("the image is clean and sharp" if ok
                else {"noise": "the image is covered in grainy noise", "blur": "the whole image is blurry"}.get(
                    cand.artefact, "the image has visible artefacts"))
    if kind == "intact":
        bad = [c for c, o in cand.cells.items() if o.patch]
        return ("every shape is drawn in one solid colour" if ok
                else f"the {cand.cells[bad[0]].shape} in {_where(bad[0])} is only partly recoloured")
    raise ValueError(f"unknown check kind {kind!r}")


def _category_means(principles: list, verdicts: list) -> dict:
    out = {}
    for cat in ("Follow", "Keep", "Quality"):
        vs = [v for p, v in zip(principles, verdicts) if p["category"] == cat]
        out[cat] = sum(vs) / len(vs) if vs else 1.0
    return out


def conclusion(principles: list, verdicts: list, score: float, no_edit: bool, rng) -> str:
    s = format_number(score)
    if no_edit:
        return _pick(rng, (f"The edited image is the same as the original, so the edit failed: {s}.",
                           f"Nothing was actually edited, so the final score is {s}."))
    m = _category_means(principles, verdicts)
    follow = ("the instruction is fully carried out" if m["Follow"] == 1 else
              "the instruction is only partly carried out" if m["Follow"] > 0 else "the instruction is not carried out")
    keep = ("everything else is preserved" if m["Keep"] == 1 else "some things that should stay the same changed")
    quality = ("the result is clean" if m["Quality"] == 1 else "the result has quality problems")
    return _pick(rng, (f"Overall, {follow}, {keep} and {quality}, so I give it {s}.",
                       f"To sum up: {follow}; {keep}; {quality}. Final score: {s}.",
                       f"Since {follow}, {keep} and {quality}, the edit deserves {s}."))


def make_trace(principles: list, verdicts: list, score: float, src: View, cand: View, no_edit: bool,
               rng: np.random.Generator, image_size: int = 0, style: str = "full") -> str:
    """The assistant output for one (source, candidate) pair from its gold verdicts and score."""
    if style not in STYLES:
        raise ValueError(f"make_trace: style must be one of {STYLES}, got {style!r}")
    avg = sum(verdicts) / max(len(verdicts), 1)
    if style == "minimal":
        return format_assistant_output("", None, verdicts, score, average=avg)
    lines = []
    if style == "full":
        lines.append(_pick(rng, OPENINGS))
    for i, (p, v) in enumerate(zip(principles, verdicts), 1):
        obs = explain(p["check"], bool(v), src, cand, image_size)
        if style == "full":
            lead = _pick(rng, LEADS)
            sent = (lead + obs) if lead else (obs[0].upper() + obs[1:])
            lines.append(f"{i}. {p['question']} {sent}, {_pick(rng, YES if v else NO)}")
        else:
            lines.append(f"{i}. {obs}: {v}")
    if style == "full":
        lines.append(f"The average of the points is ({'+'.join(str(v) for v in verdicts)})/{len(verdicts)} = "
                     f"{format_number(avg)}.")
        lines.append(conclusion(principles, verdicts, score, no_edit, rng))
    reasoning = "\n".join(lines)
    return format_assistant_output(reasoning, None if style == "brief" else principles, verdicts, score, average=avg)

