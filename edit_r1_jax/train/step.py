"""A generic jitted, sharded train step: value_and_grad of a user loss, microbatch accumulation, NaN guard.

The user supplies ``loss_fn(params, batch, rng) -> (loss, aux)``: ``loss`` a float32 scalar, ``aux`` a dict of
scalars (logged as their mean over microbatches). If ``aux`` has the key ``"loss_weight"`` (e.g. the number of
target tokens in the microbatch) microbatches are combined as a weighted mean,

    L = sum_j w_j * L_j / sum_j w_j,      g = sum_j w_j * grad L_j / sum_j w_j,

so a token-mean loss accumulated over k microbatches equals the token-mean over the whole batch; without it every
microbatch has weight 1 (exact for per-example-mean losses with equal microbatches).

The step (PyTorch counterpart: ``loss.backward()`` per microbatch, ``clip_grad_norm_``, ``optimizer.step()``,
with the update skipped when ``torch.isfinite`` fails):
  1. split the batch into ``grad_accum_steps`` microbatches (rows j, j+k, j+2k, ... so each microbatch stays spread
     over all data-parallel devices) and ``lax.scan`` over them, summing weighted loss and grads in float32;
  2. NaN guard: if the loss or the (trainable) gradient norm is not finite, params and optimizer state are kept,
     ``skipped_nonfinite`` and ``consecutive_nonfinite`` go up; a finite step resets ``consecutive_nonfinite``;
  3. otherwise ``tx.update`` (clip + AdamW) and ``apply_updates``.
``step`` always advances (it counts batches consumed, so data and RNG stay aligned on resume).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel
from edit_r1_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]
WEIGHT_KEY = "loss_weight"


class NonFiniteError(RuntimeError):
    """Raised by ``check_nonfinite`` after too many non-finite steps in a row."""


def _split_microbatches(batch: Any, k: int) -> Any:
    """(B, ...) -> (k, B/k, ...) with microbatch j = rows j, j+k, ... (strided, keeps data-parallel spread)."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"grad_accum_steps={k} does not divide the batch dimension {x.shape[0]} of a batch "
                             f"leaf with shape {tuple(x.shape)}")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _masked(tree: Any, mask: Any) -> Any:
    if mask is None:
        return tree
    return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), tree, mask)


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: Any, rng: jax.Array, grad_accum_steps: int = 1,
                         microbatch_sharding: Any = None) -> tuple[jax.Array, Any, dict]:
    """Weighted-mean loss, grads (float32) and aux over ``grad_accum_steps`` microbatches (see module docstring)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def weight_of(aux):
        return jnp.asarray(aux.get(WEIGHT_KEY, 1.0), jnp.float32) if isinstance(aux, dict) else jnp.float32(1.0)

    if grad_accum_steps == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        aux = dict(aux) if isinstance(aux, dict) else {}
        aux.pop(WEIGHT_KEY, None)
        return loss.astype(jnp.float32), grads, aux

    micro = _split_microbatches(batch, grad_accum_steps)
    abstract = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    (_, aux_shape), _ = abstract
    aux_keys = sorted(k for k in (aux_shape if isinstance(aux_shape, dict) else {}) if k != WEIGHT_KEY)

    def body(carry, xs):
        loss_sum, w_sum, g_sum, aux_sum = carry
        mb, j = xs
        if microbatch_sharding is not None:
            mb = jax.lax.with_sharding_constraint(mb, microbatch_sharding)
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, j))
        w = weight_of(aux)
        g_sum = jax.tree.map(lambda s, g: s + w * g.astype(jnp.float32), g_sum, grads)
        aux_sum = {k: aux_sum[k] + jnp.asarray(aux[k], jnp.float32) for k in aux_keys}
        return (loss_sum + w * loss.astype(jnp.float32), w_sum + w, g_sum, aux_sum), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros_aux = {k: jnp.zeros(jnp.shape(aux_shape[k]), jnp.float32) for k in aux_keys}
    init = (jnp.float32(0.0), jnp.float32(0.0), zeros_g, zeros_aux)
    (loss_sum, w_sum, g_sum, aux_sum), _ = jax.lax.scan(body, init,
                                                        (micro, jnp.arange(grad_accum_steps, dtype=jnp.int32)))
    denom = jnp.maximum(w_sum, 1e-12)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    aux = {k: v / grad_accum_steps for k, v in aux_sum.items()}
    return loss_sum / denom, grads, aux


def train_step(state: TrainState, batch: Any, *, loss_fn: LossFn, grad_accum_steps: int = 1,
               trainable_mask: Any = None, lr_schedule: optax.Schedule | None = None,
               microbatch_sharding: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step (un-jitted; ``make_train_step`` wraps it). Returns (new_state, metrics)."""
    rng = state.step_rng()
    if callable(trainable_mask):
        trainable_mask = trainable_mask(state.params)
    loss, grads, aux = accumulate_gradients(loss_fn, state.params, batch, rng, grad_accum_steps,
                                            microbatch_sharding)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(_masked(grads, trainable_mask))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Non-finite grads never reach the optimizer (avoids NaN-poisoned moments even in the discarded branch).
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt = state.tx.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    params = _select(finite, new_params, state.params)
    opt_state = _select(finite, new_opt, state.opt_state)
    skipped = state.skipped_nonfinite + jnp.where(finite, 0, 1).astype(jnp.int32)
    consecutive = jnp.where(finite, 0, state.consecutive_nonfinite + 1).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_nonfinite=skipped,
                              consecutive_nonfinite=consecutive)
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": optax.global_norm(_masked(updates,
                                                                                            trainable_mask)),
               "finite": finite.astype(jnp.int32), "skipped_nonfinite": skipped,
               "consecutive_nonfinite": consecutive}
    if lr_schedule is not None:
        metrics["lr"] = jnp.asarray(lr_schedule(optimizer_count(state.opt_state, state.step)), jnp.float32)
    for k, v in aux.items():
        metrics[k] = jnp.mean(v)
    return new_state, metrics


def optimizer_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The optimizer's own step count (first ``count`` field found; it does not advance on skipped steps)."""
    found = []

    def visit(path, x):
        if not found and path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count":
            found.append(x)
        return x
    jax.tree_util.tree_map_with_path(visit, opt_state)
    return found[0] if found else default


def make_train_step(loss_fn: LossFn, *, state_shardings: TrainState | None = None, mesh: Mesh | None = None,
                    grad_accum_steps: int = 1, trainable_mask: Any = None,
                    lr_schedule: optax.Schedule | None = None, donate: bool = True) -> Callable:
    """``jax.jit``-ed ``step(state, batch) -> (state, metrics)``.

    With ``mesh`` and ``state_shardings`` (from ``state.state_shardings`` / ``create_sharded_state``) the state keeps
    its shardings in and out, every batch leaf is split on its leading dim over ('data','fsdp'), metrics are
    replicated, and the input state is donated (``donate=True``: do not reuse the passed-in state afterwards).
    Without a mesh the step runs wherever its inputs live (the unsharded reference).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps}: must be >= 1")
    micro_sh = None
    if mesh is not None:
        micro_sh = NamedSharding(mesh, P(parallel.BATCH_AXES))

    def fn(state, batch):
        return train_step(state, batch, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps,
                          trainable_mask=trainable_mask, lr_schedule=lr_schedule, microbatch_sharding=micro_sh)

    donate_argnums = (0,) if donate else ()
    if mesh is None or state_shardings is None:
        jitted = jax.jit(fn, donate_argnums=donate_argnums)
        jitted.jitted = jitted
        return jitted
    batch_sh = NamedSharding(mesh, P(parallel.BATCH_AXES))   # prefix: applies to every leaf's leading dim
    repl = NamedSharding(mesh, P())
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                     donate_argnums=donate_argnums)

    def step(state, batch):
        with mesh:
            return jitted(state, batch)
    step.jitted = jitted  # for .lower(...) / cost analysis
    return step


def check_nonfinite(metrics: dict, max_consecutive: int, step: int | None = None) -> None:
    """Raise ``NonFiniteError`` once ``consecutive_nonfinite`` reaches ``max_consecutive`` (<= 0 disables).

    The state returned by that step still holds the last good params (skipped steps never update), so the caller
    can save it before stopping."""
    if max_consecutive <= 0:
        return
    n = int(jax.device_get(metrics["consecutive_nonfinite"]))
    if n >= max_consecutive:
        total = int(jax.device_get(metrics["skipped_nonfinite"]))
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteError(
            f"{n} consecutive train steps had a non-finite loss or gradient{where} ({total} skipped in total; "
            f"last loss={float(jax.device_get(metrics['loss']))}, grad_norm="
            f"{float(jax.device_get(metrics['grad_norm']))}). Stopping; params are those of the last finite step. "
            f"Fixes: lower train.lr, check the data for empty targets, or raise train.max_consecutive_nonfinite.")
