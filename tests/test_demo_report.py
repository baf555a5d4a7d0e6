"""The demo report's target rows and its "Targets not met" line (no demo run: hand-made results)."""
from edit_r1_jax.demo.report import summary_rows, unmet_targets, write_report


def _results(sft_acc, sft_half, gcpo_acc, gold_before, gold_after):
    return {"accuracy_noise": 0.06,
            "rrm_sft": {"accuracy": sft_acc, "accuracy_half_ties": sft_half, "pearson_r": 0.1},
            "rrm_gcpo": {"accuracy": gcpo_acc, "pearson_r": 0.2, "parse_failure_rate": 0.0},
            "editor_before": {"gold": gold_before, "rrm": 5.0}, "editor_after": {"gold": gold_after, "rrm": 6.0}}


def test_unmet_targets_names_exactly_the_failed_rows():
    rows = summary_rows(_results(0.5, 0.55, 0.40, 6.0, 5.0))
    assert unmet_targets(rows) == ["RRM pairwise accuracy after SFT (held-out, ties wrong)",
                                   "RRM pairwise accuracy after GCPO", "Editor mean GOLD score after GRPO"]
    assert unmet_targets(summary_rows(_results(0.8, 0.8, 0.78, 6.0, 7.0))) == []
    # GCPO may fall by the noise allowance and still count as "not lower beyond noise"
    assert "RRM pairwise accuracy after GCPO" not in unmet_targets(summary_rows(_results(0.8, 0.8, 0.75, 6, 7)))
    # chance with ties at half credit is 0.5: exactly 0.5 is not above it
    assert "RRM pairwise accuracy after SFT, ties at half credit (chance 0.5)" in unmet_targets(
        summary_rows(_results(0.0, 0.5, 0.0, 6.0, 7.0)))


def test_report_says_which_targets_were_missed(tmp_path):
    path = write_report(str(tmp_path), _results(0.2, 0.5, 0.2, 6.0, 7.0), [], [], {"rrm_sft": 1.0}, quick=True,
                        notes=["why it was missed"])
    text = open(path).read()
    line = next(l for l in text.splitlines() if l.startswith("**Targets not met"))
    assert line.startswith("**Targets not met (2):**")
    assert "after SFT (held-out, ties wrong)" in line and "ties at half credit" in line and "GRPO" not in line
    assert "- why it was missed" in text
    ok = open(write_report(str(tmp_path / "ok"), _results(0.8, 0.8, 0.8, 6.0, 7.0), [], [], {}, quick=False)).read()
    assert "Targets not met" not in ok
