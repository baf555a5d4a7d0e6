"""Editing GRPO = Flow-GRPO on FLUX.1-Kontext with a reward function (the RRM; algorithms.md b3, b4, d, e10-e14).

Per GRPO step, for P prompts (source image, instruction, principles) taken in a seeded per-epoch order:

  1. rollout    G edits per prompt with the recorded SDE sampler (``grpo_rollout``): latents x_0..x_S, the
                sampler's per-step log-probs (log pi_old) and the sigmas; decode the final latents to images
  2. reward     r = RewardFn(images, records): the RRM (``rrm.reward.RRMReward``, greedy, shared-prefix cache),
                the synthetic world's pixel verifier (``SyntheticGoldReward``) or a toy (mean brightness)
  3. advantage  A = clip((r - mean_group r) / (std + 1e-4), -5, 5), std of the group (default, paper; e10) or of the
                whole batch (``adv_std="global"``); samples with A == 0 are filtered (masked) and counted
  4. update     ``ppo_epochs`` optimizer steps on the rows (sample i, trained step j):

                  mu_theta, log pi_theta = flow_sde_step(x_j, v_theta(x_j, sigma_j), ..., prev_sample=x_{j+1})
                  rho = exp(log pi_theta - log pi_old)
                  L   = mean_rows max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
                        + beta * mean_rows mean_elements (mu_theta - mu_ref)^2 / (2 s_t^2)     (code-form KL, e11)

                with mu_ref from the reference (LoRA: the base with adapters off; full fine-tune: a frozen copy),
                eps = ``clip_range`` (1e-4), beta = 0.04. Gradients accumulate over the rows (timesteps x samples,
                ``train.grad_accum_steps`` microbatches), then global-norm clip and AdamW; an optional EMA of the
                trainable params (``ema_decay``, every ``ema_every`` steps) is used for evaluation and export.

Before the first epoch the params are the sampler's, so its recomputed log-probs must equal the stored ones: the
max / mean |log pi_theta - log pi_old| over all rows and the ratio mean/min/max are logged every step and checked
against ``logp_tol`` (1e-5, fp32; ``logp_check`` warn | error | off). With gradient accumulation the logged max is
the mean over microbatches of each microbatch's max.

Roles (``train/roles.py``): the policy samples and trains on its mesh; the reference either shares it (inline,
inside the loss) or lives on its own sub-mesh (its means are computed there before the update); the RRM reward
model runs on the reward role's mesh. Evaluation every ``train.eval_every`` steps samples the fixed held-out prompts
with the ODE sampler (noise level 0, ``eval_steps`` steps, fixed initial noise) and logs the mean reward and a PNG
grid (source | edit) under WORKDIR/images and TensorBoard.

    edit-r1-jax grpo --config configs/tiny.py --workdir runs/grpo [--set train.steps=N]

Config ``grpo`` (defaults ``GRPO_DEFAULTS``): group_size G, prompts_per_step P (P*G must divide by the policy
mesh's data*fsdp), num_steps / eval_steps (sampling steps in training / evaluation), noise_level, sde_type
(sde | cps | dance), timestep_fraction, timestep_selection (first | random), noise_on (all | trained), sde_window,
sde_window_range, same_noise (one initial noise per group), adv_std (group | global | none), adv_clip, clip_range,
beta, filter_zero_adv, ppo_epochs, ema_decay (0 = off), ema_every, reward (rrm | gold | brightness), reward_rrm,
reward_mode / reward_samples (RRM decoding), reward_resize (px, 0 = off), eval_at_start, eval_grid_rows, logp_tol,
logp_check, lora_rank (0 = full fine-tune), lora_alpha, lora_targets. ``editor`` as in ``editor_setup``; ``train``
as for the other loops (``train.steps`` = GRPO steps, each ``ppo_epochs`` optimizer steps); ``roles`` as in
``roles``. The run exports the trained editor to WORKDIR/editor (base editor + ``lora/`` adapters, or the full
transformer; the EMA params when enabled), loadable by ``eval-edit`` and ``editor.checkpoint``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel, rl
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.models.flux import lora_diffusers
from edit_r1_jax.train import grpo_rollout as ro
from edit_r1_jax.train import rl_loop
from edit_r1_jax.train import roles as roles_lib
from edit_r1_jax.train import state as state_lib
from edit_r1_jax.train import step as step_lib
from edit_r1_jax.train.editor_setup import EditorSetup, build_editor, edit_records, editor_options
from edit_r1_jax.train.generic_loop import LOOP_DEFAULTS, LoopResult
from edit_r1_jax.train.state import cfg_get

log = logging.getLogger(__name__)

GRPO_DEFAULTS = dict(group_size=24, prompts_per_step=1, num_steps=6, eval_steps=28, noise_level=0.9, sde_type="sde",
                     timestep_fraction=0.99, timestep_selection="first", noise_on="all", sde_window=0,
                     sde_window_range=(0, 0), same_noise=False, adv_std="group", adv_clip=5.0, clip_range=1e-4,
                     beta=0.04, filter_zero_adv=True, ppo_epochs=1, ema_decay=0.0, ema_every=8, reward="rrm",
                     reward_rrm="", reward_mode="generate", reward_samples=1, reward_resize=0,
                     eval_at_start=True, eval_grid_rows=8, logp_tol=1e-5, logp_check="warn", lora_rank=64,
                     lora_alpha=128.0, lora_targets="")
ROLLOUT_STREAM = 0x6752            # folded into the state key for sampling
COND_KEYS = ("prompt_embeds", "pooled", "ref", "guidance")


def grpo_options(config: Any) -> dict:
    g = cfg_get(config, "grpo", {})
    opts = {}
    for k, v in GRPO_DEFAULTS.items():
        val = cfg_get(g, k, v)
        opts[k] = tuple(val) if isinstance(v, tuple) else (type(v)(val) if not isinstance(v, str) else str(val))
    if opts["sde_type"] not in rl.SDE_TYPES:
        raise ValueError(f"grpo.sde_type={opts['sde_type']!r}: expected one of {rl.SDE_TYPES}")
    if opts["adv_std"] not in ("group", "global", "none"):
        raise ValueError(f"grpo.adv_std={opts['adv_std']!r}: expected 'group', 'global' or 'none'")
    if opts["logp_check"] not in ("warn", "error", "off"):
        raise ValueError(f"grpo.logp_check={opts['logp_check']!r}: expected 'warn', 'error' or 'off'")
    for k in ("group_size", "prompts_per_step", "num_steps", "eval_steps", "ppo_epochs", "ema_every"):
        if opts[k] < 1:
            raise ValueError(f"grpo.{k}={opts[k]}: must be >= 1")
    return opts


# ----------------------------------------------------------------------------------------------------------------
# rewards (the RewardFn protocol of edit_r1_jax.rrm.reward: images [B] + records [B] -> rewards [B] float32)

class BrightnessReward:
    """Toy reward: mean pixel value of the edited image in [0, 1] (tests: the loop must raise it)."""

    def __call__(self, images: Sequence[Any], records: Sequence[dict]) -> np.ndarray:
        del records
        return np.asarray([np.asarray(im, np.float32).mean() / 255.0 for im in images], np.float32)


class ResizedReward:
    """Resize the edits (bicubic) to ``size`` before an inner reward (e.g. the pixel verifier wants >= 56 px)."""

    def __init__(self, inner, size: int):
        self.inner, self.size = inner, int(size)

    def __call__(self, images, records) -> np.ndarray:
        from PIL import Image
        s = self.size
        out = [np.asarray(Image.fromarray(np.asarray(im, np.uint8)).resize((s, s), Image.BICUBIC)) for im in images]
        return self.inner(out, records)


class OffloadedReward:
    """Keeps an RRM's weights in pinned host memory between calls (``roles.reward.offload``)."""

    def __init__(self, inner, model):
        self.inner, self.model = inner, model
        model.params = roles_lib.offload(model.params)

    @property
    def last(self):
        return getattr(self.inner, "last", None)

    def __call__(self, images, records) -> np.ndarray:
        self.model.params = roles_lib.onload(self.model.params)
        try:
            return self.inner(images, records)
        finally:
            self.model.params = roles_lib.offload(self.model.params)


def build_reward(config: Any, opts: dict, mesh: Mesh | None = None, offload: bool = False) -> Callable:
    """``grpo.reward``: "rrm" (``grpo.reward_rrm`` = an exported RRM directory, placed on ``mesh``; ``offload``: its
    weights wait in host memory between calls), "gold" (synthetic pixel verifier) or "brightness" (toy)."""
    kind = opts["reward"]
    if kind == "brightness":
        fn = BrightnessReward()
    elif kind == "gold":
        from edit_r1_jax.rrm.reward import SyntheticGoldReward
        fn = SyntheticGoldReward()
    elif kind == "rrm":
        path = opts["reward_rrm"]
        if not path:
            raise ValueError("grpo.reward='rrm' needs grpo.reward_rrm = an RRM directory (e.g. an 'edit-r1-jax sft' "
                             "or 'gcpo' run's WORKDIR/hf); the synthetic world can use grpo.reward=gold")
        from edit_r1_jax.rrm.reward import RewardModel, RRMReward
        model = RewardModel.from_dir(path, mesh=mesh)
        fn = RRMReward(model, mode=opts["reward_mode"], samples=int(opts["reward_samples"]),
                       seed=int(cfg_get(config, "seed", 0)))
        if offload:
            fn = OffloadedReward(fn, model)
    else:
        raise ValueError(f"grpo.reward={kind!r}: expected 'rrm', 'gold' or 'brightness'")
    if int(opts["reward_resize"]):
        fn = ResizedReward(fn, int(opts["reward_resize"]))
    return fn


# ----------------------------------------------------------------------------------------------------------------
# the loss

@dataclasses.dataclass(frozen=True)
class LossSpec:
    policy: ro.PolicySpec
    sde_type: str = "sde"
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.04
    ref_mode: str = "inline"            # "inline" (reference in the loss) | "rows" (rows["mean_ref"] precomputed)


def _step_mean(sde_type: str, rows: dict, v: jax.Array):
    """flow_sde_step at the stored transition (x_j -> x_{j+1}) -> (log_prob [R], mean [R, L, C], s_t [R])."""
    _, lp, mean, std = rl.flow_sde_step(rows["x_t"], v, rows["sigma"], rows["sigma_next"], rows["noise_level"],
                                        sigma_max=rows["sigma_max"], prev_sample=rows["x_next"], sde_type=sde_type)
    return lp, mean, std


def grpo_loss(spec: LossSpec, trainable: Any, frozen: Any, rows: dict, cos, sin) -> tuple[jax.Array, dict]:
    """Flow-GRPO loss on a microbatch of rows (see the module docstring) and its metrics; ``loss_weight`` = kept rows
    (microbatches combine as the mean over kept rows)."""
    cond = {k: rows[k] for k in COND_KEYS}
    v = spec.policy.policy_velocity(trainable, frozen, rows["x_t"], cond, rows["t"], cos, sin)
    lp, mean, std = _step_mean(spec.sde_type, rows, v)
    mean_ref = None
    if spec.beta:
        if spec.ref_mode == "rows":
            mean_ref = rows["mean_ref"]
        else:
            v_ref = jax.lax.stop_gradient(spec.policy.reference_velocity(frozen, rows["x_t"], cond, rows["t"], cos,
                                                                         sin))
            mean_ref = _step_mean(spec.sde_type, rows, v_ref)[1]
    loss, m = rl.flow_grpo_loss(lp, rows["logp_old"], rows["adv"], mean, mean_ref, std, clip_range=spec.clip_range,
                                adv_clip=spec.adv_clip, beta=spec.beta, mask=rows["keep"])
    valid = rows["valid"] > 0
    d = jnp.abs(jax.lax.stop_gradient(lp) - rows["logp_old"])
    m["logp_abs_diff_max"] = jnp.max(jnp.where(valid, d, 0.0))
    m["logp_abs_diff_mean"] = jnp.sum(jnp.where(valid, d, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)
    m["kept_rows"] = jnp.sum(rows["keep"])
    m[step_lib.WEIGHT_KEY] = jnp.sum(rows["keep"])
    return loss, m


def _ref_means(spec: LossSpec, frozen: Any, rows: dict, cos, sin) -> jax.Array:
    cond = {k: rows[k] for k in COND_KEYS}
    v = spec.policy.reference_velocity(frozen, rows["x_t"], cond, rows["t"], cos, sin)
    return _step_mean(spec.sde_type, rows, v)[1]


# ----------------------------------------------------------------------------------------------------------------
# EMA of the trainable params (Flow-GRPO: decay 0.9 every 8 steps), kept in the optimizer state

@dataclasses.dataclass(frozen=True)
class _Ema:
    count: Any
    ema: Any


jax.tree_util.register_dataclass(_Ema, data_fields=["count", "ema"], meta_fields=[])


def ema_tracker(decay: float, every: int) -> optax.GradientTransformation:
    """Last link of the optimizer chain: ema <- decay * ema + (1 - decay) * (params + updates) every ``every``
    applied updates (updates pass through unchanged)."""
    def init(params):
        return _Ema(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        new = optax.apply_updates(params, updates)
        count = state.count + 1
        do = (count % every) == 0
        ema = jax.tree.map(lambda e, p: jnp.where(do, decay * e + (1.0 - decay) * p.astype(jnp.float32), e),
                           state.ema, new)
        return updates, _Ema(count, ema)
    return optax.GradientTransformation(init, update)


def ema_params(state: state_lib.TrainState) -> Any | None:
    """The EMA tree of a state whose optimizer ends with ``ema_tracker`` (None otherwise)."""
    opt = state.opt_state
    if isinstance(opt, tuple) and opt and isinstance(opt[-1], _Ema):
        return jax.tree.map(lambda e, p: e.astype(p.dtype), opt[-1].ema, state.params)
    return None


# ----------------------------------------------------------------------------------------------------------------
# process-wide caches: the same config in one process reuses optimizers and compiled functions

_TX: dict = {}
_JIT: dict = {}


def _optimizer(opt_cfg: dict, ema_decay: float, ema_every: int) -> optax.GradientTransformation:
    key = json.dumps({"opt": opt_cfg, "ema": [ema_decay, ema_every]}, sort_keys=True, default=str)
    if key not in _TX:
        tx = state_lib.make_optimizer(opt_cfg)
        if ema_decay > 0:
            tx = optax.chain(tx, ema_tracker(float(ema_decay), int(ema_every)))
        _TX[key] = (tx, state_lib.make_lr_schedule(opt_cfg))
    return _TX[key]


def _shard_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(leaves))


def _update_fn(spec: LossSpec, accum: int, tx_key: Any, lr_schedule, mesh: Mesh, state_shardings: Any):
    key = ("update", spec, accum, id(tx_key), mesh, _shard_key(state_shardings))
    if key not in _JIT:
        micro = NamedSharding(mesh, P(parallel.BATCH_AXES))

        def fn(state, frozen, rows, cos, sin):
            def loss_fn(p, batch, rng):
                del rng
                return grpo_loss(spec, p, frozen, batch, cos, sin)
            return step_lib.train_step(state, rows, loss_fn=loss_fn, grad_accum_steps=accum,
                                       lr_schedule=lr_schedule, microbatch_sharding=micro if accum > 1 else None)
        _JIT[key] = jax.jit(fn, out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
    return _JIT[key]


def _ref_fn(spec: LossSpec, mesh: Mesh):
    key = ("ref", spec, mesh)
    if key not in _JIT:
        _JIT[key] = jax.jit(functools.partial(_ref_means, spec),
                            out_shardings=NamedSharding(mesh, P(parallel.BATCH_AXES)))
    return _JIT[key]


def _create_fn(tx, rng, shardings, mesh: Mesh):
    key = ("create", id(tx), mesh, _shard_key(shardings))
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda p, r: state_lib.TrainState.create(params=p, tx=tx, rng=r), out_shardings=shardings)
    return _JIT[key]


# ----------------------------------------------------------------------------------------------------------------
# LoRA helpers

def lora_logical_axes(base_axes: Any, lora: dict) -> dict:
    """Logical axes of adapters from their base kernels: lora_a (..., in, None), lora_b (..., None, out)."""
    def walk(node, axes_node):
        out = {}
        for k, v in node.items():
            if k in lora_lib.LORA_LEAVES:
                spec = tuple(axes_node["kernel"])
                lead, d_in, d_out = spec[:-2], spec[-2], spec[-1]
                out[k] = P(*lead, d_in, None) if k == "lora_a" else P(*lead, None, d_out)
            else:
                out[k] = walk(v, axes_node[k])
        return out
    return walk(lora, base_axes)


def _lr_cfg(train_cfg: Any, mu: int) -> dict:
    d = dict(train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else dict(train_cfg or {}))
    d["steps"] = int(d.get("steps", 1)) * mu
    d["warmup_steps"] = int(d.get("warmup_steps", 0) or 0) * mu
    return {k: d[k] for k in ("lr", "warmup_steps", "steps", "schedule", "min_lr_ratio", "weight_decay", "b1", "b2",
                              "eps", "grad_clip", "decay_matrices_only") if k in d}


# ----------------------------------------------------------------------------------------------------------------
# the trainer

@dataclasses.dataclass
class Rollout:
    records: list            # P prompt records
    cond: dict               # host cond for the B = P*G samples
    latents: np.ndarray      # [S+1, B, L, C]
    log_probs: np.ndarray    # [S, B]
    plan: ro.StepPlan
    images: np.ndarray       # [B, H, W, 3] uint8
    rewards: np.ndarray      # [B]
    advantages: np.ndarray   # [B]
    keep: np.ndarray         # [B] 1 = trained
    metrics: dict


class GRPOTrainer:
    """Editing GRPO for one config: setup, roles, state plan, rollout, update, evaluation, loop.

    ``reward_fn`` overrides ``grpo.reward`` (tests pass a toy reward); ``editor`` an already built setup."""

    def __init__(self, config: Any, workdir: str, *, reward_fn: Callable | None = None,
                 editor: EditorSetup | None = None, devices: list | None = None):
        self.config, self.workdir = config, workdir
        self.opts = o = grpo_options(config)
        self.eopts = editor_options(config)
        self.tcfg_train = cfg_get(config, "train", {})
        self.loop = {k: cfg_get(self.tcfg_train, k, v) for k, v in LOOP_DEFAULTS.items()}
        self.seed = int(cfg_get(config, "seed", 0))
        self.mu = int(o["ppo_epochs"])
        self.accum = int(self.loop["grad_accum_steps"])
        self.setup = editor or build_editor(config, workdir)
        self.roles = roles_lib.build_roles(config, devices)
        self.mesh = self.roles["policy"].mesh
        self.rules = parallel.rules_from_config(config)
        self.group, self.prompts = int(o["group_size"]), int(o["prompts_per_step"])
        self.batch = self.group * self.prompts
        dp = parallel.data_parallel_size(self.mesh)
        if self.batch % dp:
            raise ValueError(f"GRPO: grpo.prompts_per_step * grpo.group_size = {self.batch} samples per step is not "
                             f"divisible by the policy mesh's data*fsdp = {dp}; change them or roles.policy / mesh")
        self.ref_role = self.roles["reference"]
        self.ref_mode = "inline" if self.ref_role.colocated else "rows"
        self.row_multiple = dp * self.accum
        if self.ref_mode == "rows":
            rdp = parallel.data_parallel_size(self.ref_role.mesh)
            self.row_multiple = self.row_multiple * rdp // math.gcd(self.row_multiple, rdp)
        rank = int(o["lora_rank"])
        self.lora_cfg = None
        if rank > 0:
            alpha = float(o["lora_alpha"]) or float(rank)
            self.lora_cfg = lora_lib.LoraConfig(rank=rank, alpha=alpha,
                                                targets=o["lora_targets"] or lora_lib.FLUX_ATTN_FF_TARGETS)
        self.policy = ro.PolicySpec(self.setup.tcfg, None if self.lora_cfg is None else self.lora_cfg.scale,
                                    self.mesh, self.rules)
        self.loss_spec = LossSpec(self.policy, o["sde_type"], float(o["clip_range"]), float(o["adv_clip"]),
                                  float(o["beta"]), self.ref_mode)
        self.cos, self.sin = (jax.device_put(a, NamedSharding(self.mesh, P())) for a in self.setup.rope())
        self.sigmas, self.model_t = self.setup.schedule(int(o["num_steps"]))
        self.eval_sigmas, self.eval_model_t = self.setup.schedule(int(o["eval_steps"]))
        self.reward_fn = reward_fn or build_reward(config, o, self.roles["reward"].mesh, self.roles["reward"].offload)
        self._build_state_plan()
        self.train_records = None
        self.eval_records = None

    # -- params and state ----------------------------------------------------------------------------------------
    def _build_state_plan(self) -> None:
        setup, mesh = self.setup, self.mesh
        base = setup.transformer_params(mesh, self.rules)
        base_axes = setup.param_logical_axes()
        if self.lora_cfg is not None:
            lora = lora_lib.init_lora(base, self.lora_cfg, seed=self.seed)
            axes = lora_logical_axes(base_axes, lora)
            self._init_trainable = lambda: parallel.shard_tree(
                lora, parallel.logical_shardings(axes, mesh, self.rules, shapes=lora))
            self.frozen = {"base": base}
        else:
            axes = base_axes
            self._init_trainable = lambda: base
            self.frozen = {}
            if self.opts["beta"] and self.ref_mode == "inline":
                self.frozen = {"ref": jax.tree.map(jnp.copy, base)}
        self.ref_frozen = None
        if self.opts["beta"] and self.ref_mode == "rows":
            rmesh = self.ref_role.mesh
            self.ref_frozen = {"base" if self.lora_cfg is not None else "ref": setup.transformer_params(rmesh,
                                                                                                     self.rules)}
            self.ref_spec = dataclasses.replace(self.loss_spec, policy=dataclasses.replace(self.policy, mesh=rmesh))
            self.ref_cos, self.ref_sin = (jax.device_put(a, NamedSharding(rmesh, P())) for a in setup.rope())
            if self.ref_role.offload:
                self.ref_frozen = roles_lib.offload(self.ref_frozen)
        opt_cfg = _lr_cfg(self.tcfg_train, self.mu)
        self.tx, self.lr_schedule = _optimizer(opt_cfg, float(self.opts["ema_decay"]), int(self.opts["ema_every"]))
        abstract = jax.eval_shape(self._init_trainable)
        self.rng = jax.random.PRNGKey(self.seed)
        self.plan = state_lib.plan_sharded_state(
            lambda k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract), self.tx, mesh, self.rules,
            rng=self.rng, param_logical_axes=axes)
        self.update_fn = _update_fn(self.loss_spec, self.accum, self.tx, self.lr_schedule, mesh, self.plan.shardings)

    def init_state(self) -> state_lib.TrainState:
        """A fresh TrainState (trainable params = adapters or the whole transformer) on the policy mesh."""
        create = _create_fn(self.tx, self.rng, self.plan.shardings, self.mesh)
        with self.mesh:
            return create(self._init_trainable(), jax.random.fold_in(self.rng, 1))

    def policy_params(self, state: state_lib.TrainState, use_ema: bool = True) -> Any:
        ema = ema_params(state) if use_ema else None
        return state.params if ema is None else ema

    # -- data ----------------------------------------------------------------------------------------------------
    def records(self, split: str) -> list:
        if split == "train":
            if self.train_records is None:
                self.train_records = edit_records(self.config, "train", self.setup.image_size)
            return self.train_records
        if self.eval_records is None:
            self.eval_records = edit_records(self.config, "eval", self.setup.image_size)
        return self.eval_records

    def step_records(self, step: int) -> list:
        recs = self.records("train")
        return [recs[i] for i in rl_loop.epoch_indices(step, self.prompts, len(recs), self.seed)]

    # -- rollout -------------------------------------------------------------------------------------------------
    def rollout(self, state: state_lib.TrainState, records: list, step: int) -> Rollout:
        o, setup = self.opts, self.setup
        t0 = time.perf_counter()
        cond_p = setup.conditioning(records)
        cond = {k: np.repeat(v, self.group, axis=0) for k, v in cond_p.items()}
        key = rl_loop.rollout_key(state, ROLLOUT_STREAM, step)
        k_x0, k_sde = jax.random.split(key)
        plan = ro.step_plan(len(self.model_t), self.batch, float(o["noise_level"]),
                            timestep_fraction=float(o["timestep_fraction"]), selection=o["timestep_selection"],
                            noise_on=o["noise_on"], sde_window=int(o["sde_window"]),
                            sde_window_range=tuple(o["sde_window_range"]),
                            rng=np.random.default_rng([self.seed, ROLLOUT_STREAM, int(step)]))
        x0 = ro.initial_noise(k_x0, self.prompts, self.group, (setup.num_tokens, setup.token_channels),
                              bool(o["same_noise"]))
        t1 = time.perf_counter()
        traj = ro.sample(self.policy, state.params, self.frozen, cond, x0, k_sde, self.sigmas, self.model_t,
                         plan.noise_levels, self.cos, self.sin, sde_type=o["sde_type"], mesh=self.mesh)
        latents, log_probs = ro.to_host(traj.latents), ro.to_host(traj.log_probs)
        t2 = time.perf_counter()
        images = setup.decode(latents[-1])
        t3 = time.perf_counter()
        recs_b = [r for r in records for _ in range(self.group)]
        if self.roles["policy"].offload:           # the frozen base waits in host memory while the RRM scores
            self.frozen = roles_lib.offload(self.frozen)
        try:
            rewards = np.asarray(self.reward_fn(list(images), recs_b), np.float32).reshape(-1)
        finally:
            if self.roles["policy"].offload:
                self.frozen = roles_lib.onload(self.frozen)
        if rewards.shape != (self.batch,):
            raise ValueError(f"reward function returned shape {rewards.shape}, expected ({self.batch},)")
        t4 = time.perf_counter()
        inner = getattr(self.reward_fn, "inner", self.reward_fn)
        scores = getattr(inner, "last", None)
        groups = np.repeat(np.arange(self.prompts), self.group)
        adv = np.asarray(rl.group_advantages(rewards, groups, std=o["adv_std"], eps=1e-4,
                                             clip=float(o["adv_clip"])), np.float32)
        keep = (adv != 0).astype(np.float32) if o["filter_zero_adv"] else np.ones_like(adv)
        grp = rewards.reshape(self.prompts, self.group)
        m = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
             "reward_min": float(rewards.min()), "reward_max": float(rewards.max()),
             "reward_group_std": float(grp.std(axis=1).mean()), "adv_abs_mean": float(np.abs(adv).mean()),
             "kept_samples": int(keep.sum()), "filtered_samples": int(self.batch - keep.sum()),
             "trained_steps": int(plan.train_steps.shape[1]), "sampler_logp_mean": float(log_probs.mean()),
             "prep_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2, "reward_s": t4 - t3}
        if scores is not None and hasattr(scores, "parse_failure_rate"):
            m["reward_parse_failure_rate"] = float(scores.parse_failure_rate)
        return Rollout(records, cond, latents, log_probs, plan, images, rewards, adv, keep, m)

    # -- update --------------------------------------------------------------------------------------------------
    def rows(self, r: Rollout) -> dict:
        rows = ro.make_rows(r.latents, r.log_probs, r.plan, self.sigmas, self.model_t, r.advantages, r.keep, r.cond,
                            multiple=self.row_multiple)
        if self.opts["beta"] and self.ref_mode == "rows":
            rmesh = self.ref_role.mesh
            frozen = roles_lib.onload(self.ref_frozen) if self.ref_role.offload else self.ref_frozen
            with rmesh:
                mean_ref = _ref_fn(self.ref_spec, rmesh)(frozen, ro.put_rows(rows, rmesh), self.ref_cos,
                                                         self.ref_sin)
            rows["mean_ref"] = ro.to_host(mean_ref)
            if self.ref_role.offload:
                del frozen
        return rows

    def update(self, state: state_lib.TrainState, r: Rollout) -> tuple[state_lib.TrainState, dict]:
        """``ppo_epochs`` optimizer steps (none when every sample was filtered). -> (state, metrics)."""
        if not np.any(r.keep > 0):
            step = jax.device_put(jax.device_get(state.step) + self.mu, self.plan.shardings.step)
            return state.replace(step=step), {"update_skipped": 1}
        rows = ro.put_rows(self.rows(r), self.mesh)
        per_epoch = []
        with self.mesh:
            for _ in range(self.mu):
                state, m = self.update_fn(state, self.frozen, rows, self.cos, self.sin)
                per_epoch.append(m)
        per_epoch = jax.device_get(per_epoch)
        out = dict(per_epoch[0])            # epoch 0: params == sampler params -> the sampler check
        out.pop("finite", None)
        for k in ("skipped_nonfinite", "consecutive_nonfinite"):
            out[k] = per_epoch[-1][k]
        if self.mu > 1:
            for k in ("loss", "policy_loss", "kl", "clip_frac", "approx_kl", "grad_norm"):
                out[f"last_epoch/{k}"] = per_epoch[-1][k]
        out["update_skipped"] = 0
        self.check_logprobs(out)
        return state, out

    def check_logprobs(self, m: dict) -> None:
        diff, tol = float(m["logp_abs_diff_max"]), float(self.opts["logp_tol"])
        if self.opts["logp_check"] == "off" or not diff > tol:
            return
        msg = (f"GRPO: the trainer's recomputed log-probs differ from the sampler's by up to {diff:.3g} (> grpo."
               f"logp_tol={tol:g}; ratio mean {float(m['ratio_mean']):.8f}, min {float(m['ratio_min']):.8f}, max "
               f"{float(m['ratio_max']):.8f}). The policy ratio is biased: check dtype (bf16 cannot reach 1e-5), "
               f"the conditioning of the rows, or non-deterministic kernels")
        if self.opts["logp_check"] == "error":
            raise RuntimeError(msg)
        log.warning("%s", msg)

    def step(self, state: state_lib.TrainState, step: int) -> tuple[state_lib.TrainState, dict]:
        r = self.rollout(state, self.step_records(step), step)
        t0 = time.perf_counter()
        state, m = self.update(state, r)
        return state, {**r.metrics, **m, "update_s": time.perf_counter() - t0}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def sample_ode(self, params: Any, records: list) -> np.ndarray:
        """Edits of ``records`` with the ODE sampler (``eval_steps``, fixed initial noise) -> uint8 images."""
        return ro.edit_ode(self.setup, self.policy, params, self.frozen, records, (self.eval_sigmas, self.eval_model_t),
                           batch=self.batch, mesh=self.mesh, seed=self.seed, cos_sin=(self.cos, self.sin))

    def evaluate(self, state: state_lib.TrainState, step: int) -> dict:
        recs = self.records("eval")
        edits = self.sample_ode(self.policy_params(state), recs)
        rewards = np.asarray(self.reward_fn(list(edits), recs), np.float32)
        out = {"reward": float(rewards.mean()), "reward_std": float(rewards.std())}
        rows = int(self.opts["eval_grid_rows"])
        if rows > 0:
            sources = [self.setup.pixels([r["source"]])[0] for r in recs[:rows]]
            out[rl_loop.IMAGES_KEY] = {"eval/grid": edit_grid(sources, edits[:rows])}
        return out

    # -- loop ----------------------------------------------------------------------------------------------------
    def train(self, on_step: Callable[[int, dict], None] | None = None) -> LoopResult:
        lp = self.loop
        spec = rl_loop.LoopSpec(total_steps=int(lp["steps"]), steps_per_iter=self.mu, log_every=int(lp["log_every"]),
                                checkpoint_every=int(lp["checkpoint_every"]),
                                keep_checkpoints=int(lp["keep_checkpoints"]),
                                async_checkpoint=bool(lp["async_checkpoint"]), eval_every=int(lp["eval_every"]),
                                eval_at_start=bool(self.opts["eval_at_start"]),
                                max_consecutive_nonfinite=int(lp["max_consecutive_nonfinite"]), desc="grpo")
        n = len(self.records("train"))
        return rl_loop.run(self.config, self.workdir, spec, init_fn=self.init_state,
                           target=self.plan.restore_target(), step_fn=self.step, eval_fn=self.evaluate,
                           data_state_fn=lambda s: {"next_prompt": s * self.prompts, "num_prompts": n},
                           on_step=on_step)

    def export(self, state: state_lib.TrainState, out_dir: str) -> str:
        """The trained editor: LoRA adapters (``lora/``) next to the base editor, or the full transformer."""
        params = jax.tree.map(ro.to_host, self.policy_params(state))
        if self.lora_cfg is not None:
            lora_diffusers.save_adapters(self.setup.tcfg, params, self.lora_cfg, os.path.join(out_dir, "lora"))
            self.setup.save(self.frozen["base"], out_dir)
        else:
            self.setup.save(params, out_dir)
        return out_dir


def image_grid(rows: Sequence[Sequence[Any]], gap: int = 2) -> np.ndarray:
    """A uint8 grid: each row a list of images (uint8 HWC, or [3, H, W] floats in [-1, 1]) with white gaps."""
    def u8(img):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = ((np.clip(img, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)
            if img.shape[0] == 3 and img.shape[-1] != 3:
                img = img.transpose(1, 2, 0)
        return img

    rows = [[u8(im) for im in row] for row in rows if len(row)]
    if not rows:
        return np.zeros((1, 1, 3), np.uint8)
    h = max(im.shape[0] for row in rows for im in row)
    lines = []
    for row in rows:
        parts = []
        for im in row:
            parts += [np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=255),
                      np.full((h, gap, 3), 255, np.uint8)]
        lines.append(np.concatenate(parts[:-1], axis=1))
    w = max(line.shape[1] for line in lines)
    out = []
    for line in lines:
        out += [np.pad(line, ((0, 0), (0, w - line.shape[1]), (0, 0)), constant_values=255),
                np.full((gap, w, 3), 255, np.uint8)]
    return np.concatenate(out[:-1], axis=0)


def edit_grid(sources: Sequence[Any], edits: Sequence[Any], *more: Sequence[Any]) -> np.ndarray:
    """Rows of [source | edit | ...more columns]."""
    return image_grid([list(cols) for cols in zip(sources, edits, *more)])


def run(config: Any, workdir: str) -> LoopResult:
    os.makedirs(workdir, exist_ok=True)
    trainer = GRPOTrainer(config, workdir)
    result = trainer.train()
    if result.stopped == "done":
        trainer.export(result.state, os.path.join(workdir, "editor"))
    return result
