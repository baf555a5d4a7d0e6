"""Principles (Follow / Keep / Quality yes/no questions), their gold verdicts and the gold score.

Every principle carries a machine-checkable ``check``. A check is evaluated on a `View` of the candidate: what is
in each cell (colour, shape, size, patch colour), the background colour and any artefact. A view comes either from a
scene graph (`view_of_scene`, exact) or from pixels (`synthetic_perception.perceive`); the same checks then give
the scene-graph verdicts and the pixel verdicts, so the two verifiers differ only in how they see.

**Gold score decision** (the paper publishes no formula; the RRM's final score is "a weighted aggregate" that is
"not simply the mean", algorithms.md §c2/e7). We use::

    F, K, Q = mean verdict of the Follow, Keep and Quality principles (a missing category counts as 1)
    base = 0.5 F + 0.3 K + 0.2 Q            # following the instruction matters most, then preservation, quality
    if K < 1: base -= 0.1                   # unrequested changes are penalised more heavily (§c2)
    if F == 0: base *= 0.5                  # nothing asked for was done: preservation and cleanliness count half
    if the candidate shows the same objects and background as the source: base = 0   # "no edit" gets 0 (§c2)
    gold_score = round_half_up(20 * max(base, 0)) / 2                                   # 0-10 in steps of 0.5

so the final score follows the verdicts but is not their plain mean (a no-op keeps every Keep point yet scores 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edit_r1_jax.data.synthetic_edits import apply_instruction, at_phrase, to_phrase, touched_cells
from edit_r1_jax.data.synthetic_scene import CELL_NAMES, SIZES, Scene

WEIGHTS = {"Follow": 0.5, "Keep": 0.3, "Quality": 0.2}
KEEP_PENALTY = 0.1
MAX_PRINCIPLES = 10


@dataclass(frozen=True)
class ObjView:
    colour: str
    shape: str
    size: str
    patch: str | None = None


@dataclass(frozen=True)
class View:
    """What a verifier sees: background colour, objects per cell, artefact (None | 'noise' | 'blur')."""
    background: str
    cells: dict = field(default_factory=dict)
    artefact: str | None = None

    def content(self) -> tuple:
        """Background and objects (artefact ignored): equal content means 'no edit happened'."""
        return self.background, tuple(sorted(self.cells.items()))

    def find(self, colour: str, shape: str) -> list:
        return [c for c, o in self.cells.items() if o.colour == colour and o.shape == shape]


def view_of_scene(scene: Scene) -> View:
    return View(background=scene.background,
                cells={o.cell: ObjView(o.colour, o.shape, o.size, o.patch) for o in scene.objects},
                artefact=scene.artefact)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------
def evaluate_check(check: dict, view: View) -> bool:
    """Gold answer of one check on a candidate view."""
    kind = check["kind"]
    o = view.cells.get(check.get("cell"))
    if kind == "colour_shape_at":      # the object at `cell` has this colour and shape
        return o is not None and o.colour == check["colour"] and o.shape == check["shape"]
    if kind == "whole_colour_at":      # ... entirely (no patch of another colour)
        return o is not None and o.colour == check["colour"] and o.patch is None
    if kind == "shape_at":
        return o is not None and o.shape == check["shape"]
    if kind == "colour_at":
        return o is not None and o.colour == check["colour"]
    if kind == "size_at":
        return o is not None and o.size == check["size"]
    if kind == "shape_size_at":        # same shape and size (any colour): kept form and place
        return o is not None and o.shape == check["shape"] and o.size == check["size"]
    if kind == "bigger_at":
        return o is not None and SIZES.index(o.size) > SIZES.index(check["than"])
    if kind == "smaller_at":
        return o is not None and SIZES.index(o.size) < SIZES.index(check["than"])
    if kind == "empty":
        return o is None
    if kind == "gone":
        return not view.find(check["colour"], check["shape"])
    if kind == "unchanged":            # identical object in the cell
        return o == ObjView(check["colour"], check["shape"], check["size"], None)
    if kind == "background":
        return view.background == check["colour"]
    if kind == "no_extra":
        return set(view.cells) <= set(check["allowed"])
    if kind == "clean":
        return view.artefact is None
    if kind == "intact":
        return all(v.patch is None for v in view.cells.values())
    raise ValueError(f"unknown check kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Principles
# ----------------------------------------------------------------------------------------------------------------
def _p(category: str, check: dict, *questions: str) -> dict:
    return {"category": category, "check": check, "questions": questions}


def _edit_principles(scene: Scene, edit: dict) -> list:
    """Follow (and edit-specific Keep) principles of one operation, before wording is chosen."""
    op = edit["op"]
    if op == "background":
        c = edit["colour"]
        return [_p("Follow", {"kind": "background", "colour": c},
                   f"Is the background now {c}?", f"Has the background been changed to {c}?")]
    if op == "add":
        cell, shape, colour, size = edit["cell"], edit["shape"], edit["colour"], edit["size"]
        where = at_phrase(cell)
        return [
            _p("Follow", {"kind": "shape_at", "cell": cell, "shape": shape},
               f"Is there a {shape} {where}?", f"Has a {shape} been added {where}?"),
            _p("Follow", {"kind": "colour_at", "cell": cell, "colour": colour},
               f"Is the new object {where} {colour}?", f"Is the added object {colour}?"),
            _p("Follow", {"kind": "size_at", "cell": cell, "size": size},
               f"Is the new object {where} {size}?", f"Is the added {shape} {size}?"),
        ]
    obj = scene.at(edit["cell"])
    name, cell = obj.name, obj.cell
    if op == "recolour":
        c = edit["colour"]
        return [
            _p("Follow", {"kind": "colour_shape_at", "cell": cell, "colour": c, "shape": obj.shape},
               f"Is the {name} now {c}?", f"Has the {name} been recoloured {c}?"),
            _p("Follow", {"kind": "whole_colour_at", "cell": cell, "colour": c},
               f"Is the whole {obj.shape} {c}, with no {obj.colour} left on it?",
               f"Is the colour change complete, leaving no {obj.colour} part?"),
            _p("Keep", {"kind": "shape_size_at", "cell": cell, "shape": obj.shape, "size": obj.size},
               f"Does the recoloured {obj.shape} keep its shape, size and position?",
               f"Is the {obj.shape} still the same size and in the same place?"),
        ]
    if op == "remove":
        return [
            _p("Follow", {"kind": "gone", "colour": obj.colour, "shape": obj.shape},
               f"Has the {name} been removed from the image?", f"Is the {name} gone?"),
            _p("Follow", {"kind": "empty", "cell": cell},
               f"Is the {CELL_NAMES[cell]} area, where the {name} was, now plain background?",
               f"Is the spot the {name} occupied left empty?"),
        ]
    if op == "move":
        to = edit["to"]
        return [
            _p("Follow", {"kind": "colour_shape_at", "cell": to, "colour": obj.colour, "shape": obj.shape},
               f"Is the {name} now {at_phrase(to)}?", f"Has the {name} been moved {to_phrase(to)}?"),
            _p("Follow", {"kind": "empty", "cell": cell},
               f"Is the old position of the {name} ({CELL_NAMES[cell]}) now empty?",
               f"Has the {name} left its original place ({CELL_NAMES[cell]})?"),
            _p("Keep", {"kind": "unchanged", "cell": to, "colour": obj.colour, "shape": obj.shape, "size": obj.size},
               f"Does the moved {name} keep its colour, shape and size?",
               f"Is the {name} unchanged apart from its position?"),
        ]
    if op == "resize":
        size = edit["size"]
        if edit.get("wording") == "absolute":
            follow = _p("Follow", {"kind": "size_at", "cell": cell, "size": size},
                        f"Is the {name} now {size}?", f"Has the {name} been resized to {size}?")
        elif SIZES.index(size) > SIZES.index(obj.size):
            follow = _p("Follow", {"kind": "bigger_at", "cell": cell, "than": obj.size},
                        f"Is the {name} bigger than before?", f"Has the {name} been enlarged?")
        else:
            follow = _p("Follow", {"kind": "smaller_at", "cell": cell, "than": obj.size},
                        f"Is the {name} smaller than before?", f"Has the {name} been shrunk?")
        return [follow,
                _p("Keep", {"kind": "colour_shape_at", "cell": cell, "colour": obj.colour, "shape": obj.shape},
                   f"Does the {name} stay in place with its colour and shape?",
                   f"Apart from its size, is the {name} unchanged?")]
    raise ValueError(f"unknown edit op {op!r}")


def make_principles(scene: Scene, instruction: dict, rng: np.random.Generator | None = None) -> list:
    """Principles of (scene, instruction): ``[{"question", "category", "check"}, ...]``, Follow, Keep, Quality.

    The checks depend only on (scene, instruction); ``rng`` only varies the wording (None = first wording).
    At most `MAX_PRINCIPLES`: when more apply, the no-extra-objects point, the intact-shapes point and then the last
    "left exactly as it was" points are dropped.
    """
    pre, mid, touched, has_bg = [], scene, set(), False
    for edit in instruction["edits"]:
        pre += _edit_principles(mid, edit)
        touched |= touched_cells(edit)
        has_bg |= edit["op"] == "background"
        mid = _apply_one(mid, edit)
    expected = apply_instruction(scene, instruction)
    keeps = [_p("Keep", {"kind": "unchanged", "cell": o.cell, "colour": o.colour, "shape": o.shape, "size": o.size},
                f"Is the {o.name} left exactly as it was?", f"Does the {o.name} keep its colour, size and place?")
             for o in scene.objects if o.cell not in touched]
    if not has_bg:
        keeps.append(_p("Keep", {"kind": "background", "colour": scene.background},
                        f"Is the {scene.background} background kept?",
                        f"Does the background stay {scene.background}?"))
    extra = _p("Keep", {"kind": "no_extra", "allowed": sorted(scene.cells | expected.cells)},
               "Is nothing added that the instruction did not ask for?",
               "Are there no new objects besides the requested ones?")
    quality = [_p("Quality", {"kind": "clean"}, "Is the image free of noise, blur and other artefacts?",
                  "Is the edited image clean and sharp?"),
               _p("Quality", {"kind": "intact"},
                  "Are all shapes whole and evenly coloured, without half-painted parts?",
                  "Is every shape drawn in one solid colour?")]
    follow = [p for p in pre if p["category"] == "Follow"]
    keep = [p for p in pre if p["category"] == "Keep"] + keeps
    items = follow + keep + [extra] + quality
    if len(items) > MAX_PRINCIPLES:
        items.remove(extra)
    if len(items) > MAX_PRINCIPLES:
        items.remove(quality[1])
    while len(items) > MAX_PRINCIPLES:
        items.remove([p for p in items if p["check"]["kind"] == "unchanged"][-1])
    out = []
    for p in items:
        q = p["questions"][int(rng.integers(len(p["questions"])))] if rng is not None else p["questions"][0]
        out.append({"question": q, "category": p["category"], "check": p["check"]})
    return out


def _apply_one(scene: Scene, edit: dict) -> Scene:
    return apply_instruction(scene, {"edits": [edit]})


# ----------------------------------------------------------------------------------------------------------------
# Verdicts and score
# ----------------------------------------------------------------------------------------------------------------
def verdicts_for_view(principles: list, view: View) -> list:
    return [int(evaluate_check(p["check"], view)) for p in principles]


def score_from_verdicts(principles: list, verdicts: list, no_edit: bool) -> float:
    """The documented gold-score rule (module docstring)."""
    if no_edit:
        return 0.0
    means = {}
    for cat in WEIGHTS:
        vs = [v for p, v in zip(principles, verdicts) if p["category"] == cat]
        means[cat] = sum(vs) / len(vs) if vs else 1.0
    base = sum(WEIGHTS[c] * means[c] for c in WEIGHTS)
    if means["Keep"] < 1:
        base -= KEEP_PENALTY
    if means["Follow"] == 0:
        base *= 0.5
    return math.floor(20.0 * max(base, 0.0) + 0.5 + 1e-9) / 2.0


def judge_view(scene: Scene, principles: list, view: View) -> tuple:
    """(verdicts, gold score, no_edit flag) of a candidate view against the source scene."""
    verdicts = verdicts_for_view(principles, view)
    no_edit = view.content() == view_of_scene(scene).content()
    return verdicts, score_from_verdicts(principles, verdicts, no_edit), no_edit
