"""The demo's report: a summary table (printed and in report.md), loss/reward curves and sample grids as PNG."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def summary_rows(results: dict) -> list:
    """(metric, value, target, met?) rows from the demo's results dict."""
    r = results
    rows = [
        ("RRM pairwise accuracy after SFT (held-out, ties wrong)", r.get("rrm_sft", {}).get("accuracy"),
         ">= 0.75", _ge(r.get("rrm_sft", {}).get("accuracy"), 0.75)),
        ("RRM pairwise accuracy after SFT, ties at half credit (chance 0.5)",
         r.get("rrm_sft", {}).get("accuracy_half_ties"), "> 0.5",
         _gt(r.get("rrm_sft", {}).get("accuracy_half_ties"), 0.5)),
        ("RRM pairwise accuracy after GCPO", r.get("rrm_gcpo", {}).get("accuracy"),
         ">= after SFT - noise", _ge(r.get("rrm_gcpo", {}).get("accuracy"),
                                     (r.get("rrm_sft", {}).get("accuracy") or 0) - r.get("accuracy_noise", 0.0))),
        ("RRM score vs gold score, Pearson r (after GCPO)", r.get("rrm_gcpo", {}).get("pearson_r"), "-", None),
        ("RRM score vs gold score, Pearson r (after SFT)", r.get("rrm_sft", {}).get("pearson_r"), "-", None),
        ("RRM parse-failure rate (after GCPO)", r.get("rrm_gcpo", {}).get("parse_failure_rate"), "-", None),
        ("Editor mean GOLD score before GRPO", r.get("editor_before", {}).get("gold"), "-", None),
        ("Editor mean GOLD score after GRPO", r.get("editor_after", {}).get("gold"), "> before",
         _gt(r.get("editor_after", {}).get("gold"), r.get("editor_before", {}).get("gold"))),
        ("Editor mean RRM reward before GRPO", r.get("editor_before", {}).get("rrm"), "-", None),
        ("Editor mean RRM reward after GRPO", r.get("editor_after", {}).get("rrm"), "-", None),
    ]
    return rows


def _ge(a, b):
    return None if a is None or b is None or (isinstance(a, float) and math.isnan(a)) else bool(a >= b)


def _gt(a, b):
    return None if a is None or b is None else bool(a > b)


def table_text(rows: Sequence[tuple]) -> str:
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for name, val, target, met in rows:
        lines.append(f"| {name} | {fmt(val)} | {target} | {'-' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str, scale: int = 2, labels: Sequence[str] | None = None
              ) -> str:
    """Rows of uint8 HWC images -> one PNG (each image upscaled ``scale`` x, 2-px white gaps)."""
    from PIL import Image
    ims = [[np.kron(np.asarray(im, np.uint8), np.ones((scale, scale, 1), np.uint8)) for im in row] for row in rows]
    h = max(im.shape[0] for row in ims for im in row)
    w = max(im.shape[1] for row in ims for im in row)
    ncol = max(len(r) for r in ims)
    canvas = np.full((len(ims) * (h + 2), ncol * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(ims):
        for j, im in enumerate(row):
            canvas[i * (h + 2):i * (h + 2) + im.shape[0], j * (w + 2):j * (w + 2) + im.shape[1]] = im[..., :3]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def unmet_targets(rows: Sequence[tuple]) -> list:
    """Names of the summary rows whose target was checked and not met."""
    return [name for name, _, _, met in rows if met is False]


def write_report(out_dir: str, results: dict, plots: Sequence[tuple[str, str]], grids: Sequence[tuple[str, str]],
                 timings: dict, quick: bool, notes: Sequence[str] = ()) -> str:
    rows = summary_rows(results)
    lines = [f"# Edit-R1 demo report{' (quick mode)' if quick else ''}", "",
             "The whole pipeline on the synthetic, verifiable editing world: RRM SFT -> GCPO -> editor flow-matching "
             "SFT -> editor Flow-GRPO with the RRM as reward -> evaluation. Gold scores come from the programmatic "
             "verifier, never from the RRM.", "", "## Summary", "", table_text(rows), ""]
    missed = unmet_targets(rows)
    if missed:
        lines += [f"**Targets not met ({len(missed)}):** " + "; ".join(missed) + ". The measured numbers are above; "
                  "why, and what was tried, is under Notes and in NOTES.md.", ""]
    lines += ["## Stage timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", "## Details", ""]
    for k, v in results.items():
        if isinstance(v, dict):
            lines.append(f"- **{k}**: " + ", ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items()))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Curves", ""] + [f"![{t}]({os.path.relpath(p, out_dir)})" for t, p in plots]
    lines += ["", "## Samples", ""] + [f"**{t}**\n\n![{t}]({os.path.relpath(p, out_dir)})\n" for t, p in grids]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
