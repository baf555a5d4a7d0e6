"""`edit-r1-jax principles`: decompose (source image, instruction) records into evaluation points (§c1, e8).

    edit-r1-jax principles --model DIR --data records.jsonl --out principles.jsonl [--retries 3]

Runs the principle-decomposition prompt (`edit_r1_jax.rrm.prompts.build_principle_messages`) with any
Qwen2.5-VL checkpoint directory (e.g. a large instruct model), parses the JSON list with
`edit_r1_jax.rrm.parse.parse_principles` (categories Follow / Keep / Quality) and writes each input record with
its ``principles`` added (image paths relative to the output file), so the output is directly a scoring /
training input. Malformed output is retried up to ``--retries`` times with a new seed at
``--retry-temperature``; records that still fail are written with ``"status": "failed"`` and the raw text, listed
in the summary, and retried by a later ``--resume`` run.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from edit_r1_jax.commands.score import add_model_args, fail, load_model

REQUEST = "principle_request"


def validate_request(obj: Any, kind: str, where: str, base_dir: str) -> dict:
    """A decomposition request: ``instruction`` (non-empty string) and a readable ``source`` image."""
    from edit_r1_jax.data import formats
    from edit_r1_jax.rrm.records import check_image
    if not isinstance(obj, dict):
        raise formats.RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rec = {formats.ALIASES.get(k, k): v for k, v in obj.items()}
    ins = rec.get("instruction")
    if not isinstance(ins, str) or not ins.strip():
        raise formats.RecordError(f"{where}: missing or empty required field 'instruction'")
    src = rec.get("source")
    if not isinstance(src, str) or not src:
        raise formats.RecordError(f"{where}: missing required image field 'source' (path or data URI)")
    if not src.startswith("data:"):
        src = src if os.path.isabs(src) else os.path.join(base_dir, src)
        if not os.path.exists(src):
            raise formats.RecordError(f"{where}: image field 'source': file not found: {src}")
    rec["source"] = src
    check_image(src, where, "source")
    for f in ("edited", "preferred", "rejected"):
        if isinstance(rec.get(f), str) and not rec[f].startswith("data:") and not os.path.isabs(rec[f]):
            rec[f] = os.path.join(base_dir, rec[f])
    rec.setdefault("id", where)
    rec["_origin"] = where
    return rec


def principle_example(inputs, instruction: str, source, num_points: int = 10) -> dict:
    """Tokenised decomposition prompt: input_ids [T], pixel_values [N, D], image_grid_thw [1, 3]."""
    from edit_r1_jax.data.formats import load_image
    from edit_r1_jax.rrm import prompts
    text = prompts.render_chat(prompts.build_principle_messages(instruction, num_points=num_points),
                               add_generation_prompt=True)
    pv, grid = inputs.images([load_image(source)])
    return {"input_ids": inputs.encode_ids(inputs.expand_placeholders(text, grid)), "pixel_values": pv,
            "image_grid_thw": grid}


def add_parser(subparsers):
    p = subparsers.add_parser("principles", help="decompose edit instructions into evaluation points with a VLM",
                              description=__doc__)
    p.add_argument("--model", required=True, help="Qwen2.5-VL checkpoint directory (HF layout)")
    p.add_argument("--data", required=True, help="JSONL of {id, instruction, source, ...}")
    p.add_argument("--out", required=True, help="output JSONL: the input records with 'principles' added")
    p.add_argument("--retries", type=int, default=3, help="extra attempts (new seed) for malformed output")
    p.add_argument("--retry-temperature", type=float, default=0.7, help="temperature of the retries")
    p.add_argument("--num-points", type=int, default=10, help="evaluation points asked for")
    p.add_argument("--min-points", type=int, default=1, help="fewer valid points than this counts as malformed")
    p.add_argument("--resume", action="store_true", help="continue an existing --out (failed ids are retried)")
    add_model_args(p, samples=False)
    return p


def _row(rec: dict, out_dir: str, principles, status: str, attempts: int, raw: str | None) -> dict:
    row = {}
    for k, v in rec.items():
        if k.startswith("_"):
            continue
        if k in ("source", "edited", "preferred", "rejected") and isinstance(v, str) and os.path.isabs(v):
            v = os.path.relpath(v, out_dir)
        row[k] = v
    row.update({"principles": principles, "status": status, "attempts": attempts})
    if raw is not None:
        row["raw"] = raw
    return row


def run(args) -> int:
    from edit_r1_jax import parallel
    from edit_r1_jax.data.formats import RecordError
    from edit_r1_jax.rrm import records
    from edit_r1_jax.rrm.parse import parse_principles
    parallel.maybe_initialize_distributed()
    import jax
    from edit_r1_jax.train.metrics import progress_bar

    try:
        recs, stats = records.read_records(args.data, REQUEST, skip_bad=args.skip_bad, validate=validate_request)
        writer = records.ResultWriter(args.out, resume=args.resume, done_if=lambda r: r.get("status") == "ok") \
            if jax.process_index() == 0 else None
    except (RecordError, FileNotFoundError, FileExistsError) as e:
        return fail(str(e))
    done = writer.done if writer is not None else set()
    pending = [r for r in recs if str(r["id"]) not in done]
    model = load_model(args, args.model, compact=False)
    bs = model.effective_batch_size()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    examples = {id(r): principle_example(model.inputs, r["instruction"], r["source"], args.num_points)
                for r in pending}
    last_text: dict = {}
    bar = progress_bar(total=len(recs), initial=len(recs) - len(pending), desc="principles")
    ok = 0
    for attempt in range(args.retries + 1):
        if not pending:
            break
        temp = (0.0 if args.temperature is None else args.temperature) if attempt == 0 else args.retry_temperature
        key = jax.random.key(args.seed + 1000 * attempt)
        still = []
        for n, lo in enumerate(range(0, len(pending), bs)):
            chunk = pending[lo:lo + bs]
            toks = model.generate_tokens([examples[id(r)] for r in chunk], temperature=temp,
                                         rng=jax.random.fold_in(key, n), batch_size=bs)
            rows = []
            for r, text in zip(chunk, model.decode(toks)):
                pr = parse_principles(text)
                if pr is not None and len(pr) >= args.min_points:
                    rows.append(_row(r, out_dir, pr, "ok", attempt + 1, None))
                else:
                    last_text[id(r)] = text
                    still.append(r)
            if writer is not None and rows:
                writer.write(rows)
            ok += len(rows)
            bar.update(len(rows))
        pending = still
    if writer is not None and pending:
        writer.write([_row(r, out_dir, None, "failed", args.retries + 1, last_text.get(id(r))) for r in pending])
    bar.update(len(pending))
    bar.close()
    if writer is not None:
        writer.close()
    summary = {"ok": ok, "failed": len(pending), "failed_ids": [r["id"] for r in pending][:50],
               "already_done": len(recs) - len(examples), "skipped_bad": stats.num_bad, "out": args.out}
    for r in pending[:10]:
        print(f"failed after {args.retries + 1} attempts: {r['_origin']} (id {r['id']}); last output: "
              f"{(last_text.get(id(r)) or '')[:120]!r}", file=sys.stderr)
    print(json.dumps(summary))
    return 0
