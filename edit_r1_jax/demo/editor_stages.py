"""The demo's editor half: flow-matching SFT of a tiny Kontext editor, then Flow-GRPO with the RRM as reward, with
the editor judged before and after GRPO by the programmatic gold verifier and by the RRM on held-out prompts."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from edit_r1_jax.demo.report import save_grid


def _mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if x.size else float("nan")


def run_editor_stages(base: Any, quick: bool, out_dir: str, data: dict, rrm_dir: str, results: dict) -> dict:
    from edit_r1_jax.demo.run import stage_config
    from edit_r1_jax.rrm.reward import SyntheticGoldReward
    from edit_r1_jax.train import editor_sft, grpo

    # -- editor SFT (rectified flow on source/instruction/target triples of the world) -------------------------
    esft_cfg = stage_config(base, "editor_sft", quick)
    esft_cfg.editor.tokenizer = data["tokenizer"]
    esft_dir = os.path.join(out_dir, "editor_sft")
    r = editor_sft.run(esft_cfg, esft_dir)
    if r.stopped != "done":
        raise SystemExit(f"demo: editor SFT stopped ({r.stopped}); rerun the demo to resume")

    # -- Flow-GRPO with the RRM (trained above) as the reward -----------------------------------------------------
    g_cfg = stage_config(base, "grpo", quick)
    g_cfg.editor.tokenizer = data["tokenizer"]
    g_cfg.editor.checkpoint = os.path.join(esft_dir, "editor")
    g_cfg.grpo.reward = "rrm"
    g_cfg.grpo.reward_rrm = rrm_dir
    g_cfg.grpo.reward_resize = int(base.rrm.image_size)
    grpo_dir = os.path.join(out_dir, "grpo")
    trainer = grpo.GRPOTrainer(g_cfg, grpo_dir)
    prompts = data["prompts"]
    gold_fn = SyntheticGoldReward()

    def judge(params) -> tuple[np.ndarray, dict]:
        edits = trainer.sample_ode(params, prompts)
        return edits, {"gold": _mean(gold_fn(list(edits), prompts)),
                       "rrm": _mean(trainer.reward_fn(list(edits), prompts))}

    before_edits, results["editor_before"] = judge(trainer.policy_params(trainer.init_state()))
    res = trainer.train()
    if res.stopped != "done":
        raise SystemExit("demo: GRPO was preempted; rerun the demo to resume")
    trainer.export(res.state, os.path.join(grpo_dir, "editor"))
    after_edits, results["editor_after"] = judge(trainer.policy_params(res.state))
    results["editor_before"]["target_gold"] = _mean(gold_fn([p["target"] for p in prompts], prompts))

    rows = [[p["source"], b, a, p["target"]] for p, b, a in zip(prompts, before_edits, after_edits)]
    grid = save_grid(rows[:8], os.path.join(out_dir, "editor_samples.png"), scale=2)
    return {"grids": [("editor: source | before GRPO | after GRPO | gold target (rows = held-out prompts)", grid)]}
