"""`edit-r1-jax score`: score edit records with a reasoning reward model directory.

    edit-r1-jax score --rrm DIR --data edits.jsonl --out scores.jsonl [--mode generate|logits] [--samples k]
                      [--skip-bad] [--resume]

Input JSONL and output lines: see `edit_r1_jax.rrm.records`. The output is appended and flushed after every batch;
``--resume`` skips the ids already in it. A bad record (missing file, unreadable image, missing field, empty
principles) stops the run with its line number (exit code 2), or with ``--skip-bad`` is skipped and counted.
The last line printed is a JSON summary (scored, skipped, parse-failure rate, ...).
"""
from __future__ import annotations

import json
import sys


# ---------------------------------------------------------------------------------------------------- shared options

def add_model_args(p, samples: bool = True) -> None:
    """Options shared by the commands that run a Qwen2.5-VL checkpoint (score, eval-preference, principles)."""
    p.add_argument("--batch-size", type=int, default=8, help="rows per decode batch (padded; static shapes)")
    p.add_argument("--bucket", type=int, default=64, help="prompt/cache lengths are padded to multiples of this")
    p.add_argument("--max-new-tokens", type=int, default=512, help="decode budget per trace")
    p.add_argument("--mesh", default="auto",
                   help="'auto' (all devices on the data axis when there are several), 'none', or D,F,T sizes "
                        "of the ('data','fsdp','tensor') mesh, one of them -1 (fill)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--temperature", type=float, default=None,
                   help="decode temperature (default: 0 = greedy for one sample, 0.7 for several)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    if samples:
        p.add_argument("--mode", choices=("generate", "logits"), default="generate",
                       help="generate: decode and parse a trace (paper); logits: expected digit after '<score>'")
        p.add_argument("--samples", type=int, default=1, help="traces per record, averaged (generate mode)")
        p.add_argument("--share-prefix", choices=("auto", "on", "off"), default="auto",
                       help="reuse the KV cache of prompts that share the source image (GRPO groups, pairs)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--compact-prompt", dest="compact", action="store_const", const=True, default=None,
                       help="use the short scoring system prompt (default: from DIR/rrm.json, else the full one)")
        g.add_argument("--full-prompt", dest="compact", action="store_const", const=False)


def make_mesh(spec: str):
    import jax
    from edit_r1_jax import parallel
    if spec == "none" or (spec == "auto" and jax.device_count() == 1):
        return None
    if spec == "auto":
        return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    try:
        d, f, t = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: expected auto, none or three comma-separated sizes like -1,1,1")
    return parallel.make_mesh({"data": d, "fsdp": f, "tensor": t})


def load_model(args, path: str, compact=None):
    from edit_r1_jax.rrm.reward import RewardModel
    return RewardModel.from_dir(path, mesh=make_mesh(args.mesh), compact=compact, batch_size=args.batch_size,
                                bucket=args.bucket, max_new_tokens=args.max_new_tokens)


def share_prefix_flag(value: str):
    return {"auto": None, "on": True, "off": False}[value]


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------- command

def add_parser(subparsers):
    p = subparsers.add_parser("score", help="score edit records (JSONL) with a reasoning reward model",
                              description=__doc__)
    p.add_argument("--rrm", required=True, help="reward model directory (HF layout, e.g. WORKDIR/hf of sft)")
    p.add_argument("--data", required=True, help="input edit records JSONL")
    p.add_argument("--out", required=True, help="output scores JSONL (appended per batch)")
    p.add_argument("--resume", action="store_true", help="continue an existing --out, skipping done ids")
    p.add_argument("--summary", default=None, help="also write the summary JSON to this file")
    add_model_args(p)
    return p


def _load_images(recs, skip_bad, bad_msgs):
    """Decode the images of a chunk; a record whose image fails is an error or (skip_bad) dropped."""
    from edit_r1_jax.data.formats import RecordError, load_image
    out = []
    for r in recs:
        try:
            out.append(dict(r, source=load_image(r["source"]), edited=load_image(r["edited"])))
        except Exception as e:  # noqa: BLE001 - PIL decode errors come in many types
            msg = f"{r['_origin']}: unreadable image ({type(e).__name__}: {e})"
            if not skip_bad:
                raise RecordError(msg) from None
            bad_msgs.append(msg)
    return out


def run(args) -> int:
    import math
    import time

    from edit_r1_jax import parallel
    from edit_r1_jax.data.formats import RecordError
    from edit_r1_jax.rrm import records
    parallel.maybe_initialize_distributed()
    import jax
    from edit_r1_jax.train.metrics import progress_bar

    t0 = time.perf_counter()
    try:
        recs, stats = records.read_score_records(args.data, skip_bad=args.skip_bad)
        writer = records.ResultWriter(args.out, resume=args.resume) if jax.process_index() == 0 else None
    except (RecordError, FileNotFoundError, FileExistsError) as e:
        return fail(str(e))
    done = writer.done if writer is not None else set()
    todo = [r for r in recs if str(r["id"]) not in done]
    model = load_model(args, args.rrm, args.compact)
    bs = model.effective_batch_size()
    bar = progress_bar(total=len(recs), initial=len(recs) - len(todo), desc="score")
    bad_msgs: list = []
    n_scored = traces = failed = 0
    scores, statuses = [], {}
    key = jax.random.key(args.seed)
    try:
        for n, lo in enumerate(range(0, len(todo), bs)):
            chunk = _load_images(todo[lo:lo + bs], args.skip_bad, bad_msgs)
            if chunk:
                res = model.score(chunk, mode=args.mode, samples=args.samples, temperature=args.temperature,
                                  rng=jax.random.fold_in(key, n), batch_size=bs,
                                  share_prefix=share_prefix_flag(args.share_prefix))
                rows = []
                for r, rec in zip(res, chunk):
                    row = r.to_json()
                    row["mode"] = args.mode
                    if rec.get("category") is not None:
                        row["category"] = rec["category"]
                    rows.append(row)
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if not math.isnan(r.score):
                        scores.append(r.score)
                if writer is not None:
                    writer.write(rows)
                n_scored += len(res)
                traces += res.num_traces
                failed += res.num_failed_traces
            bar.update(len(todo[lo:lo + bs]))
    except RecordError as e:
        return fail(f"{e} (the {n_scored} records scored before it are in {args.out}; rerun with --resume)")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    dt = time.perf_counter() - t0
    summary = {"scored": n_scored, "already_done": len(recs) - len(todo), "skipped_bad": stats.num_bad + len(bad_msgs),
               "parse_failure_rate": failed / traces if traces else 0.0, "statuses": statuses,
               "mean_score": sum(scores) / len(scores) if scores else None, "mode": args.mode,
               "samples": args.samples, "seconds": round(dt, 3), "out": args.out}
    for m in (stats.errors + bad_msgs)[:5]:
        print(f"skipped: {m}", file=sys.stderr)
    if args.summary and jax.process_index() == 0:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0
