"""RL and SFT losses as pure jax.numpy functions (spec: algorithms.md b1, b2, b3, b5 and decisions e).

All functions compute in float32 (inputs are cast), contain no Python control flow on array values (jit-able;
the string/option arguments are static), vmap over a leading extra axis, and are differentiable where a loss is.
Masks are {0, 1} arrays of any numeric/bool dtype. Masked-out positions are excluded with `where`, so whatever
they hold never reaches a loss value; keep them finite anyway, since a NaN there can still leak into gradients.

PyTorch / reference counterparts: `sft_loss` <-> standard causal-LM CE on assistant tokens; `clipped_surrogate`,
`kl_k3`, `aggregate` <-> TRL `GRPOTrainer._compute_loss` / Tunix `grpo_loss_fn` + `aggregate_loss`;
`group_advantages` <-> Flow-GRPO `PerPromptStatTracker.update` / TRL `scale_rewards`; `gcpo_rewards`,
`gcpo_advantages` <-> Edit-R1 eqs. 1-3; `flow_grpo_loss` <-> the per-timestep loss of Flow-GRPO
`scripts/train_flux_kontext.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "AGG_MODES",
    "token_log_probs",
    "sft_loss",
    "kl_k3",
    "aggregate",
    "clipped_surrogate",
    "group_advantages",
    "gcpo_rewards",
    "gcpo_advantages",
    "flow_grpo_loss",
]

AGG_MODES = ("seq_mean_tok_mean", "token_mean", "dr_grpo", "dapo")
LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| is clamped to this before exp (Tunix), so ratios never overflow


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _require_shape(x: jax.Array, shape: tuple, fn: str, name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: `{name}` must have shape {tuple(shape)}, got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Token log-probs and SFT
# ----------------------------------------------------------------------------------------------------------------
def token_log_probs(logits, targets, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[target] per position, in float32.

    logits [B, T, V] (any float dtype), targets [B, T] int -> [B, T] float32. Computed as gathered logit minus
    logsumexp, so no [B, T, V] log-softmax is kept beyond the reduction.
    """
    z_btv = _f32(logits) / temperature
    targets = jnp.asarray(targets)  # ids outside [0, V) give NaN (JAX gather fill); mask them before calling
    _require_shape(targets, z_btv.shape[:-1], "token_log_probs", "targets")
    picked_bt = jnp.take_along_axis(z_btv, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_bt - jax.nn.logsumexp(z_btv, axis=-1)


def sft_loss(logits, tokens, loss_mask) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy on the loss mask, token-mean over the batch (algorithms.md b1).

        L = - sum_{b,t: m_{b,t+1}=1} log p(tokens[b, t+1] | tokens[b, :t+1]) / max(sum m, 1)

    Args:
      logits: [B, T, V] from the forward pass on all of `tokens` (position t predicts token t+1; the last position
        is dropped), or [B, T-1, V] already aligned with tokens[:, 1:].
      tokens: [B, T] int token ids. Ids at masked-out positions are never gathered (e.g. -100 or pad is fine).
      loss_mask: [B, T], 1 on tokens that are targets (assistant tokens), aligned with `tokens`.
    Returns:
      (loss scalar float32, number of target tokens float32). The loss is 0 when the mask is empty.
    """
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    _require_shape(jnp.asarray(loss_mask), (b, t), "sft_loss", "loss_mask")
    if logits.ndim != 3 or logits.shape[0] != b or logits.shape[1] not in (t, t - 1):
        raise ValueError(f"sft_loss: `logits` must have shape ({b}, {t} or {t - 1}, V), got {tuple(logits.shape)}")
    logits_btv = logits[:, : t - 1] if logits.shape[1] == t else logits
    m_bt = _f32(loss_mask)[:, 1:]
    on_bt = m_bt > 0
    lp_bt = token_log_probs(logits_btv, jnp.where(on_bt, tokens[:, 1:], 0))
    count = m_bt.sum()
    return -jnp.where(on_bt, lp_bt * m_bt, 0.0).sum() / jnp.maximum(count, 1.0), count


# ----------------------------------------------------------------------------------------------------------------
# Text GRPO / GCPO
# ----------------------------------------------------------------------------------------------------------------
def kl_k3(logp, logp_ref) -> jax.Array:
    """Per-token k3 ("low_var_kl") estimator of KL(pi || pi_ref) for tokens sampled from pi.

        d = logp_ref - logp,   k3 = exp(d) - d - 1  (>= 0, 0 iff logp == logp_ref)

    Computed as expm1(d) - d (no cancellation for small d) and floored at 0 against rounding. Same shape as inputs.
    """
    d = _f32(logp_ref) - _f32(logp)
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def aggregate(values, mask, agg: str = "seq_mean_tok_mean", max_len: int | None = None, num_tokens=None):
    """Reduce per-token values [B, T] with mask M [B, T] to a scalar (algorithms.md b5, length normalisation).

      "seq_mean_tok_mean": (1/B) sum_i (sum_t M v) / max(sum_t M, 1)     (GRPO, GCPO; TRL "grpo")
      "token_mean":        sum_{i,t} M v / max(sum_{i,t} M, 1)          (TRL "bnpo")
      "dr_grpo":           sum_{i,t} M v / (B * max_len)                (Dr.GRPO); max_len defaults to T
      "dapo":              sum_{i,t} M v / num_tokens                   (token-mean over the global batch, e.g.
                           across gradient-accumulation steps); num_tokens defaults to max(sum M, 1)
    """
    m = _f32(mask)
    v = _f32(values)
    _require_shape(m, v.shape, "aggregate", "mask")
    v = jnp.where(m > 0, v, 0.0)
    if agg == "seq_mean_tok_mean":
        return jnp.mean((v * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0))
    if agg == "token_mean":
        return (v * m).sum() / jnp.maximum(m.sum(), 1.0)
    if agg == "dr_grpo":
        length = v.shape[-1] if max_len is None else max_len
        return (v * m).sum() / (v.shape[0] * length)
    if agg == "dapo":
        denom = jnp.maximum(m.sum(), 1.0) if num_tokens is None else _f32(num_tokens)
        return (v * m).sum() / denom
    raise ValueError(f"aggregate: agg must be one of {AGG_MODES}, got {agg!r}")


def _masked_stats(x: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked mean, min, max; each is 1.0 (the neutral ratio) when the mask is empty."""
    n = m.sum()
    has = n > 0
    on = m > 0
    mean = jnp.where(has, jnp.where(on, x * m, 0.0).sum() / jnp.maximum(n, 1.0), 1.0)
    lo = jnp.where(has, jnp.min(jnp.where(on, x, jnp.inf)), 1.0)
    hi = jnp.where(has, jnp.max(jnp.where(on, x, -jnp.inf)), 1.0)
    return mean, lo, hi


def clipped_surrogate(
    logp,
    logp_old,
    advantages,
    mask,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "seq_mean_tok_mean",
    max_len: int | None = None,
    *,
    logp_ref=None,
    beta: float = 0.0,
    num_tokens=None,
):
    """Token-level PPO clipped surrogate (GRPO / GCPO), optionally with a k3 KL penalty (algorithms.md b2, b5).

        rho_{i,t} = exp(clamp(logp - logp_old, -20, 20))
        l_{i,t}   = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)  [+ beta * k3(logp, logp_ref)]
        loss      = aggregate(l, mask, agg, max_len)

    Where the clipped branch is active (A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low) the token's
    gradient is exactly 0. GCPO uses the defaults (eps 0.2, seq_mean_tok_mean, beta 0).

    Args:
      logp, logp_old: [B, T] per-token log-probs of the sampled tokens under the current / behaviour policy
        (logp_old carries no gradient; pass stop_gradient(logp) for on-policy single-step updates).
      advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
      mask: [B, T] completion mask.
      eps_low, eps_high: clip range (DAPO "clip-higher" uses eps_high > eps_low).
      agg: "seq_mean_tok_mean" | "token_mean" | "dr_grpo" | "dapo" (see `aggregate`).
      max_len: L_max for "dr_grpo" (default: the padded length T).
      logp_ref, beta: k3 penalty towards a reference policy; beta is a static Python number, and logp_ref is
        needed when beta != 0.
      num_tokens: global token count for "dapo".

    Returns:
      (loss scalar, metrics dict of scalars): "policy_loss" (the aggregated clipped term alone), "clip_frac"
      (fraction of masked tokens where the clipped branch is active), "ratio_mean" / "ratio_min" / "ratio_max"
      (over masked tokens; 1.0 for an empty mask), "approx_kl" (token-mean k3 between logp_old and logp, i.e.
      exp(logp - logp_old) - (logp - logp_old) - 1), and "kl" (token-mean k3 to the reference) when beta != 0.
    """
    lp = _f32(logp)
    lp_old = _f32(logp_old)
    m = _f32(mask)
    _require_shape(lp_old, lp.shape, "clipped_surrogate", "logp_old")
    _require_shape(m, lp.shape, "clipped_surrogate", "mask")
    adv = _f32(advantages)
    if adv.shape == lp.shape[:1]:
        adv = adv[:, None]
    elif adv.shape != lp.shape:
        raise ValueError(
            f"clipped_surrogate: `advantages` must have shape {tuple(lp.shape[:1])} or {tuple(lp.shape)}, "
            f"got {tuple(adv.shape)}"
        )
    log_ratio = jnp.clip(lp - lp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_tok = -jnp.minimum(ratio * adv, clipped * adv)
    policy_loss = aggregate(per_tok, m, agg, max_len, num_tokens)
    loss = policy_loss
    metrics = {"policy_loss": policy_loss}
    if beta:
        if logp_ref is None:
            raise ValueError("clipped_surrogate: beta != 0 needs `logp_ref`")
        kl_tok = kl_k3(lp, logp_ref)
        _require_shape(kl_tok, lp.shape, "clipped_surrogate", "logp_ref")
        loss = aggregate(per_tok + beta * kl_tok, m, agg, max_len, num_tokens)
        metrics["kl"] = aggregate(kl_tok, m, "token_mean")

    sg = jax.lax.stop_gradient
    is_clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    metrics["clip_frac"] = aggregate(sg(is_clipped.astype(jnp.float32)), m, "token_mean")
    metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"] = _masked_stats(sg(ratio), m)
    metrics["approx_kl"] = aggregate(sg(jnp.expm1(log_ratio) - log_ratio), m, "token_mean")
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(rewards, group_ids, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, *, ddof=0):
    """Group-relative advantages (GRPO; Flow-GRPO `PerPromptStatTracker`, algorithms.md b3 / b5).

        A_i = (r_i - mean_{g(i)} r) / (s + eps),  then clipped to [-clip, clip]
        s = std of r over i's group (std="group"), over the whole batch (std="global"), or no division
        (std="none", Dr.GRPO: A_i = r_i - mean_{g(i)} r).
    A sample whose group has zero variance (all rewards equal, including singleton groups) gets exactly 0.

    Args:
      rewards: [B] float.
      group_ids: [B] integers (any values, e.g. hashes of prompt + image); samples with equal ids form a group.
        Groups are found by pairwise comparison ([B, B]), so this works under jit without knowing the groups.
      std: "group" | "global" | "none".
      eps: added to the std (Flow-GRPO 1e-4; TRL 1e-4).
      clip: symmetric clip of A (Flow-GRPO `adv_clip_max` 5); None for no clip.
      ddof: 0 = population std (Flow-GRPO's np.std, the default); 1 = Bessel-corrected (TRL, Tunix, DanceGRPO).
    Returns:
      A [B] float32.
    """
    if std not in ("group", "global", "none"):
        raise ValueError(f"group_advantages: std must be 'group', 'global' or 'none', got {std!r}")
    r = _f32(rewards)
    g = jnp.asarray(group_ids)
    if r.ndim != 1:
        raise ValueError(f"group_advantages: `rewards` must have shape [B], got {tuple(r.shape)}")
    _require_shape(g, r.shape, "group_advantages", "group_ids")
    same_bb = g[:, None] == g[None, :]
    same_f = same_bb.astype(jnp.float32)
    count_b = same_f.sum(-1)
    mean_b = (same_f * r[None, :]).sum(-1) / count_b
    centered_b = r - mean_b
    constant_b = jnp.all(jnp.where(same_bb, r[None, :] == r[:, None], True), axis=-1)
    if std == "group":
        sq_dev = same_f * (r[None, :] - mean_b[:, None]) ** 2
        sd = jnp.sqrt(sq_dev.sum(-1) / jnp.maximum(count_b - ddof, 1.0))
        adv = centered_b / (sd + eps)
    elif std == "global":
        sd = jnp.sqrt(((r - r.mean()) ** 2).sum() / max(r.shape[0] - ddof, 1))
        adv = centered_b / (sd + eps)
    else:
        adv = centered_b
    adv = jnp.where(constant_b, 0.0, adv)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv


def gcpo_rewards(scores_w, scores_l, divide_by_non_tied: bool = False) -> tuple[jax.Array, jax.Array]:
    """GCPO cross-group win / loss ratios (Edit-R1 eqs. 1-2; algorithms.md b2, decisions e1, e2, e6).

        r^w_j = (1/N) sum_k 1{tau^w_j > tau^l_k}   (how often preferred trace j beats the rejected traces)
        r^l_j = (1/N) sum_k 1{tau^l_j < tau^w_k}   (how often rejected trace j is below the preferred traces)

    Strict inequalities: ties count as non-wins and keep the denominator N. NaN scores (parse failures) compare
    False, so a comparison involving NaN is neither a win nor a loss for either side (a NaN trace gets reward 0).
    Both groups then have the same mean reward: the fraction of correctly ordered (w, l) trace pairs.

    divide_by_non_tied=True is the alternative reading of "ignoring ties": each trace's count is divided by the
    number of its decisive comparisons (neither tied nor NaN), and 0 when there are none. The equal-mean property
    does not hold then.

    Args: scores_w, scores_l: [..., N] parsed scores of the N traces for the preferred / rejected image (e.g.
      [P, N] for P pairs). Returns: (r_w, r_l), each [..., N] float32.
    """
    w = _f32(scores_w)
    l = _f32(scores_l)
    _require_shape(l, w.shape, "gcpo_rewards", "scores_l")
    win_nn = (w[..., :, None] > l[..., None, :]).astype(jnp.float32)  # [..., j (preferred), k (rejected)]
    if not divide_by_non_tied:
        n = w.shape[-1]
        return win_nn.sum(-1) / n, win_nn.sum(-2) / n
    decisive_nn = (win_nn > 0) | (w[..., :, None] < l[..., None, :])
    decisive_nn = decisive_nn.astype(jnp.float32)
    r_w = win_nn.sum(-1) / jnp.maximum(decisive_nn.sum(-1), 1.0)
    r_l = win_nn.sum(-2) / jnp.maximum(decisive_nn.sum(-2), 1.0)
    return r_w, r_l


def _center_last(r: jax.Array, std_norm: bool, eps: float) -> jax.Array:
    centered = r - r.mean(-1, keepdims=True)
    constant = jnp.all(r == r[..., :1], axis=-1, keepdims=True)
    if std_norm:
        centered = centered / (r.std(-1, keepdims=True) + eps)
    return jnp.where(constant, 0.0, centered)


def gcpo_advantages(r_w, r_l, std_norm: bool = False, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """GCPO intra-group advantages (Edit-R1 eq. 3; decision e3: mean-centring, std division off by default).

        A^w_j = r^w_j - mean_j r^w,  A^l_j = r^l_j - mean_j r^l    (each group along the last axis separately)
        std_norm=True: each divided by (population std of its group + eps). Constant groups give exactly 0.

    Args: r_w, r_l [..., N] from `gcpo_rewards`. Returns: (A_w, A_l), each [..., N] float32; concatenate them
    along the last axis for the 2N traces of a pair.
    """
    r_w = _f32(r_w)
    r_l = _f32(r_l)
    _require_shape(r_l, r_w.shape, "gcpo_advantages", "r_l")
    return _center_last(r_w, std_norm, eps), _center_last(r_l, std_norm, eps)


# ----------------------------------------------------------------------------------------------------------------
# Flow-GRPO
# ----------------------------------------------------------------------------------------------------------------
def flow_grpo_loss(
    log_prob,
    log_prob_old,
    advantages,
    mean=None,
    mean_ref=None,
    std=None,
    *,
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
    beta: float = 0.04,
    mask=None,
):
    """Flow-GRPO loss for one trained denoising step (algorithms.md b3; decisions e11, e12).

        A      = clip(advantages, -adv_clip, adv_clip)
        rho    = exp(clamp(log_prob - log_prob_old, -20, 20))       (per-step mean log-probs from flow_sde_step)
        L_pg   = mean_b max(-A rho, -A clip(rho, 1 - clip_range, 1 + clip_range))
        L_KL   = mean_b [ mean_elements (mean - mean_ref)^2 / (2 std^2) ]   (Flow-GRPO's code form: no 1/|dt|)
        L      = L_pg + beta * L_KL

    `std` is flow_sde_step's s_t (before sqrt(-dt)). A sample whose std is 0 (a noise-free step) contributes 0 KL.
    The ±20 log-ratio clamp (not in Flow-GRPO) only matters where the ratio is far outside the clip range.

    Args:
      log_prob, log_prob_old: [B] float (old = stored at rollout time, no gradient).
      advantages: [B].
      mean, mean_ref: [B, ...] step means under the policy and the reference (needed when beta != 0).
      std: [B] or scalar, needed when beta != 0.
      clip_range: PPO clip (Flow-GRPO 1e-4). adv_clip: None for no clip.
      beta: KL coefficient (a static Python number; 0.04 is the Edit-R1 value, decision table d).
      mask: optional [B] sample weights in {0, 1} (e.g. drop zero-advantage samples); means become masked means.
    Returns:
      (loss scalar, metrics): "policy_loss", "kl" (0 if beta == 0 and no means given), "clip_frac" (fraction of
      samples with |rho - 1| > clip_range), "ratio_mean", "ratio_min", "ratio_max", "approx_kl"
      (0.5 * mean (log_prob - log_prob_old)^2, as Flow-GRPO logs it).
    """
    lp = _f32(log_prob)
    lp_old = _f32(log_prob_old)
    if lp.ndim != 1:
        raise ValueError(f"flow_grpo_loss: `log_prob` must have shape [B], got {tuple(lp.shape)}")
    _require_shape(lp_old, lp.shape, "flow_grpo_loss", "log_prob_old")
    adv = _f32(advantages)
    _require_shape(adv, lp.shape, "flow_grpo_loss", "advantages")
    m = jnp.ones_like(lp) if mask is None else _f32(mask)
    _require_shape(m, lp.shape, "flow_grpo_loss", "mask")
    denom = jnp.maximum(m.sum(), 1.0)

    def masked_mean(x_b):
        return jnp.where(m > 0, x_b * m, 0.0).sum() / denom

    if adv_clip is not None:
        adv = jnp.clip(adv, -adv_clip, adv_clip)
    log_ratio = jnp.clip(lp - lp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    per_sample = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range))
    policy_loss = masked_mean(per_sample)

    kl = jnp.zeros((), jnp.float32)
    if beta or (mean is not None and mean_ref is not None and std is not None):
        if mean is None or mean_ref is None or std is None:
            raise ValueError("flow_grpo_loss: beta != 0 needs `mean`, `mean_ref` and `std`")
        mu = _f32(mean)
        mu_ref = _f32(mean_ref)
        _require_shape(mu_ref, mu.shape, "flow_grpo_loss", "mean_ref")
        if mu.shape[:1] != lp.shape:
            raise ValueError(f"flow_grpo_loss: `mean` must have batch {lp.shape[0]}, got shape {tuple(mu.shape)}")
        s = jnp.broadcast_to(_f32(std), lp.shape)
        sq_b = jnp.mean((mu - mu_ref) ** 2, axis=tuple(range(1, mu.ndim)))
        noisy = s > 0
        kl_b = jnp.where(noisy, sq_b / (2.0 * jnp.where(noisy, s, 1.0) ** 2), 0.0)
        kl = masked_mean(kl_b)
    loss = policy_loss + beta * kl

    sg = jax.lax.stop_gradient
    ratio_sg = sg(ratio)
    metrics = {"policy_loss": policy_loss, "kl": kl}
    metrics["clip_frac"] = masked_mean((jnp.abs(ratio_sg - 1.0) > clip_range).astype(jnp.float32))
    metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"] = _masked_stats(ratio_sg, m)
    metrics["approx_kl"] = 0.5 * masked_mean(sg(lp - lp_old) ** 2)
    return loss, metrics
