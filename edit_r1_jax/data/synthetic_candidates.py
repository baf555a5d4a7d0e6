"""Candidate edits of the synthetic world: the correct edit and realistic failures.

Kinds (each a scene graph; artefacts are applied when rendering):

================  ===============================================================================
correct           the instruction carried out exactly
wrong_object      the same operation applied to another object
wrong_colour      recolour / add / background with another colour
wrong_shape       add: another shape
wrong_position    add / move: into another empty cell
wrong_size        add: another size; resize: the other direction (or, for "make it <size>", another size)
partial           recolour: the left part of the object keeps the old colour; move: the object is copied, not
                  moved; two_step: only one of the two steps ("partial_first" / "partial_second")
collateral        the correct edit plus an unrequested change (another object recoloured, moved, removed,
                  an extra object, or the background changed)
noop              the source unchanged
noise, blur       the correct edit with a render artefact
================  ===============================================================================

Candidates whose content (objects and background) and artefact coincide with an earlier one are dropped.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edit_r1_jax.data.synthetic_edits import apply_edit, apply_instruction, free_colours, touched_cells
from edit_r1_jax.data.synthetic_principles import view_of_scene
from edit_r1_jax.data.synthetic_scene import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES, Scene

FAILURE_KINDS = ("wrong_object", "wrong_colour", "wrong_shape", "wrong_position", "wrong_size", "partial",
                 "collateral", "noop", "noise", "blur")


def _wrong_edit(scene: Scene, edit: dict, kind: str, rng: np.random.Generator, avoid: set) -> dict | None:
    """A wrong variant of one operation (None when the failure does not apply)."""
    op = edit["op"]
    if kind == "wrong_object" and op in ("recolour", "remove", "move", "resize"):
        others = [o for o in scene.objects if o.cell != edit["cell"] and o.cell not in avoid]
        rng.shuffle(others)
        for o in others:
            e = dict(edit, cell=o.cell)
            if op == "recolour":
                cols = free_colours(scene, o.shape, exclude=(o.colour,))
                if edit["colour"] not in cols:
                    if not cols:
                        continue
                    e["colour"] = str(rng.choice(cols))
            if op == "resize":
                sizes = [s for s in SIZES if s != o.size]
                e["size"] = edit["size"] if edit["size"] in sizes else str(rng.choice(sizes))
                e["wording"] = "absolute"
            if op == "move" and scene.at(edit["to"]) is not None:
                continue
            return e
        return None
    if kind == "wrong_colour":
        if op == "background":
            cols = [c for c in BACKGROUND_COLOURS if c not in (edit["colour"], scene.background)]
        elif op == "recolour":
            obj = scene.at(edit["cell"])
            cols = free_colours(scene, obj.shape, exclude=(obj.colour, edit["colour"]))
        elif op == "add":
            cols = free_colours(scene, edit["shape"], exclude=(edit["colour"],))
        else:
            return None
        return dict(edit, colour=str(rng.choice(cols))) if cols else None
    if kind == "wrong_shape" and op == "add":
        shapes = [s for s in SHAPES if s != edit["shape"] and scene.find(edit["colour"], s) is None]
        return dict(edit, shape=str(rng.choice(shapes))) if shapes else None
    if kind == "wrong_position" and op in ("add", "move"):
        key = "cell" if op == "add" else "to"
        cells = [c for c in scene.empty_cells() if c != edit[key] and c not in avoid]
        return dict(edit, **{key: int(rng.choice(cells))}) if cells else None
    if kind == "wrong_size":
        if op == "add":
            return dict(edit, size=str(rng.choice([s for s in SIZES if s != edit["size"]])))
        if op == "resize":
            cur = SIZES.index(scene.at(edit["cell"]).size)
            want = SIZES.index(edit["size"])
            alt = [s for s in SIZES if (SIZES.index(s) - cur) * (want - cur) < 0]      # the other direction
            if not alt and edit.get("wording") == "absolute":
                alt = [s for s in SIZES if s not in (edit["size"], SIZES[cur])]
            return dict(edit, size=str(rng.choice(alt))) if alt else None
    return None


def _collateral(result: Scene, protected: set, has_bg_edit: bool, rng: np.random.Generator) -> Scene | None:
    """An unrequested change on top of a (correct) result."""
    options = ["recolour", "move", "remove", "extra"] + ([] if has_bg_edit else ["background"])
    rng.shuffle(options)
    free = [o for o in result.objects if o.cell not in protected]
    empty = [c for c in result.empty_cells() if c not in protected]
    for opt in options:
        if opt == "background":
            cols = [c for c in BACKGROUND_COLOURS if c != result.background]
            return result.replace(background=str(rng.choice(cols)))
        if opt == "extra" and empty:
            for _ in range(20):
                shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(OBJECT_COLOURS)))
                if result.find(colour, shape) is None:
                    return apply_edit(result, {"op": "add", "cell": int(rng.choice(empty)), "shape": shape,
                                               "colour": colour, "size": str(rng.choice(SIZES))})
        if not free:
            continue
        o = free[int(rng.integers(len(free)))]
        if opt == "recolour":
            cols = free_colours(result, o.shape, exclude=(o.colour,))
            if cols:
                return apply_edit(result, {"op": "recolour", "cell": o.cell, "colour": str(rng.choice(cols))})
        if opt == "move" and empty:
            return apply_edit(result, {"op": "move", "cell": o.cell, "to": int(rng.choice(empty))})
        if opt == "remove":
            return apply_edit(result, {"op": "remove", "cell": o.cell})
    return None


def _partial(scene: Scene, ins: dict) -> list:
    edits = ins["edits"]
    if len(edits) == 2:
        return [("partial_first", apply_edit(scene, edits[0])),
                ("partial_second", apply_edit(scene, edits[1]) if _fits(scene, edits[1]) else None)]
    e = edits[0]
    if e["op"] == "recolour":
        obj = scene.at(e["cell"])
        others = tuple(o for o in scene.objects if o.cell != obj.cell)
        return [("partial", scene.with_objects(others + (dataclasses.replace(obj, colour=e["colour"],
                                                                             patch=obj.colour),)))]
    if e["op"] == "move":            # copied instead of moved: the original stays
        obj = scene.at(e["cell"])
        return [("partial", scene.with_objects(scene.objects + (dataclasses.replace(obj, cell=e["to"], dx=0.0,
                                                                                    dy=0.0),)))]
    return []


def _fits(scene: Scene, edit: dict) -> bool:
    try:
        apply_edit(scene, edit)
        return True
    except ValueError:
        return False


def make_candidates(scene: Scene, instruction: dict, rng: np.random.Generator) -> list:
    """``[(kind, candidate Scene), ...]``: the correct edit first, then every failure that applies (deduplicated)."""
    edits = instruction["edits"]
    correct = apply_instruction(scene, instruction)
    out = [("correct", correct)]
    avoid = set().union(*(touched_cells(e) for e in edits))
    for kind in ("wrong_object", "wrong_colour", "wrong_shape", "wrong_position", "wrong_size"):
        idx = int(rng.integers(len(edits)))           # in a two-step edit one step goes wrong
        bad = _wrong_edit(scene if idx == 0 else apply_edit(scene, edits[0]), edits[idx], kind, rng, avoid)
        if bad is None:
            continue
        new_edits = list(edits)
        new_edits[idx] = bad
        try:
            out.append((kind, apply_instruction(scene, {"edits": new_edits})))
        except ValueError:
            continue
    out += [(k, s) for k, s in _partial(scene, instruction) if s is not None]
    protected = avoid
    coll = _collateral(correct, protected, any(e["op"] == "background" for e in edits), rng)
    if coll is not None:
        out.append(("collateral", coll))
    out.append(("noop", scene))
    out.append(("noise", correct.replace(artefact="noise", seed=int(rng.integers(0, 2**31 - 1)))))
    if correct.objects:              # blur is invisible on an empty background
        out.append(("blur", correct.replace(artefact="blur")))
    seen, unique = set(), []
    for kind, cand in out:
        key = (view_of_scene(cand).content(), cand.artefact)
        if key in seen:
            continue
        seen.add(key)
        unique.append((kind, cand))
    return unique
