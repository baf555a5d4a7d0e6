"""`edit-r1-jax demo --quick`: every stage runs end to end; the report has its structure; metrics are finite."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("rrm_sft", "rrm_gcpo", "editor_sft", "grpo")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "edit_r1_jax.cli", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("# Edit-R1 demo report (quick mode)", "## Summary", "## Stage timings", "## Curves", "## Samples",
                    "RRM pairwise accuracy after SFT", "RRM pairwise accuracy after GCPO",
                    "Editor mean GOLD score before GRPO", "Editor mean GOLD score after GRPO"):
        assert section in report, section
    assert (out / "editor_samples.png").stat().st_size > 0
    assert any(f.endswith("_curves.png") for f in os.listdir(out))
    for stage in STAGES:
        rows = [json.loads(l) for l in open(out / stage / "metrics.jsonl")]
        assert rows, stage
        for row in rows:
            for key in ("loss", "reward", "reward_mean"):
                if row.get(key) is not None:
                    assert math.isfinite(row[key]), (stage, key, row)
    res = json.load(open(out / "results.json"))["results"]
    for key in ("rrm_sft", "rrm_gcpo", "editor_before", "editor_after"):
        assert key in res
    assert 0.0 <= res["rrm_sft"]["accuracy"] <= 1.0
    assert math.isfinite(res["editor_before"]["gold"]) and math.isfinite(res["editor_after"]["gold"])
    assert res["editor_before"]["target_gold"] >= 9.0     # the verifier rates the correct edits highly
    # issue #9 asks for SFT accuracy above chance (ties at half credit: chance 0.5) by one standard error of the
    # quick evaluation set. Not reached (NOTES.md, "Session 3"); reported as xfail, with the value, until it is.
    acc, n = res["rrm_sft"]["accuracy_half_ties"], res["rrm_sft"]["pairs"]
    missed = next((line for line in report.splitlines() if line.startswith("**Targets not met")), "")
    if res["rrm_sft"]["accuracy"] < 0.75:       # the report must say so (issue #9: "say so in the report")
        assert "RRM pairwise accuracy after SFT (held-out" in missed, missed
    if not acc > 0.5 + 0.5 / math.sqrt(n):
        pytest.xfail(f"RRM pairwise accuracy after quick SFT {acc:.3f} (ties half) is not above chance 0.5 by one "
                     f"standard error over {n} pairs")
