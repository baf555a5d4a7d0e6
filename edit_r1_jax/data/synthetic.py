"""The offline, verifiable editing world: public entry points.

Scenes (`synthetic_scene`), instructions (`synthetic_edits`), principles and the gold rule
(`synthetic_principles`), pixel perception (`synthetic_perception`), candidates (`synthetic_candidates`) and SFT
traces (`synthetic_traces`) live in their own modules; this one builds the datasets the training stages read and
exposes the gold verifier.

Every builder is deterministic in ``(n, seed)``, and record ``i`` depends only on ``(seed, i)`` (so the first k
records of ``n > k`` equal those of ``n = k``). Images are numpy uint8 HWC arrays; everything else is plain
JSON-able Python (scene graphs as ``Scene.to_dict()``).

Record schemas (all share ``id, category, instruction (text), edit (instruction dict), source_scene, source,
principles``; a principle is ``{"question", "category": Follow|Keep|Quality, "check"}``):

* `make_sft_records` -> ``edited, candidate_scene, candidate_kind, verdicts, gold_score, average, target``
  (``target`` is the assistant text, parseable by ``edit_r1_jax.rrm.parse.parse``);
* `make_preference_pairs` -> ``preferred, rejected`` (images), ``preferred_scene, rejected_scene,
  preferred_kind, rejected_kind, preferred_score > rejected_score, preferred_verdicts, rejected_verdicts``;
* `make_edit_prompts` -> ``target, target_scene`` (the correct edit, for editor SFT and reference).

The gold verifier, `gold_score` / `gold_verdicts` / `judge`, takes the source scene, the instruction dict and a
candidate that is either a scene graph or an image (pixels are read by `synthetic_perception.perceive`).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from edit_r1_jax.data.synthetic_candidates import make_candidates
from edit_r1_jax.data.synthetic_edits import CATEGORIES, sample_instruction
from edit_r1_jax.data.synthetic_perception import perceive
from edit_r1_jax.data.synthetic_principles import judge_view, make_principles, view_of_scene
from edit_r1_jax.data.synthetic_scene import DEFAULT_SIZE, Scene, as_scene, render, sample_scene
from edit_r1_jax.data.synthetic_traces import STYLES, make_trace
from edit_r1_jax.rrm import prompts

__all__ = ["CATEGORIES", "DEFAULT_SIZE", "Scene", "render", "sample_world_item", "make_sft_records",
           "make_preference_pairs", "make_edit_prompts", "gold_score", "gold_verdicts", "judge", "world_texts",
           "public_principles"]

_STREAM = {"sft": 1, "pairs": 2, "prompts": 3, "texts": 4}


def _rng(seed: int, i: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(i), _STREAM[stream]])


def _category(rng: np.random.Generator, categories: Sequence[str] | None) -> str:
    cats = tuple(categories) if categories else CATEGORIES
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; expected a subset of {CATEGORIES}")
    return str(cats[int(rng.integers(len(cats)))])


def sample_world_item(rng: np.random.Generator, categories: Sequence[str] | None = None) -> tuple:
    """(source Scene, instruction dict, principles, candidates [(kind, Scene)]) from one rng."""
    scene = sample_scene(rng)
    ins = sample_instruction(scene, rng, _category(rng, categories))
    principles = make_principles(scene, ins, rng)
    return scene, ins, principles, make_candidates(scene, ins, rng)


def public_principles(principles: Sequence[dict]) -> list:
    """Principles without the machine check: what the RRM prompt shows."""
    return [{"question": p["question"], "category": p["category"]} for p in principles]


def _common(kind: str, seed: int, i: int, scene: Scene, ins: dict, principles: list, size: int) -> dict:
    return {"id": f"{kind}-{seed}-{i}", "category": ins["category"], "instruction": ins["text"], "edit": ins,
            "source_scene": scene.to_dict(), "source": render(scene, size), "principles": principles}


def make_sft_records(n: int, seed: int = 0, size: int = DEFAULT_SIZE, style: str = "full",
                     categories: Sequence[str] | None = None, correct_fraction: float = 0.2) -> list:
    """RRM SFT records: one (source, candidate) with gold verdicts, gold score and the target trace each.

    The candidate is the correct edit with probability ``correct_fraction``, otherwise a uniformly chosen failure.
    """
    out = []
    for i in range(n):
        rng = _rng(seed, i, "sft")
        scene, ins, principles, cands = sample_world_item(rng, categories)
        kind, cand = cands[0] if (rng.random() < correct_fraction or len(cands) == 1) else \
            cands[1 + int(rng.integers(len(cands) - 1))]
        src_view, cand_view = view_of_scene(scene), view_of_scene(cand)
        verdicts, score, no_edit = judge_view(scene, principles, cand_view)
        rec = _common("sft", seed, i, scene, ins, principles, size)
        rec.update({"edited": render(cand, size), "candidate_scene": cand.to_dict(), "candidate_kind": kind,
                    "verdicts": verdicts, "gold_score": score, "average": sum(verdicts) / len(verdicts),
                    "target": make_trace(principles, verdicts, score, src_view, cand_view, no_edit, rng, size, style)})
        out.append(rec)
    return out


def make_preference_pairs(n: int, seed: int = 0, size: int = DEFAULT_SIZE, min_gap: float = 0.5,
                          categories: Sequence[str] | None = None) -> list:
    """Preference pairs from gold scores: two candidates of one (scene, instruction) whose gold scores differ by at
    least ``min_gap`` (so "same" pairs never occur); the higher one is ``preferred``."""
    out = []
    for i in range(n):
        rng = _rng(seed, i, "pairs")
        for _ in range(20):
            scene, ins, principles, cands = sample_world_item(rng, categories)
            judged = [(k, c) + judge_view(scene, principles, view_of_scene(c))[:2] for k, c in cands]
            pairs = [(a, b) for a in range(len(judged)) for b in range(len(judged))
                     if judged[a][3] - judged[b][3] >= min_gap]
            if pairs:
                break
        else:
            raise RuntimeError(f"make_preference_pairs: no pair with gap >= {min_gap} (seed {seed}, item {i})")
        a, b = pairs[int(rng.integers(len(pairs)))]
        (kw, cw, vw, sw), (kl, cl, vl, sl) = judged[a], judged[b]
        rec = _common("pair", seed, i, scene, ins, principles, size)
        rec.update({"preferred": render(cw, size), "rejected": render(cl, size),
                    "preferred_scene": cw.to_dict(), "rejected_scene": cl.to_dict(),
                    "preferred_kind": kw, "rejected_kind": kl, "preferred_score": sw, "rejected_score": sl,
                    "preferred_verdicts": vw, "rejected_verdicts": vl})
        out.append(rec)
    return out


def make_edit_prompts(n: int, seed: int = 0, size: int = DEFAULT_SIZE,
                      categories: Sequence[str] | None = None) -> list:
    """Editing prompts for the editor (SFT and GRPO): source, instruction, principles and the correct result."""
    out = []
    for i in range(n):
        rng = _rng(seed, i, "prompts")
        scene = sample_scene(rng)
        ins = sample_instruction(scene, rng, _category(rng, categories))
        principles = make_principles(scene, ins, rng)
        target = make_candidates(scene, ins, rng)[0][1]
        rec = _common("prompt", seed, i, scene, ins, principles, size)
        rec.update({"target": render(target, size), "target_scene": target.to_dict()})
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Gold verifier
# ----------------------------------------------------------------------------------------------------------------
def judge(scene_before: Any, instruction: dict, candidate: Any, principles: Sequence[dict] | None = None) -> dict:
    """Gold judgement of a candidate: ``{"verdicts", "score", "no_edit", "view"}``.

    ``candidate`` is a scene graph (`Scene` or dict: exact verifier) or an image (HWC array: pixel verifier).
    ``principles`` default to those of (scene, instruction); any wording works, only their checks matter.
    """
    scene = as_scene(scene_before)
    if principles is None:
        principles = make_principles(scene, instruction)
    if isinstance(candidate, (Scene, dict)):
        view = view_of_scene(as_scene(candidate))
    else:
        view = perceive(candidate)
    verdicts, score, no_edit = judge_view(scene, list(principles), view)
    return {"verdicts": verdicts, "score": score, "no_edit": no_edit, "view": view}


def gold_score(scene_before: Any, instruction: dict, candidate: Any, principles: Sequence[dict] | None = None) -> float:
    """Gold score in [0, 10] (rule in `synthetic_principles`) of a scene-graph or image candidate."""
    return judge(scene_before, instruction, candidate, principles)["score"]


def gold_verdicts(scene_before: Any, instruction: dict, candidate: Any,
                  principles: Sequence[dict] | None = None) -> list:
    """Gold 0/1 verdict per principle of a scene-graph or image candidate."""
    return judge(scene_before, instruction, candidate, principles)["verdicts"]


# ----------------------------------------------------------------------------------------------------------------
# Text corpus (tokenizer training)
# ----------------------------------------------------------------------------------------------------------------
def world_texts(n: int = 400, seed: int = 0) -> list:
    """Every kind of text the world and the RRM prompts produce: instructions, principle lists (as decomposition
    outputs), scoring prompts (full and compact), and traces in every style for half of the candidates."""
    texts = [prompts.SCORING_SYSTEM, prompts.SCORING_SYSTEM_COMPACT, prompts.PRINCIPLE_SYSTEM]
    for i in range(n):
        rng = _rng(seed, i, "texts")
        scene, ins, principles, cands = sample_world_item(rng)
        pub = public_principles(principles)
        texts.append(ins["text"])
        texts.append(json.dumps(pub))
        texts.append(prompts.render_chat(prompts.build_principle_messages(ins["text"]), add_generation_prompt=True))
        texts.append(prompts.render_scoring_prompt(ins["text"], pub, compact=bool(i % 2)))
        src_view = view_of_scene(scene)
        for j, (kind, cand) in enumerate(cands):
            if (i + j) % 2:
                continue
            cand_view = view_of_scene(cand)
            verdicts, score, no_edit = judge_view(scene, principles, cand_view)
            texts.append(make_trace(principles, verdicts, score, src_view, cand_view, no_edit, rng, DEFAULT_SIZE,
                                    STYLES[(i + j // 2) % 3]) + prompts.IM_END)
    return texts
