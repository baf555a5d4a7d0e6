"""Preference evaluation: accuracy with ties wrong / 0.5 credit / per category, pair formats (ours and
EditReward-style), evaluate() bookkeeping with a stub scorer, and the eval-preference CLI on a tiny random RRM."""
import json
import math
import os

import pytest

from edit_r1_jax.cli import main
from edit_r1_jax.data import synthetic
from edit_r1_jax.data.formats import RecordError
from edit_r1_jax.eval import preference
from edit_r1_jax.rrm import records as rec_lib
from edit_r1_jax.rrm.reward import Scores, ScoreResult

SIZE = 56
nan = float("nan")


def test_pairwise_accuracy_ties_failures_categories():
    w = [3.0, 5.0, 5.0, nan, 2.0, 9.0]
    l = [1.0, 5.0, 6.0, 2.0, nan, 8.5]
    cats = ["add", "add", "color", "color", None, "add"]
    s = preference.pairwise_accuracy(w, l, cats)
    assert s["n"] == 6 and s["ties"] == 3 and s["failures"] == 2          # 5=5, and the two NaN pairs
    assert s["accuracy"] == pytest.approx(2 / 6)                           # ties are wrong
    assert s["accuracy_half"] == pytest.approx((2 + 1.5) / 6)
    assert set(s["per_category"]) == {"add", "color"}
    assert s["per_category"]["add"] == {"n": 3, "accuracy": pytest.approx(2 / 3),
                                        "accuracy_half": pytest.approx(2.5 / 3), "ties": 1}
    assert s["per_category"]["color"]["accuracy"] == 0.0 and s["per_category"]["color"]["ties"] == 1
    with pytest.raises(ValueError):
        preference.pairwise_accuracy([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pairs"))
    path = rec_lib.write_pair_records(synthetic.make_preference_pairs(3, seed=0, size=SIZE), d)
    return d, path


def _editreward_lines(ours_path):
    out = []
    for x in open(ours_path):
        o = json.loads(x)
        out.append({"id": o["id"], "prompt": o["instruction"], "path_src": o["source"], "path1": o["preferred"],
                    "path2": o["rejected"], "task_type": o["category"]})
    return out


def test_read_pairs_formats(pair_dir, tmp_path):
    d, ours = pair_dir
    pairs, stats = preference.read_pairs(ours)
    assert len(pairs) == 3 and stats.num_bad == 0
    assert all(os.path.isabs(p["preferred"]) and p["principles"] for p in pairs)
    er = _editreward_lines(ours)
    er_path = os.path.join(d, "editreward.jsonl")
    with open(er_path, "w") as f:
        f.write("\n".join(json.dumps(o) for o in er) + "\n")
    with pytest.raises(RecordError, match=r"editreward.jsonl:1: missing required field 'principles'"):
        preference.read_pairs(er_path)
    generic, _ = preference.read_pairs(er_path, generic_principles=True)
    assert [p["principles"] for p in generic] == [preference.GENERIC_PRINCIPLES] * 3
    assert [p["category"] for p in generic] == [p["category"] for p in pairs]
    assert [p["preferred"] for p in generic] == [p["preferred"] for p in pairs]
    pmap_path = os.path.join(d, "principles.jsonl")
    with open(pmap_path, "w") as f:
        for p in pairs:
            f.write(json.dumps({"id": p["id"], "principles": p["principles"]}) + "\n")
    mapped, _ = preference.read_pairs(er_path, principles=pmap_path)
    assert [p["principles"] for p in mapped] == [p["principles"] for p in pairs]
    # EditReward-Bench style: output_images = [preferred, rejected]
    vsl = [{"key": o["id"], "instruction": o["prompt"], "input_image": o["path_src"],
            "output_images": [o["path1"], o["path2"]]} for o in er]
    vsl[1]["output_images"] = vsl[1]["output_images"][:1]
    vsl_path = os.path.join(d, "vsl.jsonl")
    with open(vsl_path, "w") as f:
        f.write("\n".join(json.dumps(o) for o in vsl) + "\n")
    got, stats = preference.read_pairs(vsl_path, generic_principles=True, skip_bad=True)
    assert len(got) == 2 and stats.num_bad == 1 and "vsl.jsonl:2" in stats.errors[0]
    assert got[0]["rejected"] == pairs[0]["rejected"]


class StubModel:
    """Scores each edited image by a lookup table (NaN = parse failure)."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def effective_batch_size(self, bs=None):
        return 4

    def score(self, records, **kw):
        self.calls.append([r["id"] for r in records])
        out = Scores()
        for r in records:
            s = self.table[r["edited"]]
            out.append(ScoreResult(r["id"], s, 0.0 if math.isnan(s) else s, "failed" if math.isnan(s) else "ok",
                                   [], None, ["t"], [s]))
            out.num_traces += 1
            out.num_failed_traces += int(math.isnan(s))
        return out


def test_evaluate_bookkeeping_with_stub():
    pairs = [{"id": f"p{i}", "instruction": "x", "principles": ["q"], "source": "s", "preferred": f"w{i}",
              "rejected": f"l{i}", "category": "add" if i < 2 else "color"} for i in range(5)]
    table = {"w0": 8, "l0": 2, "w1": 3, "l1": 3, "w2": 1, "l2": 9, "w3": 7, "l3": nan, "w4": 6, "l4": 5}
    seen = []
    summary, rows = preference.evaluate(StubModel(table), pairs, on_chunk=lambda r: seen.append(len(r)))
    assert seen == [2, 2, 1]                                  # batch 4 -> 2 pairs per chunk
    assert [r["correct"] for r in rows] == [True, False, False, False, True]
    assert [r["tie"] for r in rows] == [False, True, False, True, False]
    assert rows[3]["rejected_score"] is None and rows[3]["rejected_status"] == "failed"
    assert summary["accuracy"] == pytest.approx(2 / 5) and summary["accuracy_half"] == pytest.approx(3 / 5)
    assert summary["failures"] == 1 and summary["parse_failure_rate"] == pytest.approx(1 / 10)
    assert summary["per_category"]["add"]["accuracy"] == 0.5
    swapped = [dict(p, preferred=p["rejected"], rejected=p["preferred"]) for p in pairs]
    s2, _ = preference.evaluate(StubModel(table), swapped)
    assert s2["accuracy"] == pytest.approx(1 / 5)             # p2 flips to correct; ties stay wrong
    assert "acc" in preference.format_summary(summary)


def test_eval_preference_cli(pair_dir, tmp_path, capsys, highest_precision):
    d, ours = pair_dir
    rrm = rec_lib.write_tiny_rrm(str(tmp_path / "rrm"), image_size=SIZE, seed=0)
    er_path = os.path.join(d, "er_cli.jsonl")
    with open(er_path, "w") as f:
        f.write("\n".join(json.dumps(o) for o in _editreward_lines(ours)) + "\n")
    for extra in (["--pairs", ours], ["--pairs", er_path, "--generic-principles"]):
        out = tmp_path / "rows.jsonl"
        rc = main(["eval-preference", "--rrm", rrm, "--mode", "logits", "--out", str(out), "--batch-size", "4",
                   "--bucket", "512", "--mesh", "none"] + extra)
        assert rc == 0
        printed = capsys.readouterr().out.strip().splitlines()
        summary = json.loads(printed[-1])
        assert summary["n"] == 3 and summary["mode"] == "logits" and summary["failures"] == 0
        assert 0.0 <= summary["accuracy"] <= summary["accuracy_half"] <= 1.0
        assert set(summary["per_category"]) <= set(synthetic.CATEGORIES)
        rows = [json.loads(x) for x in open(out)]
        assert len(rows) == 3 and all(isinstance(r["preferred_score"], float) for r in rows)
        assert any(line.startswith("all") for line in printed)
    assert main(["eval-preference", "--rrm", rrm, "--pairs", er_path, "--mesh", "none"]) == 2
    assert "principles" in capsys.readouterr().err
