"""Edit instructions of the synthetic world: edit operations, applying them, and templated English text.

An instruction is a plain dict ``{"category", "edits": [op, ...], "text"}``. Categories and their operations:

=============  ==================================================================================
colour         ``{"op": "recolour", "cell", "colour"}``
add            ``{"op": "add", "cell", "shape", "colour", "size"}``
remove         ``{"op": "remove", "cell"}``
move           ``{"op": "move", "cell", "to"}``
resize         ``{"op": "resize", "cell", "size", "wording": "relative" | "absolute"}``
background     ``{"op": "background", "colour"}``
two_step       two of the above on different objects, applied in order
=============  ==================================================================================

``cell`` always names the object's cell in the scene the operation is applied to.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edit_r1_jax.data.synthetic_scene import (BACKGROUND_COLOURS, CELL_NAMES, OBJECT_COLOURS, SHAPES, SIZES, Obj,
                                              Scene)

CATEGORIES = ("colour", "add", "remove", "move", "resize", "background", "two_step")
SINGLE_CATEGORIES = CATEGORIES[:-1]
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}


# ----------------------------------------------------------------------------------------------------------------
# Applying edits
# ----------------------------------------------------------------------------------------------------------------
def apply_edit(scene: Scene, edit: dict) -> Scene:
    """Apply one operation. Raises ValueError (naming the op and field) when it does not fit the scene."""
    op = edit["op"]
    if op == "background":
        return scene.replace(background=edit["colour"])
    if op == "add":
        if scene.at(edit["cell"]) is not None:
            raise ValueError(f"add: cell {edit['cell']} is occupied")
        new = Obj(shape=edit["shape"], colour=edit["colour"], size=edit["size"], cell=edit["cell"])
        return scene.with_objects(scene.objects + (new,))
    obj = scene.at(edit["cell"])
    if obj is None:
        raise ValueError(f"{op}: no object in cell {edit['cell']}")
    others = tuple(o for o in scene.objects if o.cell != obj.cell)
    if op == "recolour":
        return scene.with_objects(others + (dataclasses.replace(obj, colour=edit["colour"], patch=None),))
    if op == "remove":
        return scene.with_objects(others)
    if op == "move":
        if scene.at(edit["to"]) is not None:
            raise ValueError(f"move: target cell {edit['to']} is occupied")
        return scene.with_objects(others + (dataclasses.replace(obj, cell=edit["to"], dx=0.0, dy=0.0),))
    if op == "resize":
        return scene.with_objects(others + (dataclasses.replace(obj, size=edit["size"]),))
    raise ValueError(f"unknown edit op {op!r}")


def apply_instruction(scene: Scene, instruction: dict) -> Scene:
    """The correct result of an instruction (all its operations in order)."""
    for edit in instruction["edits"]:
        scene = apply_edit(scene, edit)
    return scene


def touched_cells(edit: dict) -> set:
    """Cells an operation reads or writes (source and destination)."""
    if edit["op"] == "background":
        return set()
    cells = {edit["cell"]}
    if edit["op"] == "move":
        cells.add(edit["to"])
    return cells


# ----------------------------------------------------------------------------------------------------------------
# Sampling operations
# ----------------------------------------------------------------------------------------------------------------
def free_colours(scene: Scene, shape: str, exclude: tuple = ()) -> list:
    """Object colours that keep (colour, shape) unique for an object of ``shape``."""
    taken = {o.colour for o in scene.objects if o.shape == shape}
    return [c for c in OBJECT_COLOURS if c not in taken and c not in exclude]


def sample_edit(scene: Scene, category: str, rng: np.random.Generator, avoid_cells: set = frozenset()) -> dict | None:
    """A random operation of ``category`` that fits the scene (None if impossible), not touching ``avoid_cells``."""
    objs = [o for o in scene.objects if o.cell not in avoid_cells]
    empty = [c for c in scene.empty_cells() if c not in avoid_cells]
    if category == "background":
        return {"op": "background", "colour": str(rng.choice([c for c in BACKGROUND_COLOURS if c != scene.background]))}
    if category == "add":
        if not empty:
            return None
        for _ in range(50):
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(OBJECT_COLOURS)))
            if scene.find(colour, shape) is None:
                return {"op": "add", "cell": int(rng.choice(empty)), "shape": shape, "colour": colour,
                        "size": str(rng.choice(SIZES))}
        return None
    if not objs:
        return None
    obj = objs[int(rng.integers(len(objs)))]
    if category == "colour":
        colours = free_colours(scene, obj.shape, exclude=(obj.colour,))
        return {"op": "recolour", "cell": obj.cell, "colour": str(rng.choice(colours))} if colours else None
    if category == "remove":
        return {"op": "remove", "cell": obj.cell}
    if category == "move":
        return {"op": "move", "cell": obj.cell, "to": int(rng.choice(empty))} if empty else None
    if category == "resize":
        k = SIZES.index(obj.size)
        options = [s for s in SIZES if s != obj.size]
        size = str(rng.choice(options))
        wording = "absolute" if (rng.random() < 0.4 or abs(SIZES.index(size) - k) > 1) else "relative"
        return {"op": "resize", "cell": obj.cell, "size": size, "wording": wording}
    raise ValueError(f"unknown category {category!r}")


def sample_instruction(scene: Scene, rng: np.random.Generator, category: str | None = None) -> dict:
    """A random instruction (category uniform over `CATEGORIES` unless given) with its English text."""
    for _ in range(100):
        cat = category or str(rng.choice(CATEGORIES))
        if cat != "two_step":
            edit = sample_edit(scene, cat, rng)
            if edit is None:
                continue
            edits = [edit]
        else:
            c1, c2 = rng.choice(SINGLE_CATEGORIES, size=2, replace=False)
            e1 = sample_edit(scene, str(c1), rng)
            if e1 is None:
                continue
            mid = apply_edit(scene, e1)
            e2 = sample_edit(mid, str(c2), rng, avoid_cells=touched_cells(e1))
            if e2 is None or (e1["op"] == "background" and e2["op"] == "background"):
                continue
            edits = [e1, e2]
        ins = {"category": cat, "edits": edits}
        ins["text"] = instruction_text(scene, ins, rng)
        return ins
    raise RuntimeError(f"could not sample an instruction of category {category!r} for scene {scene.to_dict()}")


# ----------------------------------------------------------------------------------------------------------------
# English
# ----------------------------------------------------------------------------------------------------------------
def at_phrase(cell: int) -> str:
    """'in the top left corner', 'at the top', 'on the left', 'in the centre'."""
    name = CELL_NAMES[cell]
    if cell == 4:
        return "in the centre"
    if " " in name:
        return f"in the {name} corner"
    return f"at the {name}" if name in ("top", "bottom") else f"on the {name}"


def to_phrase(cell: int) -> str:
    name = CELL_NAMES[cell]
    if cell == 4:
        return "to the centre"
    if " " in name:
        return f"to the {name} corner"
    return f"to the {name}" if name in ("top", "bottom") else f"to the {name} side"


def ref(obj: Obj, rng: np.random.Generator | None = None) -> str:
    """Noun phrase for an object; sometimes with its location."""
    if rng is not None and rng.random() < 0.3:
        return f"the {obj.colour} {obj.shape} {at_phrase(obj.cell)}"
    return f"the {obj.colour} {obj.shape}"


def _pick(rng, options):
    return options[int(rng.integers(len(options)))] if rng is not None else options[0]


def edit_text(scene: Scene, edit: dict, rng: np.random.Generator | None, question: bool = True) -> str:
    """One operation as an imperative sentence (capitalised, ending with '.'; or a request ending with '?')."""
    op = edit["op"]
    if op == "background":
        c = edit["colour"]
        return _pick(rng, [f"Change the background to {c}.", f"Make the background {c}.",
                           f"Replace the {scene.background} background with a {c} one.",
                           f"Give the picture a {c} background.", f"Paint the background {c}."])
    if op == "add":
        size = _pick(rng, SIZE_WORDS[edit["size"]])
        thing = f"{size} {edit['colour']} {edit['shape']}"
        art = "an" if thing[0] in "aeiou" else "a"
        where = at_phrase(edit["cell"])
        return _pick(rng, [f"Add {art} {thing} {where}.", f"Put {art} {thing} {where}.",
                           f"Place {art} {thing} {where}.", f"Draw {art} {thing} {where}.",
                           f"{where[0].upper() + where[1:]}, add {art} {thing}."])
    obj = scene.at(edit["cell"])
    r = ref(obj, rng)
    if op == "recolour":
        c = edit["colour"]
        return _pick(rng, [f"Make {r} {c}.", f"Change the colour of {r} to {c}.", f"Recolour {r} {c}.",
                           f"Paint {r} {c}.", f"Turn {r} {c}."] + ([f"Can you make {r} {c}?"] if question else []))
    if op == "remove":
        return _pick(rng, [f"Remove {r}.", f"Delete {r}.", f"Erase {r}.", f"Get rid of {r}.",
                           f"Take {r} out of the picture."])
    if op == "move":
        t = to_phrase(edit["to"])
        return _pick(rng, [f"Move {r} {t}.", f"Shift {r} {t}.", f"Relocate {r} {t}.",
                           f"Put {r} {t} instead."])
    if op == "resize":
        bigger = SIZES.index(edit["size"]) > SIZES.index(obj.size)
        if edit["wording"] == "relative":
            if bigger:
                return _pick(rng, [f"Make {r} bigger.", f"Enlarge {r}.", f"Increase the size of {r}.",
                                   f"Make {r} a bit larger."])
            return _pick(rng, [f"Make {r} smaller.", f"Shrink {r}.", f"Reduce the size of {r}.",
                               f"Make {r} a bit smaller."])
        word = _pick(rng, SIZE_WORDS[edit["size"]])
        return _pick(rng, [f"Make {r} {word}.", f"Resize {r} so that it is {word}.",
                           f"Change {r} to a {word} one."])
    raise ValueError(f"unknown edit op {op!r}")


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s else s


def instruction_text(scene: Scene, instruction: dict, rng: np.random.Generator | None = None) -> str:
    edits = instruction["edits"]
    if len(edits) == 1:
        return edit_text(scene, edits[0], rng)
    s1 = edit_text(scene, edits[0], rng, question=False).rstrip(".")
    s2 = edit_text(apply_edit(scene, edits[0]), edits[1], rng, question=False).rstrip(".")
    return _pick(rng, [f"{s1}. Then {_lower_first(s2)}.", f"First {_lower_first(s1)}, then {_lower_first(s2)}.",
                       f"{s1} and {_lower_first(s2)}.", f"{s1}; after that, {_lower_first(s2)}."])
