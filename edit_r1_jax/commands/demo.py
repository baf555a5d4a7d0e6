"""`edit-r1-jax demo`: the whole Edit-R1 pipeline on the offline synthetic editing world (writes OUT/report.md)."""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="run the embedded synthetic-world pipeline end to end", description=__doc__)
    p.add_argument("--quick", action="store_true", help="every stage end to end in about 3 minutes (smaller, fewer steps)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo); rerunning resumes")
    p.add_argument("--config", default=None, help="demo config file (default configs/demo.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set demo.eval_pairs=32")
    return p


def run(args) -> int:
    import logging
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from edit_r1_jax.demo.run import run_demo
    run_demo(args.out, quick=args.quick, config_path=args.config, overrides=args.overrides)
    return 0
