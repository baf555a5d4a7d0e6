"""`edit-r1-jax eval-edit`: edit every record with the ODE sampler and score the edits with the reward model.

    edit-r1-jax eval-edit --editor DIR --rrm DIR --data records.jsonl [--out DIR] [--steps 28] [--batch 8]

--editor: an editor directory (``editor-sft`` / ``grpo`` export, or a diffusers FluxKontextPipeline directory); LoRA
adapters in DIR/lora (a ``grpo`` export) are applied. --rrm: an RRM directory (``sft`` / ``gcpo`` export), or
``gold`` for the synthetic world's pixel verifier. --data: editing records, one JSON object a line (``instruction``,
``source`` image path, ``principles``; optional ``category``, ``id``), or ``synthetic:N`` for N held-out prompts of
the synthetic world. Prints a GEdit-Bench-style table (mean score per edit category and overall) and writes
OUT/results.jsonl (one line per record) and OUT/contact_sheet.png (source | edit rows).
"""
from __future__ import annotations

import json
import os
import time


def add_parser(subparsers):
    p = subparsers.add_parser("eval-edit", help="edit records with the ODE sampler and score them with the RRM",
                              description=__doc__)
    p.add_argument("--editor", required=True, help="editor directory (editor-sft / grpo export or diffusers pipeline)")
    p.add_argument("--rrm", required=True, help="reward model directory, or 'gold' (synthetic pixel verifier)")
    p.add_argument("--data", required=True, help="records JSONL, or synthetic:N")
    p.add_argument("--out", default=None, help="output directory (default: <editor>/eval)")
    p.add_argument("--steps", type=int, default=28, help="ODE sampling steps (default 28)")
    p.add_argument("--batch", type=int, default=8, help="edits per sampler call (rounded up to the data-parallel size)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (default 0)")
    p.add_argument("--image-size", type=int, default=0, help="synthetic:N rendering size (default: the editor's)")
    p.add_argument("--rrm-mode", default="generate", choices=["generate", "logits"], help="RRM scoring mode")
    p.add_argument("--max-sheet-rows", type=int, default=32, help="rows in the contact sheet (default 32)")
    return p


def load_trained_editor(path: str, mesh=None):
    """-> (EditorSetup, PolicySpec, trainable params, frozen params) for an editor directory (+ DIR/lora)."""
    from edit_r1_jax.models import lora as lora_lib
    from edit_r1_jax.train.editor_setup import load_editor
    from edit_r1_jax.train.grpo_rollout import PolicySpec
    setup = load_editor(path)
    base = setup.transformer_params(mesh)
    lora_dir = os.path.join(path, "lora")
    if os.path.isfile(os.path.join(lora_dir, "adapter_model.safetensors")):
        lora, lcfg = lora_lib.load_lora(lora_dir)
        if mesh is not None:
            from edit_r1_jax import parallel
            from edit_r1_jax.train.grpo import lora_logical_axes
            axes = lora_logical_axes(setup.param_logical_axes(), lora)
            lora = parallel.shard_tree(lora, parallel.logical_shardings(axes, mesh, parallel.DEFAULT_RULES,
                                                                        shapes=lora))
        return setup, PolicySpec(setup.tcfg, lcfg.scale, mesh), lora, {"base": base}
    return setup, PolicySpec(setup.tcfg, None, mesh), base, {}


def summarize(results: list) -> tuple[dict, str]:
    """Per-category and overall mean score -> (summary dict, printable table)."""
    import numpy as np
    cats: dict = {}
    for r in results:
        cats.setdefault(r.get("category") or "all", []).append(r["score"])
    rows = []
    summary = {"categories": {}}
    for c in sorted(cats):
        v = np.asarray(cats[c], np.float64)
        summary["categories"][c] = {"n": int(v.size), "mean": float(v.mean())}
        rows.append((c, v.size, v.mean()))
    allv = np.asarray([r["score"] for r in results], np.float64)
    summary["overall"] = {"n": int(allv.size), "mean": float(allv.mean()) if allv.size else float("nan")}
    w = max([len("category")] + [len(c) for c, _, _ in rows] + [len("overall")])
    lines = [f"{'category':<{w}}  {'n':>5}  {'score':>7}", "-" * (w + 16)]
    lines += [f"{c:<{w}}  {n:>5d}  {m:>7.3f}" for c, n, m in rows]
    lines += ["-" * (w + 16), f"{'overall':<{w}}  {allv.size:>5d}  {summary['overall']['mean']:>7.3f}"]
    return summary, "\n".join(lines)


def run(args) -> int:
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from PIL import Image

    from edit_r1_jax.train import grpo_rollout as ro
    from edit_r1_jax.train.editor_setup import read_edit_jsonl
    from edit_r1_jax.train.grpo import edit_grid

    t0 = time.time()
    mesh = parallel.make_mesh(None)
    setup, policy, params, frozen = load_trained_editor(args.editor, mesh)
    if args.data.startswith("synthetic:"):
        from edit_r1_jax.data import synthetic
        records = synthetic.make_edit_prompts(int(args.data.split(":", 1)[1]), seed=args.seed + 1000,
                                              size=args.image_size or setup.image_size)
    else:
        records = read_edit_jsonl(args.data)
    if not records:
        raise SystemExit(f"eval-edit: no records in {args.data}")
    dp = parallel.data_parallel_size(mesh)
    batch = -(-max(args.batch, 1) // dp) * dp
    repl = NamedSharding(mesh, PartitionSpec())
    cos_sin = tuple(jax.device_put(a, repl) for a in setup.rope())
    edits = ro.edit_ode(setup, policy, params, frozen, records, setup.schedule(args.steps), batch=batch, mesh=mesh,
                        seed=args.seed, cos_sin=cos_sin)
    t_edit = time.time() - t0
    if args.rrm == "gold":
        from edit_r1_jax.rrm.reward import SyntheticGoldReward
        scores = SyntheticGoldReward()(list(edits), records)
        statuses = ["ok"] * len(records)
    else:
        from edit_r1_jax.rrm.reward import RewardModel
        model = RewardModel.from_dir(args.rrm, mesh=mesh)
        res = model.score([{"id": r.get("id", i), "instruction": r["instruction"], "principles": r["principles"],
                            "source": r["source"], "edited": e} for i, (r, e) in enumerate(zip(records, edits))],
                          mode=args.rrm_mode)
        scores = res.rewards()
        statuses = [x.status for x in res]
    results = [{"id": r.get("id", i), "category": r.get("category", "all"), "instruction": r["instruction"],
                "score": float(s), "status": st} for i, (r, s, st) in enumerate(zip(records, scores, statuses))]
    summary, table = summarize(results)
    summary.update({"editor": args.editor, "rrm": args.rrm, "steps": args.steps, "seconds_editing": t_edit,
                    "seconds_total": time.time() - t0,
                    "parse_failures": int(sum(st == "failed" for st in statuses))})
    out = args.out or os.path.join(args.editor, "eval")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.jsonl"), "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        n = min(len(records), args.max_sheet_rows)
        Image.fromarray(edit_grid([setup.pixels([r["source"]])[0] for r in records[:n]], edits[:n])).save(
            os.path.join(out, "contact_sheet.png"))
        print(table)
        print(f"eval-edit: {len(records)} edits in {t_edit:.1f}s; results in {out}/results.jsonl, "
              f"contact sheet {out}/contact_sheet.png")
    return 0
