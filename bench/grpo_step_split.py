"""Wall-time split of one editing-GRPO step on CPU for the tiny config (fp32, 8 fake devices): sampling (the
recorded SDE sampler), decoding, reward (a tiny random RRM, greedy, 32 new tokens) and update (Flow-GRPO loss,
LoRA, inline reference; zero-advantage filtering off so that it always runs), with the RRM's shared-prefix cache off
and on (the G edits of a prompt share the source
image and the prompt prefix, which are then encoded and prefilled once per group).

Each configuration runs 2 warm-up steps (compiles) and then times 3 steps; the split is the median per phase.
Goal: ratio = reward share of the step without the cache / with it > 1 (the reward share falls with the cache).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("sample_s", "decode_s", "reward_s", "update_s")
NEW_TOKENS = 32


def _split(trainer, state, steps: range) -> tuple[dict, object]:
    per = {k: [] for k in PHASES}
    for s in steps:
        state, m = trainer.step(state, s)
        for k in PHASES:
            per[k].append(float(m[k]))
    return {k: statistics.median(v) for k, v in per.items()}, state


def main():
    from edit_r1_jax import config as config_lib
    from edit_r1_jax.rrm import records
    from edit_r1_jax.rrm.reward import RewardModel, RRMReward
    from edit_r1_jax.train import grpo
    from edit_r1_jax.train.editor_setup import build_editor

    # filter_zero_adv off: a random RRM often fails to parse (reward 0 for the whole group), and the update must run
    # to be timed
    cfg = config_lib.get_config(os.path.join(ROOT, "configs", "tiny.py"),
                                ["editor.tokenizer=bytes", "grpo.filter_zero_adv=false"])
    opts = grpo.grpo_options(cfg)
    with tempfile.TemporaryDirectory() as d:
        records.write_tiny_rrm(d, image_size=56)
        model = RewardModel.from_dir(d, batch_size=opts["group_size"] * opts["prompts_per_step"],
                                     max_new_tokens=NEW_TOKENS)
    editor = build_editor(cfg, None)
    out = {}
    with tempfile.TemporaryDirectory() as w:
        for name, share in (("plain", False), ("shared_prefix", True)):
            reward = RRMReward(model, share_prefix=share)
            trainer = grpo.GRPOTrainer(cfg, os.path.join(w, name), reward_fn=reward, editor=editor)
            state = trainer.init_state()
            _, state = _split(trainer, state, range(0, 2))                  # warm-up (compiles)
            split, state = _split(trainer, state, range(2, 5))
            total = sum(split.values())
            out[name] = {**split, "step_s": total, "reward_share": split["reward_s"] / total}
    ratio = out["plain"]["reward_share"] / out["shared_prefix"]["reward_share"]
    timing.report("grpo_step_split", "reward share without / with the shared-prefix cache > 1", ratio,
                  split=out, batch=opts["group_size"] * opts["prompts_per_step"], group=opts["group_size"],
                  sampling_steps=opts["num_steps"], rrm_new_tokens=NEW_TOKENS, image_size=editor.image_size)
    for name, s in out.items():
        print(f"  {name:>13}: " + "  ".join(f"{k[:-2]} {s[k]:.3f}s" for k in PHASES)
              + f"  | step {s['step_s']:.3f}s, reward share {100 * s['reward_share']:.1f}%")


if __name__ == "__main__":
    main()
