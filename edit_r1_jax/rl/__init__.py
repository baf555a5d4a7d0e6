"""RL kernels: SFT / GCPO / GRPO / Flow-GRPO losses and the flow-matching SDE sampler (pure jax.numpy, fp32).

Public API (stable): `flow_sde_step`, `group_advantages`, `gcpo_rewards`, `clipped_surrogate`, `kl_k3`; the rest
is re-exported for the trainers and the FLUX pipeline (schedules).
"""
from edit_r1_jax.rl.flow_sde import (
    SDE_TYPES,
    calculate_shift,
    flow_sde_step,
    flux_sigmas,
    ode_step,
    sd3_sigmas,
    static_shift,
    stretch_to_terminal,
    time_shift_exponential,
)
from edit_r1_jax.rl.losses import (
    AGG_MODES,
    aggregate,
    clipped_surrogate,
    flow_grpo_loss,
    gcpo_advantages,
    gcpo_rewards,
    group_advantages,
    kl_k3,
    sft_loss,
    token_log_probs,
)

__all__ = [
    "AGG_MODES",
    "SDE_TYPES",
    "aggregate",
    "calculate_shift",
    "clipped_surrogate",
    "flow_grpo_loss",
    "flow_sde_step",
    "flux_sigmas",
    "gcpo_advantages",
    "gcpo_rewards",
    "group_advantages",
    "kl_k3",
    "ode_step",
    "sd3_sigmas",
    "sft_loss",
    "static_shift",
    "stretch_to_terminal",
    "time_shift_exponential",
    "token_log_probs",
]
