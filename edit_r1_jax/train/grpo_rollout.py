"""Editing-GRPO rollout: sample G edits per prompt with the flow-matching SDE, recording every step (algorithms.md b3,
b4), and turn the trajectories into the (sample, timestep) rows the update trains on.

Sampling (one jitted ``lax.scan`` over the S steps of the FLUX schedule, batch = prompts x G):

    x_0 ~ N(0, I) [B, L, 4C]  (shared by the G members of a group with ``same_noise``)
    for j in 0..S-1:   v_j = v_theta(x_j, sigma_j | text, reference)          (Kontext: reference tokens appended)
                       x_{j+1}, log p_j = flow_sde_step(x_j, v_j, sigma_j, sigma_{j+1}, a_j, sigma_1, eps_j, sde_type)

with a_j = ``noise_level`` on SDE steps and 0 (the deterministic Euler/ODE step, log p := 0) elsewhere. The sampler
returns every x_j (``latents`` [S+1, B, L, 4C]) and log p_j (``log_probs`` [S, B], the per-element *mean* Gaussian
log-density, decision e12), all float32.

Which steps are SDE / trained (``step_plan``):
  * default (Flow-GRPO): train the first floor(S * ``timestep_fraction``) steps (at least 1); ``noise_on="all"``
    puts noise on every step (Flow-GRPO's code), ``"trained"`` only on the trained ones (the others are ODE steps);
  * ``sde_window`` > 0 (Flow-GRPO-Fast): a window of that many consecutive steps starts at a random step in
    ``sde_window_range`` (drawn per GRPO step); only the window is SDE and trained;
  * ``timestep_selection="random"`` (DanceGRPO): every sample trains its own random floor(S * fraction) steps
    (noise on every step).

Rows: one per (sample i, trained step j) with x_j, x_{j+1}, log p_j (the sampler's, "old"), sigma_j, sigma_{j+1},
a_j, the model timestep, sigma_1 (flow_sde_step's sigma_max), the advantage of i, keep (0 for filtered
zero-advantage samples) and i's conditioning.
Rows are padded (valid = 0, keep = 0) to a multiple of ``multiple`` so every update has a static shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel, rl
from edit_r1_jax.models.flux.config import FluxTransformerConfig
from edit_r1_jax.train.editor_setup import velocity

SELECTIONS = ("first", "random")
NOISE_ON = ("all", "trained")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Static description of how the policy (and the reference) compute a velocity.

    lora_scale None: the trainable tree *is* the transformer (full fine-tune; the reference is a frozen copy
    ``frozen["ref"]``). Otherwise the trainable tree holds LoRA adapters over ``frozen["base"]`` and the reference is
    the base with the adapters disabled (Flow-GRPO's ``disable_adapter``).
    """
    tcfg: FluxTransformerConfig
    lora_scale: float | None = None
    mesh: Mesh | None = None
    rules: tuple = parallel.DEFAULT_RULES

    @property
    def is_lora(self) -> bool:
        return self.lora_scale is not None

    def policy_velocity(self, trainable, frozen, x, cond, t, cos, sin):
        if self.is_lora:
            return velocity(self.tcfg, frozen["base"], x, cond, t, cos, sin, lora=trainable,
                            lora_scale=self.lora_scale, mesh=self.mesh, rules=self.rules)
        return velocity(self.tcfg, trainable, x, cond, t, cos, sin, mesh=self.mesh, rules=self.rules)

    def reference_velocity(self, frozen, x, cond, t, cos, sin):
        params = frozen["base"] if self.is_lora else frozen["ref"]
        return velocity(self.tcfg, params, x, cond, t, cos, sin, mesh=self.mesh, rules=self.rules)


# ----------------------------------------------------------------------------------------------------------------
# which steps are SDE / trained

@dataclasses.dataclass
class StepPlan:
    noise_levels: np.ndarray      # [S] float32: a_j (0 = ODE step)
    train_steps: np.ndarray       # [B, K] int: trained step indices per sample


def step_plan(num_steps: int, batch: int, noise_level: float, *, timestep_fraction: float = 0.99,
              selection: str = "first", noise_on: str = "all", sde_window: int = 0,
              sde_window_range: tuple = (0, 0), rng: np.random.Generator | None = None) -> StepPlan:
    """Noise level per step and the trained steps of each sample (see the module docstring)."""
    s = int(num_steps)
    if selection not in SELECTIONS:
        raise ValueError(f"grpo.timestep_selection={selection!r}: expected one of {SELECTIONS}")
    if noise_on not in NOISE_ON:
        raise ValueError(f"grpo.noise_on={noise_on!r}: expected one of {NOISE_ON}")
    rng = rng or np.random.default_rng(0)
    levels = np.zeros((s,), np.float32)
    if sde_window:
        lo, hi = (int(sde_window_range[0]), int(sde_window_range[1])) if sde_window_range else (0, s)
        hi = s if hi <= 0 else min(hi, s)
        if sde_window > hi - lo:
            raise ValueError(f"grpo.sde_window={sde_window} does not fit grpo.sde_window_range=({lo}, {hi}) of a "
                             f"{s}-step schedule")
        start = int(rng.integers(lo, hi - sde_window + 1))
        steps = np.arange(start, start + sde_window)
        levels[steps] = noise_level
        return StepPlan(levels, np.tile(steps[None], (batch, 1)))
    k = max(1, int(np.floor(s * float(timestep_fraction) + 1e-6)))
    k = min(k, s)
    if selection == "random":
        levels[:] = noise_level
        train = np.stack([np.sort(rng.permutation(s)[:k]) for _ in range(batch)])
        return StepPlan(levels, train)
    steps = np.arange(k)
    if noise_on == "all":
        levels[:] = noise_level
    else:
        levels[steps] = noise_level
    return StepPlan(levels, np.tile(steps[None], (batch, 1)))


# ----------------------------------------------------------------------------------------------------------------
# the sampler

@dataclasses.dataclass
class Trajectories:
    latents: jax.Array     # [S+1, B, L, 4C] float32 (x_0 = noise ... x_S = the edit's latents)
    log_probs: jax.Array   # [S, B] float32


def _sample(spec: PolicySpec, sde_type: str, trainable, frozen, cond, x0, key, sigmas, model_t, levels, cos, sin):
    s = levels.shape[0]
    noise = jax.random.normal(key, (s,) + x0.shape, jnp.float32)
    b = x0.shape[0]

    def body(x, inp):
        eps, sig, sig_next, t, a = inp
        v = spec.policy_velocity(trainable, frozen, x, cond, jnp.broadcast_to(t, (b,)), cos, sin)
        x_next, lp, _, _ = rl.flow_sde_step(x, v, sig, sig_next, a, sigma_max=sigmas[1], noise=eps,
                                            sde_type=sde_type)
        return x_next, (x_next, lp)

    _, (xs, lps) = jax.lax.scan(body, x0.astype(jnp.float32), (noise, sigmas[:-1], sigmas[1:], model_t, levels))
    return jnp.concatenate([x0[None].astype(jnp.float32), xs], axis=0), lps


_SAMPLERS: dict = {}


def _sampler(spec: PolicySpec, sde_type: str, mesh: Mesh | None):
    """One jitted sampler per (spec, sde_type, mesh); reused across loops in a process (no recompiles)."""
    key = (spec, sde_type, mesh)
    if key not in _SAMPLERS:
        fn = functools.partial(_sample, spec, sde_type)
        if mesh is None:
            _SAMPLERS[key] = jax.jit(fn)
        else:
            traj = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
            _SAMPLERS[key] = jax.jit(fn, out_shardings=(traj, traj))
    return _SAMPLERS[key]


def initial_noise(key: jax.Array, num_prompts: int, group_size: int, shape: tuple, same_noise: bool) -> np.ndarray:
    """x_0 [P*G, L, 4C] float32 (host); with ``same_noise`` the G members of a group share one draw."""
    n = num_prompts if same_noise else num_prompts * group_size
    x = np.asarray(jax.device_get(jax.random.normal(key, (n,) + tuple(shape), jnp.float32)))
    return np.repeat(x, group_size, axis=0) if same_noise else x


def sample(spec: PolicySpec, trainable, frozen, cond: dict, x0, key, sigmas, model_t, levels, cos, sin, *,
           sde_type: str = "sde", mesh: Mesh | None = None) -> Trajectories:
    """Run the recorded sampler. cond / x0 are host arrays or jax.Arrays (batch first); with ``mesh`` they are laid
    out over ('data', 'fsdp') (the batch must divide the data-parallel size)."""
    if sde_type not in rl.SDE_TYPES:
        raise ValueError(f"grpo.sde_type={sde_type!r}: expected one of {rl.SDE_TYPES}")
    if mesh is not None:
        cond = put_rows(cond, mesh)
        x0 = put_rows({"x": x0}, mesh)["x"]
    fn = _sampler(spec, sde_type, mesh)
    args = (trainable, frozen, cond, x0, key, jnp.asarray(sigmas, jnp.float32), jnp.asarray(model_t, jnp.float32),
            jnp.asarray(levels, jnp.float32), cos, sin)
    if mesh is not None:
        with mesh:
            lat, lps = fn(*args)
    else:
        lat, lps = fn(*args)
    return Trajectories(lat, lps)


EVAL_NOISE_SEED = 0x4556


def record_noise(seed: int, n: int, shape: tuple) -> np.ndarray:
    """[n, *shape] float32: row i = N(0, I) from fold_in(key(seed + EVAL_NOISE_SEED), i)."""
    base = jax.random.PRNGKey(int(seed) + EVAL_NOISE_SEED)
    draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(shape), jnp.float32))
    return np.asarray(jax.device_get(draw(jnp.arange(n))))


def edit_ode(setup: Any, policy: PolicySpec, params: Any, frozen: Any, records: list, schedule: tuple, *,
             batch: int, mesh: Mesh | None = None, seed: int = 0, cos_sin: tuple | None = None) -> np.ndarray:
    """Edit ``records`` with the deterministic sampler (noise level 0 on every step = Euler on the ODE), in chunks
    of ``batch`` (the last one padded, so one compile serves every chunk). The initial noise of record i depends
    only on (``seed``, i) (``record_noise``), so evaluations are comparable across steps, runs and subsets.
    -> uint8 [N, S, S, 3]."""
    sigmas, model_t = schedule
    n = len(records)
    if n == 0:
        return np.zeros((0, setup.image_size, setup.image_size, 3), np.uint8)
    cos, sin = cos_sin if cos_sin is not None else setup.rope()
    x0_all = record_noise(int(seed), n, (setup.num_tokens, setup.token_channels))
    levels = np.zeros((len(model_t),), np.float32)
    out = []
    for lo in range(0, n, batch):
        chunk = list(records[lo:lo + batch])
        pad = batch - len(chunk)
        cond = setup.conditioning(chunk + [chunk[-1]] * pad)
        x0 = x0_all[lo:lo + len(chunk)]
        x0 = np.concatenate([x0, np.repeat(x0[-1:], pad, axis=0)])
        traj = sample(policy, params, frozen, cond, x0, jax.random.key(0), sigmas, model_t, levels, cos, sin,
                      mesh=mesh)
        out.append(setup.decode(to_host(traj.latents[-1]))[: len(chunk)])
    return np.concatenate(out)


def put_rows(batch: dict, mesh: Mesh) -> dict:
    """Host (or device) arrays, identical on every process -> global arrays split on the leading axis over
    ('data', 'fsdp')."""
    sh = NamedSharding(mesh, P(parallel.BATCH_AXES))
    out = {}
    for k, v in batch.items():
        if isinstance(v, jax.Array) and getattr(v, "sharding", None) == sh:
            out[k] = v
            continue
        v = to_host(v)
        out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
    return out


def to_host(x: Any) -> np.ndarray:
    """jax.Array (possibly spread over processes) or array-like -> NumPy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------------------------------------------
# rows for the update

ROW_KEYS = ("x_t", "x_next", "logp_old", "sigma", "sigma_next", "noise_level", "t", "sigma_max", "adv", "keep",
            "valid")


def make_rows(latents: np.ndarray, log_probs: np.ndarray, plan: StepPlan, sigmas: np.ndarray, model_t: np.ndarray,
              advantages: np.ndarray, keep: np.ndarray, cond: dict, multiple: int = 1) -> dict:
    """Host rows (see the module docstring), ordered sample-major, padded to a multiple of ``multiple``.

    latents [S+1, B, L, C], log_probs [S, B], advantages / keep [B], cond leaves [B, ...]. Returns a dict of
    [R, ...] arrays with the ROW_KEYS plus every cond key.
    """
    b, k = plan.train_steps.shape
    ii = np.repeat(np.arange(b), k)
    jj = plan.train_steps.reshape(-1)
    r = len(ii)
    pad = (-r) % max(int(multiple), 1)
    if pad:
        ii = np.concatenate([ii, np.full((pad,), ii[0])])
        jj = np.concatenate([jj, np.full((pad,), jj[0])])
    valid = np.concatenate([np.ones((r,), np.float32), np.zeros((pad,), np.float32)])
    rows = {
        "x_t": latents[jj, ii], "x_next": latents[jj + 1, ii], "logp_old": log_probs[jj, ii].astype(np.float32),
        "sigma": sigmas[jj].astype(np.float32), "sigma_next": sigmas[jj + 1].astype(np.float32),
        "noise_level": plan.noise_levels[jj].astype(np.float32), "t": model_t[jj].astype(np.float32),
        "sigma_max": np.full((len(ii),), sigmas[1], np.float32),
        "adv": advantages[ii].astype(np.float32), "keep": keep[ii].astype(np.float32) * valid, "valid": valid,
    }
    for name, v in cond.items():
        rows[name] = np.asarray(v)[ii]
    return rows
