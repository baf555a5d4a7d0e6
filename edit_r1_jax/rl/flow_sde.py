"""Flow-matching sampling steps with log-probabilities, and sigma schedules (spec: algorithms.md b3, b4).

Conventions (rectified flow, as FLUX / SD3 / Flow-GRPO): x_sigma = (1 - sigma) * x_0 + sigma * eps, the model
predicts the velocity v = eps - x_0, sampling goes from sigma = 1 (noise) down to sigma = 0 (data), so every step
has dt = sigma_next - sigma < 0.

Step functions are pure jax.numpy, compute in float32 (inputs of any float dtype are cast), and are jit- and
vmap-able. The batch axis is first. `sigma`, `sigma_next`, `noise_level` and `sigma_max` may each be Python or
0-d scalars or 1-d arrays of shape [B] (one value per sample, broadcast over the other axes).

Schedules are static configuration, so they are computed in NumPy float32 once on the host, mirroring the
arithmetic of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` (the values agree to float32 rounding;
tests/test_rl_schedules.py checks them against diffusers).

PyTorch counterparts: `flow_sde_step(sde_type="sde" | "cps")` <-> Flow-GRPO
`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob`; `sde_type="dance"` <-> DanceGRPO
`flux_step(..., sde_solver=True)`; `ode_step` <-> `FlowMatchEulerDiscreteScheduler.step`; `flux_sigmas` <->
`FluxKontextPipeline.__call__` (linspace + `calculate_shift`) followed by `set_timesteps(sigmas=..., mu=...)`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SDE_TYPES",
    "flow_sde_step",
    "ode_step",
    "calculate_shift",
    "time_shift_exponential",
    "static_shift",
    "stretch_to_terminal",
    "flux_sigmas",
    "sd3_sigmas",
]

SDE_TYPES = ("sde", "cps", "dance")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------
def _per_sample(value, sample: jax.Array, name: str) -> jax.Array:
    """Scalar -> 0-d float32; [B] -> [B, 1, ..., 1] so it broadcasts against `sample` [B, ...]."""
    value = jnp.asarray(value, dtype=jnp.float32)
    if value.ndim == 0:
        return value
    if value.ndim == 1 and value.shape[0] == sample.shape[0]:
        return value.reshape((sample.shape[0],) + (1,) * (sample.ndim - 1))
    raise ValueError(
        f"flow_sde: `{name}` must be a scalar or have shape [B]=({sample.shape[0]},) matching sample "
        f"{tuple(sample.shape)}; got shape {tuple(value.shape)}"
    )


def _check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"flow_sde: `{name_b}` shape {tuple(b.shape)} must equal `{name_a}` shape {tuple(a.shape)}")


def ode_step(sample, velocity, sigma, sigma_next) -> jax.Array:
    """Deterministic Euler step of the probability-flow ODE: x' = x + (sigma_next - sigma) * v.

    Args: sample, velocity [B, ...] (cast to float32); sigma, sigma_next scalars or [B].
    Returns: x' [B, ...] float32. (PyTorch: `FlowMatchEulerDiscreteScheduler.step` with stochastic sampling off.)
    """
    x = jnp.asarray(sample, jnp.float32)
    v = jnp.asarray(velocity, jnp.float32)
    _check_same_shape(x, v, "sample", "velocity")
    dt = _per_sample(sigma_next, x, "sigma_next") - _per_sample(sigma, x, "sigma")
    return x + dt * v


def flow_sde_step(
    sample,
    velocity,
    sigma,
    sigma_next,
    noise_level,
    sigma_max=None,
    noise=None,
    prev_sample=None,
    sde_type: str = "sde",
):
    """One stochastic flow-matching step from sigma to sigma_next, with the per-step log-probability.

    With dt = sigma_next - sigma (< 0), a = noise_level, x = sample, v = velocity, x0 = x - sigma v, x1 = x + (1 -
    sigma) v:

    * ``"sde"`` (Flow-GRPO; Euler-Maruyama of dx = [v + s_t^2/(2 sigma) (x + (1-sigma) v)] dsigma + s_t dw, which
      has the marginals of the ODE):
          s_t  = a * sqrt(sigma / (1 - sigma~)),   sigma~ = sigma_max where sigma == 1, else sigma
          mean = x (1 + s_t^2 dt / (2 sigma)) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
          x'   = mean + s_t sqrt(-dt) eps
    * ``"dance"`` (DanceGRPO, constant diffusion coefficient eta = a):
          s_t  = a,   score = -(x - (1 - sigma) x0) / sigma^2
          mean = x + dt v + dt (-a^2 / 2) score,   x' = mean + s_t sqrt(-dt) eps
    * ``"cps"`` (Flow-GRPO-Fast, coefficient-preserving):
          s_t  = sigma_next sin(a pi / 2)
          mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next^2 - s_t^2),   x' = mean + s_t eps

    log_prob, one value per sample, is the **mean** over all non-batch elements (not the sum; algorithms.md e12):
      "sde", "dance": mean_elements[ -(x' - mean)^2 / (2 n^2) - log n - log(2 pi)/2 ],  n = noise std of x'
                      (n = s_t sqrt(-dt)); i.e. the Gaussian log-density N(x'; mean, n^2) averaged per element.
      "cps":          mean_elements[ -(x' - mean)^2 ]  (Flow-GRPO drops every constant and the variance; it is not
                      a normalised density).
    x' enters the log-prob through `stop_gradient` (Flow-GRPO's `prev_sample.detach()`): gradients flow only
    through `mean`, i.e. through the velocity.

    noise_level = 0 (or any step whose noise std is 0) is the deterministic ODE step: for "sde" and "dance" the
    mean reduces to x + dt v (for "cps" too), x' = mean, and log_prob is *defined as 0* for "sde"/"dance" (a point
    mass has no density; 0 makes the policy ratio of two deterministic steps exactly 1 and never produces NaN, also
    in gradients). For "cps" the formula stays finite and is used as is.

    Args:
      sample: x [B, ...], any float dtype (computed in float32).
      velocity: v [B, ...], same shape as sample.
      sigma, sigma_next: current and next sigma, scalars or [B] (0 <= sigma_next < sigma <= 1).
      noise_level: a (eta for "dance"), scalar or [B].
      sigma_max: the schedule's second sigma (sigmas[1]), used in "sde" where sigma == 1 (as Flow-GRPO, whose
        s_t would otherwise divide by 0). Default None uses sigma_next, which is identical because sigma == 1
        only on the first step, whose sigma_next is sigmas[1].
      noise: eps ~ N(0, I) [B, ...], used when prev_sample is None.
      prev_sample: x' [B, ...] to evaluate (e.g. stored at rollout time); when given, `noise` is ignored.
      sde_type: "sde" | "cps" | "dance".

    Returns:
      prev_sample [B, ...] float32 (x'), log_prob [B] float32, mean [B, ...] float32, std [B] float32 (s_t: the
      diffusion coefficient *before* the sqrt(-dt) factor for "sde"/"dance"; for "cps" it is the noise std itself).
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"flow_sde_step: sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    x = jnp.asarray(sample, jnp.float32)
    v = jnp.asarray(velocity, jnp.float32)
    _check_same_shape(x, v, "sample", "velocity")
    if x.ndim < 1:
        raise ValueError("flow_sde_step: sample needs a leading batch axis, got a scalar")
    batch = x.shape[0]

    sig = _per_sample(sigma, x, "sigma")
    sig_next = _per_sample(sigma_next, x, "sigma_next")
    a = _per_sample(noise_level, x, "noise_level")
    dt = sig_next - sig
    sqrt_minus_dt = jnp.sqrt(jnp.maximum(-dt, 0.0))

    if sde_type == "sde":
        sig_max = sig_next if sigma_max is None else _per_sample(sigma_max, x, "sigma_max")
        sig_tilde = jnp.where(sig == 1.0, sig_max, sig)
        s_t = a * jnp.sqrt(sig / (1.0 - sig_tilde))
        mean = x * (1.0 + s_t**2 / (2.0 * sig) * dt) + v * (1.0 + s_t**2 * (1.0 - sig) / (2.0 * sig)) * dt
        noise_std = s_t * sqrt_minus_dt
    elif sde_type == "dance":
        s_t = a
        x0 = x - sig * v
        score = -(x - (1.0 - sig) * x0) / sig**2
        mean = x + dt * v + dt * (-0.5 * s_t**2 * score)
        noise_std = s_t * sqrt_minus_dt
    else:  # "cps"
        s_t = sig_next * jnp.sin(a * (math.pi / 2.0))
        x0 = x - sig * v
        x1 = x + (1.0 - sig) * v
        mean = x0 * (1.0 - sig_next) + x1 * jnp.sqrt(jnp.maximum(sig_next**2 - s_t**2, 0.0))
        noise_std = s_t

    if prev_sample is None:
        if noise is None:
            raise ValueError(
                "flow_sde_step: pass `noise` (standard normal, shape of sample) to draw x', or `prev_sample` to "
                "evaluate one; for a noise-free step use ode_step"
            )
        eps = jnp.asarray(noise, jnp.float32)
        _check_same_shape(x, eps, "sample", "noise")
        prev = mean + noise_std * eps
    else:
        prev = jnp.asarray(prev_sample, jnp.float32)
        _check_same_shape(x, prev, "sample", "prev_sample")

    diff = jax.lax.stop_gradient(prev) - mean
    if sde_type == "cps":
        log_prob_el = -(diff**2)
    else:
        deterministic = noise_std == 0.0
        safe_std = jnp.where(deterministic, 1.0, noise_std)  # keeps the untaken branch (and its gradient) finite
        log_prob_el = -(diff**2) / (2.0 * safe_std**2) - jnp.log(safe_std) - _HALF_LOG_2PI
        log_prob_el = jnp.where(deterministic, 0.0, log_prob_el)
    log_prob = jnp.mean(log_prob_el, axis=tuple(range(1, x.ndim)))

    std = jnp.broadcast_to(s_t, (batch,) + (1,) * (x.ndim - 1)).reshape(batch)
    return prev, log_prob, mean, std


# ----------------------------------------------------------------------------------------------------------------
# Sigma schedules (host-side NumPy float32)
# ----------------------------------------------------------------------------------------------------------------
def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX resolution-dependent shift: mu on the line through (base_seq_len, base_shift), (max_seq_len, max_shift).

    mu = m * image_seq_len + b,  m = (max_shift - base_shift) / (max_seq_len - base_seq_len),  b = base_shift - m *
    base_seq_len. image_seq_len counts the packed *target* latent tokens only ((H/16) * (W/16); 4096 at 1024^2).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def time_shift_exponential(mu: float, sigmas) -> np.ndarray:
    """sigma' = e^mu / (e^mu + (1/sigma - 1)), in float32 (diffusers `time_shift_type="exponential"`, exponent 1)."""
    s = np.asarray(sigmas, dtype=np.float32)
    e = np.float32(math.exp(mu))
    return (e / (e + (np.float32(1.0) / s - np.float32(1.0)))).astype(np.float32)


def static_shift(sigmas, shift: float) -> np.ndarray:
    """SD3-style static shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma), in float32."""
    s = np.asarray(sigmas, dtype=np.float32)
    k = np.float32(shift)
    return (k * s / (np.float32(1.0) + (k - np.float32(1.0)) * s)).astype(np.float32)


def stretch_to_terminal(sigmas, shift_terminal: float) -> np.ndarray:
    """Affinely stretch 1 - sigma so that the last sigma equals shift_terminal (diffusers `shift_terminal`).

    sigma' = 1 - (1 - sigma) / c,  c = (1 - sigma[-1]) / (1 - shift_terminal). Used by Qwen-Image(-Edit) (0.02).
    """
    s = np.asarray(sigmas, dtype=np.float32)
    one_minus = np.float32(1.0) - s
    scale = one_minus[-1] / np.float32(1.0 - shift_terminal)
    return (np.float32(1.0) - one_minus / scale).astype(np.float32)


def _finish(sigmas_n: np.ndarray, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    timesteps = (sigmas_n * np.float32(num_train_timesteps)).astype(np.float32)
    sigmas = np.concatenate([sigmas_n, np.zeros((1,), np.float32)]).astype(np.float32)
    return sigmas, timesteps


def _check_steps(num_steps: int) -> int:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"schedule: num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift_terminal: float | None = None,
    num_train_timesteps: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """FLUX / FLUX.1-Kontext sampling schedule (dynamic, resolution-dependent shift).

    sigmas_n = time_shift_exponential(mu, linspace(1, 1/n, n)) with mu = calculate_shift(image_seq_len, ...), then
    optionally stretched to `shift_terminal`; timesteps = 1000 * sigmas_n; a final sigma 0 is appended. This is
    exactly what `FluxKontextPipeline` gets from `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1,
    1/n, n), mu=mu)` with the FLUX scheduler config (the defaults here). Qwen-Image-Edit's scheduler is the same
    with max_seq_len=8192, max_shift=0.9, shift_terminal=0.02.

    The transformer takes timestep / 1000 (= sigma); flow_sde_step's `sigma_max` is sigmas[1].

    Returns: (sigmas [n + 1] float32, sigmas[0] = 1 and sigmas[n] = 0; timesteps [n] float32).
    """
    n = _check_steps(num_steps)
    base = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    sigmas_n = time_shift_exponential(mu, base)
    if shift_terminal:
        sigmas_n = stretch_to_terminal(sigmas_n, shift_terminal)
    return _finish(sigmas_n, num_train_timesteps)


def sd3_sigmas(num_steps: int, shift: float = 3.0, *, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """SD3-style static-shift schedule: sigmas_n = static_shift(linspace(1, 1/n, n), shift), then a final 0.

    Identical to DanceGRPO's `sd3_time_shift(shift, linspace(1, 0, n + 1))` and to diffusers'
    `set_timesteps(sigmas=linspace(1, 1/n, n))` on a scheduler with `shift=shift, use_dynamic_shifting=False`.
    (diffusers' StableDiffusion3Pipeline passes no sigmas and so starts from a slightly different linspace.)

    Returns: (sigmas [n + 1] float32, timesteps [n] float32 = 1000 * sigmas[:n]).
    """
    n = _check_steps(num_steps)
    base = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    return _finish(static_shift(base, shift), num_train_timesteps)
