"""FlowMatchEuler scheduler for FLUX (diffusers `FlowMatchEulerDiscreteScheduler` with dynamic shifting).

The sigma schedules live in `rl/flow_sde.py` (shared with the RL sampler); this module holds the scheduler config
(read from a diffusers `scheduler/scheduler_config.json`) and the Euler step.

    sigmas = time_shift(mu, linspace(1, 1/N, N)) ++ [0],   mu = calculate_shift(L_target),
    timesteps = 1000 * sigmas[:N] (the transformer receives timesteps / 1000),
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i            (float32, cast back to the latent dtype)
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from edit_r1_jax.rl import flow_sde


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerScheduler:
    """FLUX defaults (FLUX.1-dev / Kontext-dev `scheduler_config.json`)."""
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None

    @classmethod
    def from_config(cls, d: dict) -> "FlowMatchEulerScheduler":
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling") if d.get(k)]
        if unsupported:
            raise ValueError(f"scheduler_config.json: options {unsupported} are not supported")
        if d.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"scheduler_config.json: time_shift_type={d['time_shift_type']!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_pretrained(cls, path: str) -> "FlowMatchEulerScheduler":
        """A pipeline folder (reads scheduler/scheduler_config.json) or the scheduler folder itself."""
        for p in (os.path.join(path, "scheduler", "scheduler_config.json"),
                  os.path.join(path, "scheduler_config.json")):
            if os.path.isfile(p):
                with open(p) as f:
                    return cls.from_config(json.load(f))
        return cls()

    def mu(self, image_seq_len: int) -> float:
        return flow_sde.calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                                        self.base_shift, self.max_shift)

    def schedule(self, num_steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [N+1] float32 ending in 0, timesteps [N] float32 = 1000 sigmas[:N]).

        image_seq_len: packed *target* latent tokens (Kontext reference tokens do not count)."""
        if self.use_dynamic_shifting:
            return flow_sde.flux_sigmas(num_steps, image_seq_len, base_seq_len=self.base_image_seq_len,
                                        max_seq_len=self.max_image_seq_len, base_shift=self.base_shift,
                                        max_shift=self.max_shift, shift_terminal=self.shift_terminal,
                                        num_train_timesteps=self.num_train_timesteps)
        if self.shift_terminal:
            raise ValueError("FlowMatchEulerScheduler: shift_terminal without dynamic shifting is not supported")
        return flow_sde.sd3_sigmas(num_steps, self.shift, num_train_timesteps=self.num_train_timesteps)

    @staticmethod
    def step(velocity: jax.Array, sample: jax.Array, sigma, sigma_next) -> jax.Array:
        """Euler step in float32, returned in the sample's dtype (diffusers `step` with stochastic sampling off)."""
        return flow_sde.ode_step(sample, velocity, sigma, sigma_next).astype(sample.dtype)


def model_timestep(timesteps: np.ndarray) -> np.ndarray:
    """What the pipeline feeds the transformer: timesteps / 1000 in float32 (== sigma up to float32 rounding)."""
    return (np.asarray(timesteps, np.float32) / np.float32(1000)).astype(np.float32)


__all__ = ["FlowMatchEulerScheduler", "model_timestep"]
