"""GCPO (Group Contrastive Preference Optimization) of the reasoning reward model (algorithms.md b2, b5, d, e1-e7).

Per step, for each of P preference pairs (source x_ref, instruction q, principles P, preferred x^w, rejected x^l):

  1. rollout   N traces per image with the current policy at ``gcpo.temperature`` (``gcpo_rollout.sample``);
               the sampler's per-token log-probs are kept as log pi_old
  2. scores    tau = the ``<score>`` of each trace (``rrm.parse``; NaN for a parse failure, decision e6)
  3. rewards   r^w_j = (1/N) sum_k 1{tau^w_j > tau^l_k},  r^l_j = (1/N) sum_k 1{tau^l_j < tau^w_k}     (eqs. 1-2)
  4. advantage A^w_j = r^w_j - mean_j r^w,  A^l_j = r^l_j - mean_j r^l   (eq. 3; std division off by default)
               pairs whose 2N advantages are all 0 carry no gradient: they are skipped and counted
  5. update    ``gcpo.ppo_epochs`` (mu) optimizer steps of the jitted ``step.make_train_step`` on

                 L = (1/|K|) sum_{i in K} (1/T_i) sum_t -min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_lo, 1+eps_hi) A_i)
                     [+ beta * k3(log pi, log pi_ref) inside the token sum when gcpo.kl_beta > 0]
                 rho_{i,t} = pi(o_{i,t} | .) / pi_old(o_{i,t} | .),   K = traces of kept pairs,   T_i = own length

               (eq. 4 with sequence-mean-token-mean aggregation; no KL by default). Before the first epoch the
               params are the sampler's, so that epoch's rho must be 1: its max |log pi - log pi_old| and ratio
               mean/min/max are logged every step (``logp_abs_diff_max``, ``ratio_*``) and checked against
               ``gcpo.logp_tol`` (warn, or raise with ``gcpo.logp_check="error"``).

The loop is ``rl_loop.run`` (the scaffolding shared with editing GRPO: resume, metrics, NaN guard, checkpoints,
SIGTERM) around ``GCPOStep``. ``state.step`` counts optimizer steps (mu per GCPO step, also when every pair of a
step is skipped and no update runs), so checkpoints are named by optimizer step and a GCPO step is
``state.step // mu``. The pairs of GCPO step s are positions s*P .. s*P+P-1 of a per-epoch seeded permutation and
the sampling key is ``fold_in(fold_in(state.rng, ROLLOUT_STREAM), s)``, so a resumed run repeats exactly what an
uninterrupted one would do.

    edit-r1-jax gcpo --config configs/tiny.py --workdir runs/gcpo [--set gcpo.init_from=runs/sft/hf]

Config ``gcpo`` (defaults ``GCPO_DEFAULTS``): num_samples N, temperature, max_new_tokens, ppo_epochs mu,
eps_low/eps_high, kl_beta, std_normalize, divide_by_non_tied, skip_zero_adv, pairs_per_step P, init_from (an SFT
run's ``hf/`` export; "" = the ``rrm`` section's checkpoint or random init), prompt_pad_to (fixed prompt length,
0 = the longest of the first 64 pairs rounded up to 64), score_fallback (accept the parser's 10 x average_score),
logp_tol, logp_check ("warn" | "error" | "off"). ``train.*`` as for SFT (``train.steps`` = GCPO steps).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel, rl
from edit_r1_jax.rl.losses import LOG_RATIO_CLAMP
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.models.qwen2_5_vl.common import sharding_context
from edit_r1_jax.models.qwen2_5_vl.model import Qwen25VL, embed_inputs, position_ids_for
from edit_r1_jax.train import gcpo_rollout as ro_lib
from edit_r1_jax.train import rl_loop
from edit_r1_jax.train import state as state_lib
from edit_r1_jax.train import step as step_lib
from edit_r1_jax.train.generic_loop import LOOP_DEFAULTS, LoopResult
from edit_r1_jax.train.rrm_setup import RRMSetup, build_rrm

log = logging.getLogger(__name__)

GCPO_DEFAULTS = dict(num_samples=8, temperature=1.0, max_new_tokens=512, ppo_epochs=1, eps_low=0.2, eps_high=0.2,
                     kl_beta=0.0, std_normalize=False, divide_by_non_tied=False, skip_zero_adv=True,
                     pairs_per_step=1, init_from="", prompt_pad_to=0, score_fallback=False, logp_tol=1e-4,
                     logp_check="warn")
ROLLOUT_STREAM = 0x6C50   # folded into the state key for sampling (the train step folds in state.step)


def _get(cfg: Any, key: str, default: Any) -> Any:
    return state_lib._cfg_get(cfg, key, default)  # noqa: SLF001 - shared config accessor


def gcpo_options(config: Any) -> dict:
    g = _get(config, "gcpo", {})
    opts = {k: type(v)(_get(g, k, v)) for k, v in GCPO_DEFAULTS.items()}
    if opts["logp_check"] not in ("warn", "error", "off"):
        raise ValueError(f"gcpo.logp_check={opts['logp_check']!r}: expected 'warn', 'error' or 'off'")
    if opts["temperature"] <= 0:
        raise ValueError(f"gcpo.temperature={opts['temperature']}: GCPO samples, it must be > 0")
    for k in ("num_samples", "max_new_tokens", "ppo_epochs", "pairs_per_step"):
        if opts[k] < 1:
            raise ValueError(f"gcpo.{k}={opts[k]}: must be >= 1")
    return opts


# ----------------------------------------------------------------------------------------------------------------
# log-probs and the objective

def completion_logprobs(cfg: Any, params: Any, input_ids, attention_mask, pixel_values, grid, num_new: int,
                        temperature: float, *, mesh: Mesh | None = None, rules: Any = None) -> jax.Array:
    """log softmax(logits / temperature)[o_t] of the last ``num_new`` tokens of ``input_ids`` -> [B, num_new] f32.

    input_ids / attention_mask [B, T] (prompt ++ completion), pixel_values [B, Np, D], grid [2B, 3] (static).
    The same forward as ``qwen2_5_vl.forward`` (torch: ``Qwen2_5_VLForConditionalGeneration(...).logits``), but the
    LM head runs on the completion positions only (T-num_new-1 .. T-2 predict the completion tokens), and a sampled
    ``<|image_pad|>`` in the completion is an ordinary token, as it was for the sampler (and for transformers'
    ``generate``): its own embedding and a text M-RoPE position, no image feature spliced in. A plain forward would
    splice image features there (shifting every later image feature of the batch) and move the later positions.
    """
    b, t = input_ids.shape
    pv = pixel_values.reshape(-1, pixel_values.shape[-1]).astype(params["visual"]["patch_embed"]["kernel"].dtype)
    mask = attention_mask.astype(jnp.int32)
    sampled_img_bt = (jnp.arange(t)[None, :] >= t - num_new) & (input_ids == cfg.image_token_id)
    text_id = 0 if cfg.image_token_id != 0 else 1
    layout_ids = jnp.where(sampled_img_bt, text_id, input_ids)    # where images are: the prompt's placeholders only

    def body(mdl):
        x, _ = embed_inputs(mdl, cfg, layout_ids, pv, grid)
        x = jnp.where(sampled_img_bt[..., None], mdl.embed(input_ids), x)
        pos = position_ids_for(cfg, layout_ids, mask, grid)
        h_btd, _, _ = mdl.decode(x, pos, mask)
        return mdl.logits(h_btd[:, t - num_new - 1: t - 1])

    ctx = sharding_context(mesh, parallel.DEFAULT_RULES if rules is None else rules) \
        if mesh is not None and mesh.size > 1 else contextlib.nullcontext()
    with ctx:
        logits_bnv = nn.apply(body, Qwen25VL(cfg))({"params": params})
    return rl.token_log_probs(logits_bnv, input_ids[:, t - num_new:], temperature)


def gcpo_objective(logp, old_logp, advantages, completion_mask, keep, *, eps_low: float = 0.2,
                   eps_high: float = 0.2, ref_logp=None, beta: float = 0.0) -> tuple[jax.Array, dict]:
    """GCPO loss over the kept traces (see the module docstring) and its metrics.

    logp, old_logp, completion_mask, ref_logp: [R, Nn]; advantages, keep: [R] (keep 0 = skipped pair's trace).
    ``rl.clipped_surrogate`` with seq_mean_tok_mean averages over all R rows; a skipped row contributes 0, so the
    mean over kept rows is that times R / |K|. Metrics: policy_loss, clip_frac / approx_kl / kl (kept tokens),
    and over *all* traces the sampler check ``logp_abs_diff_max`` = max |logp - old_logp| and ratio_mean/min/max;
    ``loss_weight`` = |K| (microbatches combine as a mean over kept traces).
    """
    cm = jnp.asarray(completion_mask, jnp.float32)
    keep = jnp.asarray(keep, jnp.float32)
    loss, met = rl.clipped_surrogate(logp, old_logp, advantages, cm * keep[:, None], eps_low, eps_high,
                                     "seq_mean_tok_mean", logp_ref=ref_logp, beta=beta)
    n_keep = jnp.sum(keep)
    scale = logp.shape[0] / jnp.maximum(n_keep, 1.0)
    met = {k: v for k, v in met.items() if not k.startswith("ratio_")}
    met["policy_loss"] = met["policy_loss"] * scale
    on = cm > 0
    d = jax.lax.stop_gradient(jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32))
    ratio = jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    n = jnp.maximum(cm.sum(), 1.0)
    met["logp_abs_diff_max"] = jnp.max(jnp.where(on, jnp.abs(d), 0.0))
    met["ratio_mean"] = jnp.where(on, ratio, 0.0).sum() / n
    met["ratio_min"] = jnp.min(jnp.where(on, ratio, jnp.inf))
    met["ratio_max"] = jnp.max(jnp.where(on, ratio, -jnp.inf))
    met["kept_traces"] = n_keep
    met[step_lib.WEIGHT_KEY] = n_keep
    return loss * scale, met


def make_loss_fn(setup: RRMSetup, opts: dict, mesh: Mesh | None = None, rules: Any = None) -> step_lib.LossFn:
    """(params, batch, rng) -> (loss, aux) on a ``gcpo_rollout.update_batch`` (plus ``ref_logp`` if kl_beta)."""
    beta = float(opts["kl_beta"])

    def loss_fn(params, batch, rng):
        del rng
        ids = batch["input_ids"]
        logp = completion_logprobs(setup.cfg, params, ids, batch["attention_mask"], batch["pixel_values"],
                                   setup.grid(ids.shape[0]), batch["completion_mask"].shape[1],
                                   float(opts["temperature"]), mesh=mesh, rules=rules)
        return gcpo_objective(logp, batch["old_logp"], batch["advantages"], batch["completion_mask"], batch["keep"],
                              eps_low=float(opts["eps_low"]), eps_high=float(opts["eps_high"]),
                              ref_logp=batch.get("ref_logp") if beta else None, beta=beta)
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# data

def pair_records(config: Any) -> Any:
    """Preference pairs from ``data.pairs_jsonl`` if set, else the synthetic world (``data.num_train`` pairs)."""
    dcfg = _get(config, "data", {})
    path = _get(dcfg, "pairs_jsonl", "")
    if path:
        from edit_r1_jax.data import formats
        return formats.JsonlSource(path, formats.PAIR, skip_bad=bool(_get(dcfg, "skip_bad", False)))
    from edit_r1_jax.data import synthetic
    return synthetic.make_preference_pairs(int(_get(dcfg, "num_train", 64)), seed=int(_get(config, "seed", 0)),
                                           size=int(_get(dcfg, "image_size", 112)))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (identical on every process) -> jax.Arrays with rows split over ('data', 'fsdp')."""
    sh = NamedSharding(mesh, P(parallel.BATCH_AXES))
    return {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# one GCPO step

class GCPOStep:
    """Rollout + update of one GCPO step for a fixed mesh (the loop's body; tests drive the two halves).

    setup, opts      RRMSetup and ``gcpo_options``
    mesh, shardings  the mesh and the TrainState shardings (``StatePlan.shardings``)
    prompt_len       fixed prompt length (multiple of 64 keeps the sampler's cache unpadded)
    scorer           texts, principle counts -> (scores [R] with NaN for failures, statuses)
    ref_params       frozen reference for the k3 term (only when kl_beta > 0)
    """

    def __init__(self, setup: RRMSetup, opts: dict, mesh: Mesh, shardings: state_lib.TrainState, *,
                 train_cfg: Any, prompt_len: int, rules: Any = None, trainable_mask: Any = None,
                 scorer: ro_lib.Scorer | None = None, ref_params: Any = None):
        self.setup, self.opts, self.mesh, self.shardings = setup, opts, mesh, shardings
        self.prompt_len = int(prompt_len)
        self.mu = int(opts["ppo_epochs"])
        self.scorer = scorer or ro_lib.parse_scorer(bool(opts["score_fallback"]))
        self.eos_ids = tuple(sorted({int(e) for e in (setup.cfg.eos_token_id or ())} | {setup.inputs.eos_id}))
        rows = 2 * int(opts["pairs_per_step"]) * int(opts["num_samples"])
        dp = parallel.data_parallel_size(mesh)
        accum = int(_get(train_cfg, "grad_accum_steps", 1))
        if rows % (dp * accum):
            raise ValueError(f"GCPO step has 2 * gcpo.pairs_per_step * gcpo.num_samples = {rows} trace rows, not "
                             f"divisible by data*fsdp ({dp}) * train.grad_accum_steps ({accum}); change "
                             f"gcpo.pairs_per_step / gcpo.num_samples or the mesh")
        self.loss_fn = make_loss_fn(setup, opts, mesh, rules)
        self.step_fn = step_lib.make_train_step(self.loss_fn, state_shardings=shardings, mesh=mesh,
                                                grad_accum_steps=accum, trainable_mask=trainable_mask,
                                                lr_schedule=state_lib.make_lr_schedule(train_cfg))
        self.ref_params = ref_params
        self.ref_fn = None
        if float(opts["kl_beta"]) and ref_params is None:
            raise ValueError(f"gcpo.kl_beta={opts['kl_beta']} needs the frozen reference params (ref_params)")
        if float(opts["kl_beta"]):
            row_sh = NamedSharding(mesh, P(parallel.BATCH_AXES))

            def ref_logp(params, batch):
                ids = batch["input_ids"]
                return completion_logprobs(setup.cfg, params, ids, batch["attention_mask"], batch["pixel_values"],
                                           setup.grid(ids.shape[0]), batch["completion_mask"].shape[1],
                                           float(opts["temperature"]), mesh=mesh, rules=rules)
            self.ref_fn = jax.jit(ref_logp, out_shardings=row_sh)

    def rollout(self, state: state_lib.TrainState, records: list, step: int):
        """-> (Rollout, scores [R], statuses, Advantages, metrics)."""
        o = self.opts
        prompts = ro_lib.prompt_batch(self.setup.inputs, records, self.prompt_len)
        key = rl_loop.rollout_key(state, ROLLOUT_STREAM, step)
        with self.mesh:
            ro = ro_lib.sample(self.setup.cfg, state.params, self.setup.inputs, prompts, int(o["num_samples"]),
                               self.setup.grid, max_new_tokens=int(o["max_new_tokens"]),
                               temperature=float(o["temperature"]), rng=key, eos_ids=self.eos_ids)
        scores, statuses = self.scorer(ro.texts, ro.num_principles)
        scores = np.asarray(scores, np.float32)
        adv = ro_lib.advantages(scores, len(records), std_normalize=bool(o["std_normalize"]),
                                divide_by_non_tied=bool(o["divide_by_non_tied"]), skip_zero=bool(o["skip_zero_adv"]))
        return ro, scores, statuses, adv, ro_lib.rollout_metrics(ro, scores, statuses, adv)

    def update(self, state: state_lib.TrainState, ro: ro_lib.Rollout, adv: ro_lib.Advantages):
        """mu optimizer steps on the rollout (none if every pair was skipped). -> (state, metrics)."""
        if not np.any(adv.keep > 0):
            step = jax.device_put(jax.device_get(state.step) + self.mu, self.shardings.step)
            return state.replace(step=step), {"update_skipped": 1}
        batch = global_batch(ro_lib.update_batch(ro, adv), self.mesh)
        if self.ref_fn is not None:
            with self.mesh:
                batch["ref_logp"] = self.ref_fn(self.ref_params, batch)
        per_epoch = []
        for _ in range(self.mu):
            state, m = self.step_fn(state, batch)
            per_epoch.append(m)
        per_epoch = jax.device_get(per_epoch)
        first, last = per_epoch[0], per_epoch[-1]
        out = {k: v for k, v in first.items()}    # epoch 0: params == sampler params -> the sampler check
        out.update({k: last[k] for k in ("skipped_nonfinite", "consecutive_nonfinite") if k in last})
        if self.mu > 1:
            for k in ("loss", "policy_loss", "clip_frac", "approx_kl", "grad_norm"):
                if k in last:
                    out[f"last_epoch/{k}"] = last[k]
        out["update_skipped"] = 0
        self.check_logprobs(out)
        return state, out

    def check_logprobs(self, m: dict) -> None:
        diff, tol = float(m["logp_abs_diff_max"]), float(self.opts["logp_tol"])
        if self.opts["logp_check"] == "off" or not diff > tol:
            return
        msg = (f"GCPO: sampler log-probs differ from a recompute with the same params by up to {diff:.3g} "
               f"(> gcpo.logp_tol={tol:g}; ratio mean {float(m['ratio_mean']):.6f}, min "
               f"{float(m['ratio_min']):.6f}, max {float(m['ratio_max']):.6f}). The PPO ratio is then biased: check "
               f"temperature / prompt layout / dtype (bf16 or TF32 matmuls cannot reach 1e-5: raise gcpo.logp_tol)")
        if self.opts["logp_check"] == "error":
            raise RuntimeError(msg)
        log.warning("%s", msg)

    def __call__(self, state: state_lib.TrainState, records: list, step: int):
        t0 = time.perf_counter()
        ro, scores, statuses, adv, m_ro = self.rollout(state, records, step)
        t1 = time.perf_counter()
        state, m_up = self.update(state, ro, adv)
        t2 = time.perf_counter()
        gen_tokens = float(ro.completion_mask.sum())
        return state, {**m_ro, **m_up, "rollout_s": t1 - t0, "update_s": t2 - t1,
                       "gen_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9)}


# ----------------------------------------------------------------------------------------------------------------
# the loop

def _with_init_from(config: Any, init_from: str) -> Any:
    if not init_from:
        return config
    config = copy.deepcopy(config)
    config.rrm.checkpoint = init_from
    return config


def _trainable_mask(config: Any, setup: RRMSetup) -> Any:
    if not bool(_get(_get(config, "train", {}), "freeze_vision", False)):
        return None
    frozen = state_lib.mask_from_regex(qwen.param_shapes(setup.cfg), [r"^visual/"])
    return jax.tree.map(lambda f: not f, frozen)


def _optimizer_cfg(train_cfg: Any, mu: int) -> dict:
    """``train`` with steps / warmup in optimizer steps (mu per GCPO step) for the lr schedule."""
    d = dict(train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else dict(train_cfg or {}))
    d["steps"] = int(d.get("steps", 1)) * mu
    d["warmup_steps"] = int(d.get("warmup_steps", 0) or 0) * mu
    return d


def train(config: Any, workdir: str, *, scorer: ro_lib.Scorer | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> tuple[LoopResult, RRMSetup]:
    """Run ``train.steps`` GCPO steps in ``workdir`` (resuming from its latest checkpoint)."""
    opts = gcpo_options(config)
    config = _with_init_from(config, opts["init_from"])
    tcfg = _get(config, "train", {})
    loop = {k: _get(tcfg, k, v) for k, v in LOOP_DEFAULTS.items()}
    total_steps, mu, seed = int(loop["steps"]), int(opts["ppo_epochs"]), int(_get(config, "seed", 0))
    setup = build_rrm(config, workdir)

    # -- mesh, optimizer, state plan ---------------------------------------------------------------------------
    mesh = parallel.make_mesh(_get(config, "mesh", None))
    rules = parallel.rules_from_config(config)
    log.info("%s", parallel.describe_mesh(mesh))
    opt_cfg = _optimizer_cfg(tcfg, mu)
    mask = _trainable_mask(config, setup)
    tx = state_lib.make_optimizer(opt_cfg, mask)
    rng = jax.random.PRNGKey(seed)
    plan = state_lib.plan_sharded_state(lambda k: qwen.init_params(setup.cfg, k), tx, mesh, rules, rng=rng,
                                        param_logical_axes=setup.param_logical_axes())

    def load_params():   # init_from / rrm.checkpoint, placed on the plan's shardings
        _, params = qwen.load_pretrained(setup.checkpoint, mesh=mesh, rules=rules)
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, plan.abstract.params)

    def fresh_state():
        if not setup.checkpoint:
            return plan.init()
        create = jax.jit(lambda p: state_lib.TrainState.create(params=p, tx=tx, rng=jax.random.fold_in(rng, 1)),
                         out_shardings=plan.shardings)
        with mesh:
            return create(load_params())

    ref_params = None
    if float(opts["kl_beta"]):
        ref_params = load_params() if setup.checkpoint else plan.init().params

    # -- data --------------------------------------------------------------------------------------------------
    pairs = pair_records(config)
    per_step = int(opts["pairs_per_step"])
    prompt_len = int(opts["prompt_pad_to"]) or ro_lib.prompt_length(
        setup.inputs, [pairs[i] for i in range(min(len(pairs), 64))])
    log.info("GCPO: %d pairs, %d per step, N=%d, prompt length %d, %d new tokens", len(pairs), per_step,
             opts["num_samples"], prompt_len, opts["max_new_tokens"])
    gstep = GCPOStep(setup, opts, mesh, plan.shardings, train_cfg=opt_cfg, prompt_len=prompt_len, rules=rules,
                     trainable_mask=mask, scorer=scorer, ref_params=ref_params)

    def step_fn(state, step):
        return gstep(state, [pairs[i] for i in rl_loop.epoch_indices(step, per_step, len(pairs), seed)], step)

    # -- resume or init, then the rollout -> update loop (metrics, NaN guard, checkpoints, SIGTERM) -------------
    spec = rl_loop.LoopSpec(total_steps=total_steps, steps_per_iter=mu, log_every=int(loop["log_every"]),
                            checkpoint_every=int(loop["checkpoint_every"]),
                            keep_checkpoints=int(loop["keep_checkpoints"]),
                            async_checkpoint=bool(loop["async_checkpoint"]),
                            max_consecutive_nonfinite=int(loop["max_consecutive_nonfinite"]), desc="gcpo")
    result = rl_loop.run(config, workdir, spec, init_fn=fresh_state, target=plan.restore_target(), step_fn=step_fn,
                         data_state_fn=lambda s: {"next_pair": s * per_step, "num_pairs": len(pairs)},
                         on_step=on_step)
    return result, setup


def run(config: Any, workdir: str) -> LoopResult:
    os.makedirs(workdir, exist_ok=True)
    result, setup = train(config, workdir)
    if result.stopped == "done" and bool(_get(_get(config, "train", {}), "export_hf", True)):
        from edit_r1_jax.train.export import export_rrm_hf
        export_rrm_hf(setup, result.state.params, os.path.join(workdir, "hf"))
    return result
