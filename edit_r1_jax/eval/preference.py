"""Pairwise preference accuracy of a reward model (algorithms.md Table 2/4, decision e15).

For each pair (source, instruction, preferred edit x^w, rejected edit x^l) the model scores both edits; the pair is
*correct* when ``s(x^w) > s(x^l)``. Ties count as wrong (``accuracy``); the ``accuracy_half`` variant gives a tie
0.5. A parse failure (NaN score, e6) on either side counts as a tie. Per-category breakdowns use the pair's
``category``.

Pair JSONL formats read by `read_pairs`:
* ours (`edit_r1_jax.data.formats`, PAIR): ``id, instruction, source, preferred, rejected, principles, category``;
* EditReward-style: ``prompt`` (instruction), ``source`` / ``path_src``, ``preferred`` / ``path1`` / ``chosen``,
  ``rejected`` / ``path2``; EditReward-Bench style ``input_image`` + ``output_images: [preferred, rejected]``;
  ``task_type`` / ``edit_type`` -> ``category``.
Pairs without principles take them from a principles file (``{"id", "principles"}`` lines, as
``edit-r1-jax principles`` writes) or, if asked, from `GENERIC_PRINCIPLES`.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import numpy as np

from edit_r1_jax.data import formats
from edit_r1_jax.data.formats import RecordError
from edit_r1_jax.rrm import records as records_lib

PAIR_ALIASES = {"path_src": "source", "path1": "preferred", "path2": "rejected", "task_type": "category",
                "edit_type": "category"}

GENERIC_PRINCIPLES = [
    {"question": "Does the edited image carry out the instruction completely?", "category": "Follow"},
    {"question": "Is the requested change clearly visible, not faint or partial?", "category": "Follow"},
    {"question": "Is everything the instruction does not mention unchanged?", "category": "Keep"},
    {"question": "Does the main subject keep its identity, shape and pose?", "category": "Keep"},
    {"question": "Is the edited image free of artifacts, blur and distortions?", "category": "Quality"},
]


def load_principles_map(path: str) -> dict:
    """``{"id": ..., "principles": [...]}`` lines -> {id: principles}; the last non-empty entry per id wins."""
    out = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if isinstance(row, dict) and "id" in row and row.get("principles"):
                out[str(row["id"])] = row["principles"]
    return out


def pair_transform(principles_by_id: dict | None = None, generic: bool = False) -> Callable[[dict, str], dict]:
    """The per-line normaliser `read_pairs` applies before schema validation."""
    def transform(obj: dict, where: str) -> dict:
        obj = dict(obj)
        for k, v in PAIR_ALIASES.items():
            if k in obj and v not in obj:
                obj[v] = obj.pop(k)
        outs = obj.get("output_images")
        if isinstance(outs, list) and "preferred" not in obj and "rejected" not in obj:
            if len(outs) != 2:
                raise RecordError(f"{where}: field 'output_images' must hold 2 images (preferred first), "
                                  f"got {len(outs)}")
            obj["preferred"], obj["rejected"] = outs
            obj.pop("output_images")
        if not obj.get("principles"):
            rid = obj.get("id", obj.get("key"))
            if principles_by_id is not None and rid is not None and str(rid) in principles_by_id:
                obj["principles"] = principles_by_id[str(rid)]
            elif generic:
                obj["principles"] = [dict(p) for p in GENERIC_PRINCIPLES]
            else:
                raise RecordError(f"{where}: missing required field 'principles' (give a principles file with "
                                  f"--principles, or --generic-principles)")
        return obj
    return transform


def read_pairs(path: str, principles: str | dict | None = None, generic_principles: bool = False,
               skip_bad: bool = False, check_images: bool = True) -> tuple[list, formats.ReadStats]:
    """Preference pairs (module docstring) -> (normalised PAIR records, stats)."""
    pmap = load_principles_map(principles) if isinstance(principles, str) else principles
    return records_lib.read_records(path, formats.PAIR, skip_bad=skip_bad, check_images=check_images,
                                    transform=pair_transform(pmap, generic_principles))


def _acc(win: np.ndarray, tie: np.ndarray) -> dict:
    n = int(win.size)
    return {"n": n, "accuracy": float(win.mean()) if n else float("nan"),
            "accuracy_half": float((win + 0.5 * tie).mean()) if n else float("nan"),
            "ties": int(tie.sum())}


def pairwise_accuracy(preferred_scores: Sequence[float], rejected_scores: Sequence[float],
                      categories: Sequence[Any] | None = None) -> dict:
    """Accuracy with ties wrong, the 0.5-credit variant, tie and failure counts, and ``per_category``."""
    w = np.asarray(preferred_scores, np.float64)
    l = np.asarray(rejected_scores, np.float64)
    if w.shape != l.shape or w.ndim != 1:
        raise ValueError(f"pairwise_accuracy: score arrays must be 1-D and equal length, got {w.shape}, {l.shape}")
    failed = np.isnan(w) | np.isnan(l)
    win = (w > l) & ~failed
    tie = ~win & ~((w < l) & ~failed)          # equal scores, or a failure on either side
    out = _acc(win.astype(np.float64), tie.astype(np.float64))
    out["failures"] = int(failed.sum())
    if categories is not None:
        cats = np.asarray([("" if c is None else str(c)) for c in categories])
        if cats.shape != w.shape:
            raise ValueError(f"pairwise_accuracy: {cats.size} categories for {w.size} pairs")
        out["per_category"] = {c: _acc(win[cats == c].astype(np.float64), tie[cats == c].astype(np.float64))
                               for c in sorted(set(cats.tolist())) if c}
    return out


def scoring_records(pairs: Sequence[dict]) -> list:
    """Each pair -> two scoring records (preferred, rejected) sharing the source prefix."""
    out = []
    for p in pairs:
        for side in ("preferred", "rejected"):
            out.append({"id": f"{p['id']}::{side}", "instruction": p["instruction"], "principles": p["principles"],
                        "source": p["source"], "edited": p[side]})
    return out


def evaluate(model, pairs: Sequence[dict], *, mode: str = "generate", samples: int = 1,
             temperature: float | None = None, seed: int = 0, batch_size: int | None = None,
             share_prefix: bool | None = None, max_new_tokens: int | None = None,
             on_chunk: Callable[[list], None] | None = None) -> tuple[dict, list]:
    """Score every pair with ``model`` (a `RewardModel`) -> (summary, per-pair rows).

    Pairs go in chunks of ``batch_size // 2`` (two scoring rows each); ``on_chunk(rows)`` runs after each chunk
    (progress, incremental output). The summary adds ``parse_failure_rate`` (over generated traces) and ``mode``.
    """
    import jax
    pairs = list(pairs)
    bs = model.effective_batch_size(batch_size)
    per_chunk = max(bs // 2, 1)
    rows, traces, failed = [], 0, 0
    key = jax.random.key(seed)
    for n, lo in enumerate(range(0, len(pairs), per_chunk)):
        chunk = pairs[lo:lo + per_chunk]
        res = model.score(scoring_records(chunk), mode=mode, samples=samples, temperature=temperature,
                          rng=jax.random.fold_in(key, n), batch_size=bs, share_prefix=share_prefix,
                          max_new_tokens=max_new_tokens)
        traces += res.num_traces
        failed += res.num_failed_traces
        new = []
        for j, p in enumerate(chunk):
            rw, rl = res[2 * j], res[2 * j + 1]
            sw, sl = rw.score, rl.score
            ok = not (math.isnan(sw) or math.isnan(sl))
            new.append({"id": p["id"], "category": p.get("category"),
                        "preferred_score": None if math.isnan(sw) else sw,
                        "rejected_score": None if math.isnan(sl) else sl,
                        "correct": bool(ok and sw > sl), "tie": bool(not ok or sw == sl),
                        "preferred_status": rw.status, "rejected_status": rl.status})
        rows.extend(new)
        if on_chunk is not None:
            on_chunk(new)
    nan = float("nan")
    summary = pairwise_accuracy([nan if r["preferred_score"] is None else r["preferred_score"] for r in rows],
                                [nan if r["rejected_score"] is None else r["rejected_score"] for r in rows],
                                [r["category"] for r in rows] if any(r["category"] for r in rows) else None)
    summary["parse_failure_rate"] = failed / traces if traces else 0.0
    summary["mode"] = mode
    return summary, rows


def format_summary(summary: dict) -> str:
    """Human-readable table of a `pairwise_accuracy` summary."""
    def line(name, d):
        return f"{name:<24} {d['n']:>6} {100 * d['accuracy']:>8.2f} {100 * d['accuracy_half']:>10.2f} {d['ties']:>6}"
    out = [f"{'':<24} {'pairs':>6} {'acc %':>8} {'acc½ %':>10} {'ties':>6}", line("all", summary)]
    for c, d in summary.get("per_category", {}).items():
        out.append(line(c, d))
    extra = [f"failures: {summary.get('failures', 0)}"]
    if "parse_failure_rate" in summary:
        extra.append(f"parse-failure rate: {100 * summary['parse_failure_rate']:.2f}%")
    return "\n".join(out + ["  ".join(extra)])
