"""Reward-model evaluation in the synthetic world: pairwise accuracy on held-out pairs, agreement with gold."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from edit_r1_jax.data import synthetic


def pair_records(pairs: Sequence[dict]) -> list:
    """Each pair -> two scoring records (source, preferred) and (source, rejected)."""
    out = []
    for p in pairs:
        common = {"instruction": p["instruction"], "principles": synthetic.public_principles(p["principles"]),
                  "source": p["source"]}
        out.append({**common, "id": f"{p['id']}/w", "edited": p["preferred"]})
        out.append({**common, "id": f"{p['id']}/l", "edited": p["rejected"]})
    return out


def pairwise_accuracy(scores_w: np.ndarray, scores_l: np.ndarray) -> dict:
    """Ties (and NaN) count as wrong (decision e15); the 0.5-credit variant gives ties half a point."""
    w, l = np.asarray(scores_w, float), np.asarray(scores_l, float)
    valid = np.isfinite(w) & np.isfinite(l)
    correct = valid & (w > l)
    ties = valid & (w == l)
    n = max(len(w), 1)
    return {"accuracy": float(correct.sum() / n), "accuracy_half_ties": float((correct.sum() + 0.5 * ties.sum()) / n),
            "ties": int(ties.sum()), "invalid": int((~valid).sum()), "pairs": int(len(w))}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def evaluate_rrm(reward_model: Any, pairs: Sequence[dict], gold_records: Sequence[dict],
                 mode: str = "generate") -> dict:
    """Accuracy on ``pairs`` and Pearson r of the RRM score with the gold score on ``gold_records``."""
    scored = reward_model.score(pair_records(pairs), mode=mode)
    s = scored.scores()
    acc = pairwise_accuracy(s[0::2], s[1::2])
    recs = [{"id": r["id"], "instruction": r["instruction"], "principles": synthetic.public_principles(r["principles"]),
             "source": r["source"], "edited": r["edited"]} for r in gold_records]
    g = reward_model.score(recs, mode=mode)
    r = pearson(g.scores(), [rec["gold_score"] for rec in gold_records])
    fail = (scored.parse_failure_rate * len(s) + g.parse_failure_rate * len(recs)) / max(len(s) + len(recs), 1)
    return {**acc, "pearson_r": r, "parse_failure_rate": float(fail),
            "mean_abs_err": float(np.nanmean(np.abs(g.scores() - np.array([x["gold_score"] for x in gold_records]))))
            if len(recs) else math.nan}
