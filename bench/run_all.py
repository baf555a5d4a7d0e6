"""Run every CPU benchmark in bench/ (each in its own process) and append the results to BENCHMARKS.md.

Usage: python bench/run_all.py [--only NAME ...] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPU_BENCHES = ["qwen_forward", "qwen_decode", "flux_forward", "compile_scaling", "fsdp_memory", "mfu_cpu",
               "reward_throughput", "grpo_step_split"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    results, failed = [], []
    for name in args.only or CPU_BENCHES:
        path = os.path.join(HERE, f"{name}.py")
        if not os.path.exists(path):
            print(f"-- {name}: not present, skipped")
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, path], cwd=ROOT, capture_output=True, text=True, timeout=900)
        sys.stdout.write(proc.stdout[-4000:])
        if proc.returncode:
            failed.append(name)
            sys.stdout.write(proc.stderr[-3000:])
        results += [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if results and not args.no_write:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write(f"\n### bench/run_all.py, {datetime.date.today().isoformat()}\n\n")
            f.write("| bench | ratio | goal | details |\n|---|---|---|---|\n")
            for r in results:
                details = {k: v for k, v in r.items() if k not in ("bench", "ratio", "goal", "machine")}
                f.write(f"| {r['bench']} | {r['ratio']} | {r['goal']} | `{json.dumps(details, default=float)[:300]}` |\n")
            m = results[0]["machine"]
            f.write(f"\nMachine: {m}\n")
    print(f"{len(results)} results, failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
