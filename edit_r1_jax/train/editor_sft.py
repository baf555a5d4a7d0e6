"""Flow-matching SFT of the editor on (source, instruction, target) triples with Kontext conditioning, so a small
editor can be pretrained where no checkpoint exists (the synthetic world needs it before GRPO).

The standard rectified-flow loss (FLUX / SD3 training), with the source image as the Kontext reference:

    x_0 = packed target latents,  eps ~ N(0, I),  sigma ~ U(0, 1)  (or sigmoid(N(0, 1)), "logit_normal")
    x_sigma = (1 - sigma) x_0 + sigma eps,         v* = eps - x_0
    L = mean || v_theta(x_sigma, sigma | instruction, reference = packed source latents) - v* ||^2

The loop is ``generic_loop.train`` with this task (full fine-tune of the transformer; text encoders and codec are
frozen and run on the host in ``tokenize_fn``, cached per instruction). Evaluation every ``train.eval_every`` steps:
the held-out loss at fixed noise, and edits of the held-out prompts with the ODE sampler (``editor.sample_steps``)
scored by the synthetic world's pixel verifier when the records carry scenes (``gold_score``), with a PNG grid
(source | edit | target) under WORKDIR/images. At the end the editor is exported to WORKDIR/editor
(``EditorSetup.save``: diffusers layout + editor.json), which ``grpo`` / ``eval-edit`` load via ``editor.checkpoint``.

    edit-r1-jax editor-sft --config configs/tiny.py --workdir runs/editor_sft [--set train.steps=N]

Scope: small editors. The generic loop initialises the state inside one jitted program, so the starting weights
(host-random, or ``editor.checkpoint``) become constants of that program; that is fine for the synthetic world's
editor but not for the 12B FLUX.1-Kontext-dev, which is fine-tuned with ``grpo`` (LoRA) instead.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.train import generic_loop
from edit_r1_jax.train import grpo_rollout as ro
from edit_r1_jax.train.editor_setup import EditorSetup, build_editor, edit_records, velocity
from edit_r1_jax.train.state import cfg_get

log = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "logit_normal")


def sample_sigmas(key: jax.Array, b: int, kind: str) -> jax.Array:
    """Training noise levels sigma [B] in (0, 1)."""
    if kind == "uniform":
        return jax.random.uniform(key, (b,), jnp.float32, 1e-3, 1.0 - 1e-3)
    if kind == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (b,), jnp.float32))
    raise ValueError(f"editor.sft_timestep_sampling={kind!r}: expected one of {SAMPLINGS}")


def flow_matching_loss(setup: EditorSetup, params: Any, batch: dict, key: jax.Array, cos, sin,
                       sampling: str = "uniform") -> tuple[jax.Array, dict]:
    """Rectified-flow loss (module docstring) of a batch: x0 / ref [B, L, 4C], prompt_embeds [B, T, D],
    pooled [B, Dp], guidance [B]."""
    x0 = batch["x0"].astype(jnp.float32)
    b = x0.shape[0]
    k_s, k_e = jax.random.split(key)
    sigma = sample_sigmas(k_s, b, sampling)
    eps = jax.random.normal(k_e, x0.shape, jnp.float32)
    s = sigma[:, None, None]
    x_s = (1.0 - s) * x0 + s * eps
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled", "ref", "guidance")}
    v = velocity(setup.tcfg, params, x_s, cond, sigma, cos, sin).astype(jnp.float32)
    err = (v - (eps - x0)) ** 2
    return jnp.mean(err), {"sigma_mean": jnp.mean(sigma)}


def tokenize_fn(setup: EditorSetup):
    """Record -> host arrays: x0 (packed target latents), ref (packed source latents), text embeddings, guidance."""
    def tok(rec: dict) -> dict:
        if rec.get("target") is None:
            raise ValueError(f"editor SFT record {rec.get('id', '?')}: no 'target' image (the correct edit)")
        emb, pooled = setup.encode_text([rec["instruction"]])
        lat = setup.encode_images([rec["target"], rec["source"]])
        return {"x0": lat[0], "ref": lat[1], "prompt_embeds": emb[0], "pooled": pooled[0],
                "guidance": np.float32(setup.guidance)}
    return tok


def _host_batch(tok, records: list) -> dict:
    exs = [tok(r) for r in records]
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def gold_rewards(images, records) -> np.ndarray | None:
    """The synthetic world's pixel-verified score of each edit, or None when the records carry no scenes."""
    if not records or any("source_scene" not in r or "edit" not in r for r in records):
        return None
    from edit_r1_jax.rrm.reward import SyntheticGoldReward
    return SyntheticGoldReward()(list(images), list(records))


def make_task(config: Any, setup: EditorSetup, train_records: list, eval_records: list | None = None,
              workdir: str | None = None) -> generic_loop.Task:
    e = cfg_get(config, "editor", {})
    sampling = str(cfg_get(e, "sft_timestep_sampling", "uniform"))
    sample_sigmas(jax.random.PRNGKey(0), 1, sampling)            # validate early
    cos, sin = setup.rope()
    base = setup.transformer_params()

    def init_params(key):
        del key                                                  # host init (seed editor.seed) or the checkpoint
        return base

    def loss_fn(params, batch, rng):
        return flow_matching_loss(setup, params, batch, rng, cos, sin, sampling)

    tok = tokenize_fn(setup)
    eval_fn = None
    if eval_records:
        n_eval = min(len(eval_records), int(cfg_get(cfg_get(config, "train", {}), "eval_examples", 8)))
        recs = list(eval_records)[:n_eval]
        eb = _host_batch(tok, recs)
        eval_loss = jax.jit(lambda p, b: flow_matching_loss(setup, p, b, jax.random.PRNGKey(1234), cos, sin,
                                                            sampling)[0])
        steps = int(cfg_get(e, "sample_steps", 4))
        schedule = setup.schedule(steps)
        policy = ro.PolicySpec(setup.tcfg)

        def eval_fn(state, step):
            out = {"loss": float(eval_loss(state.params, eb))}
            edits = ro.edit_ode(setup, policy, state.params, {}, recs, schedule, batch=len(recs),
                                seed=int(cfg_get(config, "seed", 0)))
            gold = gold_rewards(edits, recs)
            if gold is not None:
                out["gold_reward"] = float(np.mean(gold))
            if workdir and jax.process_index() == 0:
                _save_grid(workdir, step, recs, edits)
            return out

    return generic_loop.Task(init_params=init_params, param_logical_axes=setup.param_logical_axes(),
                             loss_fn=loss_fn, train_source=train_records, tokenize_fn=tok, eval_fn=eval_fn)


def _save_grid(workdir: str, step: int, records: list, edits: np.ndarray) -> str:
    """PNG rows of [source | edit | target] under WORKDIR/images/eval_grid_<step>.png."""
    from PIL import Image
    from edit_r1_jax.train.grpo import edit_grid
    cols = [[r["source"] for r in records], list(edits)]
    if all(r.get("target") is not None for r in records):
        cols.append([r["target"] for r in records])
    d = os.path.join(workdir, "images")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"eval_grid_{int(step)}.png")
    Image.fromarray(edit_grid(*cols)).save(path)
    return path


def run(config: Any, workdir: str) -> generic_loop.LoopResult:
    os.makedirs(workdir, exist_ok=True)
    setup = build_editor(config, workdir)
    train_records = edit_records(config, "train", setup.image_size)
    eval_records = edit_records(config, "eval", setup.image_size)
    task = make_task(config, setup, train_records, eval_records, workdir)
    result = generic_loop.train(config, workdir, task)
    if result.stopped == "done" and bool(cfg_get(cfg_get(config, "editor", {}), "export", True)):
        setup.save(jax.tree.map(ro.to_host, result.state.params), os.path.join(workdir, "editor"))
    return result
