"""`edit-r1-jax demo`: the embedded default, end to end on the synthetic world.

Stages (each resumable: its run directory under OUT holds checkpoints, so a rerun continues where it stopped):
  1. data       world tokenizer + held-out evaluation sets (cached under OUT/data)
  2. rrm_sft    cold-start SFT of a tiny Qwen2.5-VL reward model on gold traces          (train/sft.py)
  3. eval       RRM pairwise accuracy on held-out pairs, Pearson r with the gold score
  4. rrm_gcpo   GCPO on preference pairs, starting from the SFT export                     (train/gcpo.py)
  5. eval       as 3
  6. editor_sft rectified-flow SFT of a tiny Kontext editor on (source, instruction, target) (train/editor_sft.py)
  7. grpo       Flow-GRPO of the editor with the GCPO reward model as reward                (train/grpo.py)
  8. eval       editor gold score (programmatic verifier) and RRM reward before/after GRPO; report.md
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from edit_r1_jax import config as config_lib

log = logging.getLogger(__name__)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "demo.py")


def stage_config(base: Any, stage: str, quick: bool) -> Any:
    """The base config with ``demo.<stage>`` overrides (and ``demo.quick_<stage>`` in quick mode) applied."""
    cfg = copy.deepcopy(base)
    ov = list(base.demo.get(stage, ())) + (list(base.demo.get(f"quick_{stage}", ())) if quick else [])
    return config_lib.apply_overrides(cfg, ov)


def _load_config(config_path: str | None, overrides: Sequence[str], quick: bool) -> Any:
    cfg = config_lib.load_config_file(config_path or DEFAULT_CONFIG)
    if quick:
        config_lib.apply_overrides(cfg, list(cfg.demo.get("quick", ())))
    config_lib.apply_overrides(cfg, overrides)
    import jax
    return config_lib.validate(cfg, num_devices=jax.device_count())


def build_eval_data(cfg: Any, data_dir: str) -> dict:
    """Held-out pairs and SFT-style records (gold scores) for the RRM, held-out prompts for the editor."""
    from edit_r1_jax.data import synthetic
    from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
    os.makedirs(data_dir, exist_ok=True)
    tok_dir = os.path.join(data_dir, "tokenizer")
    ensure_world_tokenizer(tok_dir)
    seed = int(cfg.seed) + 10_000       # disjoint from every training seed
    size = int(cfg.rrm.image_size)
    d = cfg.demo
    return {
        "tokenizer": tok_dir,
        "pairs": synthetic.make_preference_pairs(int(d.eval_pairs), seed=seed, size=size),
        "gold": synthetic.make_sft_records(int(d.eval_gold), seed=seed + 1, size=size, style="minimal"),
        "prompts": synthetic.make_edit_prompts(int(d.eval_prompts), seed=seed + 2,
                                               size=int(cfg.editor.image_size)),
    }


def _timed(timings: dict, name: str, fn, *a, **kw):
    t0 = time.perf_counter()
    try:
        return fn(*a, **kw)
    finally:
        timings[name] = time.perf_counter() - t0
        log.info("stage %s: %.1f s", name, timings[name])


def _eval_rrm(rrm_dir: str, data: dict, cfg: Any) -> dict:
    from edit_r1_jax.demo.rrm_eval import evaluate_rrm
    from edit_r1_jax.rrm.reward import RewardModel
    rm = RewardModel.from_dir(rrm_dir, batch_size=int(cfg.demo.score_batch_size),
                              max_new_tokens=int(cfg.gcpo.max_new_tokens))
    return evaluate_rrm(rm, data["pairs"], data["gold"], mode=str(cfg.demo.score_mode))


def run_demo(out_dir: str = "runs/demo", quick: bool = False, config_path: str | None = None,
             overrides: Sequence[str] = ()) -> dict:
    from edit_r1_jax.demo import editor_stages
    from edit_r1_jax.demo.report import table_text, summary_rows, write_report
    from edit_r1_jax.train import gcpo, sft
    from edit_r1_jax.train.metrics import plot_curves

    base = _load_config(config_path, overrides, quick)
    os.makedirs(out_dir, exist_ok=True)
    timings: dict = {}
    results: dict = {"accuracy_noise": float(base.demo.accuracy_noise)}
    stages = ["data", "rrm_sft", "rrm_gcpo", "editor_sft", "grpo", "report"]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(stages), desc="demo", unit="stage")

    data = _timed(timings, "data", build_eval_data, base, os.path.join(out_dir, "data"))
    bar.update(1)

    # -- reward model: SFT, then GCPO ----------------------------------------------------------------------------
    sft_cfg = stage_config(base, "rrm_sft", quick)
    sft_cfg.rrm.tokenizer = data["tokenizer"]
    sft_dir = os.path.join(out_dir, "rrm_sft")
    _timed(timings, "rrm_sft", sft.run, sft_cfg, sft_dir)
    results["rrm_sft"] = _timed(timings, "eval_rrm_sft", _eval_rrm, os.path.join(sft_dir, "hf"), data, base)
    bar.update(1)

    gcpo_cfg = stage_config(base, "rrm_gcpo", quick)
    gcpo_cfg.rrm.tokenizer = data["tokenizer"]
    gcpo_cfg.gcpo.init_from = os.path.join(sft_dir, "hf")
    gcpo_dir = os.path.join(out_dir, "rrm_gcpo")
    _timed(timings, "rrm_gcpo", gcpo.run, gcpo_cfg, gcpo_dir)
    rrm_dir = os.path.join(gcpo_dir, "hf")
    results["rrm_gcpo"] = _timed(timings, "eval_rrm_gcpo", _eval_rrm, rrm_dir, data, base)
    bar.update(1)

    # -- editor: flow-matching SFT, then Flow-GRPO with the RRM as reward ----------------------------------------
    ed = _timed(timings, "editor", editor_stages.run_editor_stages, base, quick, out_dir, data, rrm_dir, results)
    bar.update(2)

    # -- report --------------------------------------------------------------------------------------------------
    plots = []
    from edit_r1_jax.train.metrics import read_metrics
    for name, keys in (("rrm_sft", ["loss", "eval/loss"]), ("rrm_gcpo", ["reward", "parse_fail_frac"]),
                       ("editor_sft", ["loss"]), ("grpo", ["reward_mean", "eval/reward_mean"])):
        mpath = os.path.join(out_dir, name, "metrics.jsonl")
        if os.path.exists(mpath):
            present = {k for row in read_metrics(mpath) for k, v in row.items() if v is not None}
            keys = [k for k in keys if k in present]
            if not keys:
                continue
            try:
                plots.append((f"{name} curves", plot_curves(mpath, keys, os.path.join(out_dir, f"{name}_curves.png"),
                                                            title=name)))
            except Exception as e:  # noqa: BLE001 - a missing key must not lose the report
                log.warning("could not plot %s: %s", name, e)
    notes = list(base.demo.get("notes", ()))
    path = write_report(out_dir, results, plots, ed.get("grids", []), timings, quick, notes)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"results": results, "timings": timings}, f, indent=2, default=float)
    bar.update(1)
    bar.close()
    print(table_text(summary_rows(results)))
    print(f"report: {path}")
    return {"results": results, "timings": timings, "report": path}
