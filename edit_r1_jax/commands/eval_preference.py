"""`edit-r1-jax eval-preference`: pairwise preference accuracy of a reasoning reward model.

    edit-r1-jax eval-preference --rrm DIR --pairs pairs.jsonl [--mode generate|logits] [--samples k]
                                [--principles principles.jsonl | --generic-principles] [--out rows.jsonl]

Reads our pair JSONL or EditReward-style pairs (`edit_r1_jax.eval.preference`); prints accuracy with ties counted
wrong, the 0.5-credit variant and a per-category table; the last line printed is the summary JSON.
"""
from __future__ import annotations

import json
import sys

from edit_r1_jax.commands.score import add_model_args, fail, load_model, share_prefix_flag


def add_parser(subparsers):
    p = subparsers.add_parser("eval-preference", help="pairwise preference accuracy of a reward model",
                              description=__doc__)
    p.add_argument("--rrm", required=True, help="reward model directory (HF layout)")
    p.add_argument("--pairs", required=True, help="preference pairs JSONL")
    p.add_argument("--principles", default=None,
                   help="JSONL of {id, principles} for pairs without principles (edit-r1-jax principles output)")
    p.add_argument("--generic-principles", action="store_true",
                   help="use a fixed generic checklist for pairs without principles")
    p.add_argument("--out", default=None, help="per-pair results JSONL (scores, correct, tie)")
    p.add_argument("--summary", default=None, help="also write the summary JSON to this file")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs only")
    add_model_args(p)
    return p


def run(args) -> int:
    from edit_r1_jax import parallel
    from edit_r1_jax.data.formats import RecordError
    from edit_r1_jax.eval import preference
    parallel.maybe_initialize_distributed()
    import jax
    from edit_r1_jax.train.metrics import progress_bar

    try:
        pairs, stats = preference.read_pairs(args.pairs, principles=args.principles,
                                             generic_principles=args.generic_principles, skip_bad=args.skip_bad)
    except (RecordError, FileNotFoundError) as e:
        return fail(str(e))
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        return fail(f"no valid pairs in {args.pairs} ({stats.num_bad} bad)")
    model = load_model(args, args.rrm, args.compact)
    out = open(args.out, "w") if args.out and jax.process_index() == 0 else None
    bar = progress_bar(total=len(pairs), desc="pairs")

    def on_chunk(rows):
        bar.update(len(rows))
        if out is not None:
            for r in rows:
                out.write(json.dumps(r) + "\n")
            out.flush()
    try:
        summary, _ = preference.evaluate(model, pairs, mode=args.mode, samples=args.samples,
                                         temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                                         share_prefix=share_prefix_flag(args.share_prefix), on_chunk=on_chunk)
    finally:
        bar.close()
        if out is not None:
            out.close()
    summary["skipped_bad"] = stats.num_bad
    for m in stats.errors[:5]:
        print(f"skipped: {m}", file=sys.stderr)
    print(preference.format_summary(summary))
    if args.summary and jax.process_index() == 0:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0
