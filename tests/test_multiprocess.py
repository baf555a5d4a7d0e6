"""2 processes x 4 CPU devices (gloo) through launchers/local_multiprocess.sh give the single-process result."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_match_single_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIT_R1_")}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run(["bash", "launchers/local_multiprocess.sh", "2", sys.executable,
                           "tests/helpers/mp_sharded_sum.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = [json.loads(l.split("RESULT ", 1)[1]) for l in proc.stdout.splitlines() if "RESULT " in l]
    assert sorted(r["pid"] for r in results) == [0, 1]
    assert all(r["n"] == 2 and r["devices"] == 8 for r in results)
    full = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    ref = np.tanh(full @ w / 100.0).sum(0)
    for r in results:
        np.testing.assert_allclose(r["y"], ref, rtol=1e-5)


def test_launcher_usage_message():
    proc = subprocess.run(["bash", "launchers/local_multiprocess.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_failing_process_fails_the_launch():
    proc = subprocess.run(["bash", "launchers/local_multiprocess.sh", "2", "bash", "-c",
                           'if [ "$EDIT_R1_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 30'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
