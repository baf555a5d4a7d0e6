"""Train state, optimizer factory, trainable masks, dtype policy and state shardings.

``TrainState`` is a plain pytree (``flax.struct.dataclass``) so that ``jax.jit``, Orbax and the sharding helpers see
every array leaf:

  step                   int32 scalar, number of train-step calls (skipped non-finite steps count too)
  params                 the model's parameter pytree (plain nested dicts, unboxed)
  opt_state              the optax state; every leaf shaped like a param lives where that param lives
  rng                    uint32[2] raw PRNG key (``jax.random.PRNGKey``); the step's key is ``fold_in(rng, step)``,
                         so a resumed run draws the same randomness as an uninterrupted one
  skipped_nonfinite      int32, total updates skipped because the loss or the gradient was not finite
  consecutive_nonfinite  int32, skipped updates in a row (reset by a good step)
  tx                     the optax GradientTransformation (static, not a leaf)

The optimizer is AdamW behind a global-norm gradient clip, with linear warmup then cosine decay (PyTorch
counterpart: ``torch.optim.AdamW`` + ``clip_grad_norm_`` + ``get_cosine_schedule_with_warmup``). Frozen leaves
(``trainable_mask`` False: a frozen vision tower, the base weights under LoRA) go through ``optax.set_to_zero`` and
carry no optimizer state; the clip norm is computed over trainable gradients only.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel

TRAIN = "trainable"
FROZEN = "frozen"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_nonfinite: jax.Array
    consecutive_nonfinite: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """Fresh state: step 0, ``tx.init(params)``, counters 0. ``rng`` is a raw uint32[2] key."""
        rng = jnp.asarray(rng)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        if rng.shape != (2,) or rng.dtype != jnp.uint32:
            raise ValueError(f"TrainState.create: rng must be a raw key uint32[2] (jax.random.PRNGKey), "
                             f"got {rng.dtype}{list(rng.shape)}")
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=tx.init(params), rng=rng, skipped_nonfinite=zero,
                   consecutive_nonfinite=zero, tx=tx)

    def step_rng(self) -> jax.Array:
        """This step's key: ``fold_in(rng, step)`` (typed key)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


# ----------------------------------------------------------------------------------------------------------------
# config access that works for ml_collections.ConfigDict, plain dicts and objects

def cfg_get(cfg: Any, key: str, default: Any) -> Any:
    """``cfg[key]`` for ConfigDicts, dicts and objects; ``default`` when missing or None."""
    if cfg is None:
        return default
    if isinstance(cfg, dict) or hasattr(cfg, "get"):
        try:
            val = cfg.get(key, default)
        except (KeyError, AttributeError):
            val = default
        return default if val is None else val
    return getattr(cfg, key, default)


_cfg_get = cfg_get


# ----------------------------------------------------------------------------------------------------------------
# optimizer

def make_lr_schedule(train_cfg: Any) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``steps``.

    lr(t) = lr * t / W                                                     for t < W
    lr(t) = lr * (r + (1 - r) * 0.5 * (1 + cos(pi * (t - W) / (S - W))))   for W <= t <= S   (r = min_lr_ratio)
    ``schedule: "constant"`` keeps ``lr`` after the warmup.
    """
    lr = float(_cfg_get(train_cfg, "lr", 1e-5))
    warmup = int(_cfg_get(train_cfg, "warmup_steps", 0))
    steps = int(_cfg_get(train_cfg, "steps", 1))
    kind = str(_cfg_get(train_cfg, "schedule", "cosine"))
    ratio = float(_cfg_get(train_cfg, "min_lr_ratio", 0.0))
    if kind == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if kind != "cosine":
        raise ValueError(f"train.schedule={kind!r}: expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=max(warmup, 0),
                                              decay_steps=max(steps, warmup + 1), end_value=lr * ratio)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices / kernels only (ndim >= 2); biases, norms and scalars are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: Any, trainable_mask: Any = None) -> optax.GradientTransformation:
    """AdamW + global-norm clip + warmup/cosine schedule, from ``train_cfg`` fields.

    Fields (defaults): lr (1e-5), warmup_steps (0), steps (1), schedule ('cosine'), min_lr_ratio (0.0),
    weight_decay (0.0), b1 (0.9), b2 (0.999), eps (1e-8), grad_clip (1.0; <= 0 disables),
    decay_matrices_only (True: no decay on biases / norm scales).

    ``trainable_mask``: pytree of bools matching params (True = trained), or a callable params -> such a tree.
    Frozen leaves get ``set_to_zero`` updates and no Adam moments.
    """
    schedule = make_lr_schedule(train_cfg)
    wd = float(_cfg_get(train_cfg, "weight_decay", 0.0))
    clip = float(_cfg_get(train_cfg, "grad_clip", 1.0))
    decay_only_matrices = bool(_cfg_get(train_cfg, "decay_matrices_only", True))
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=float(_cfg_get(train_cfg, "b1", 0.9)),
                             b2=float(_cfg_get(train_cfg, "b2", 0.999)), eps=float(_cfg_get(train_cfg, "eps", 1e-8)),
                             weight_decay=wd, mask=_decay_mask if decay_only_matrices else None))
    tx = optax.chain(*parts)
    if trainable_mask is None:
        return tx

    def labels(params):
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        try:
            return jax.tree.map(lambda m, _: TRAIN if bool(m) else FROZEN, mask, params)
        except ValueError as e:
            raise ValueError(f"make_optimizer: trainable_mask does not match the params tree structure: {e}") from e

    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        else:
            parts.append(str(k))
    return "/".join(parts)


def mask_from_regex(params: Any, patterns: Iterable[str]) -> Any:
    """Bool tree: True where the leaf's '/'-joined path (e.g. ``vision/blocks_0/attn/qkv/kernel``) matches any
    pattern (``re.search``). Typical use: ``frozen = mask_from_regex(params, [r"^vision/"])`` and
    ``trainable = jax.tree.map(lambda f: not f, frozen)``."""
    regs = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda path, _: any(r.search(_path_str(path)) for r in regs), params)


def count_params(params: Any, mask: Any = None) -> int:
    leaves = jax.tree.leaves(params)
    if mask is None:
        return int(sum(np.prod(x.shape) for x in leaves))
    return int(sum(np.prod(x.shape) for x, m in zip(leaves, jax.tree.leaves(mask)) if m))


# ----------------------------------------------------------------------------------------------------------------
# dtype policy

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def _dtype(name: Any, what: str) -> Any:
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"dtype.{what}={name!r}: expected one of {sorted(_DTYPES)} or 'auto'")
    return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """Where each dtype is used. Logits and log-probs are always float32 (losses, ratios, KL)."""
    param_dtype: Any = jnp.float32     # stored params and optimizer moments
    compute_dtype: Any = jnp.float32   # activations / matmul inputs inside the model
    logits_dtype: Any = jnp.float32    # fixed: logits, log-probs, losses

    @classmethod
    def from_config(cls, cfg: Any, platform: str | None = None) -> "DTypePolicy":
        """``cfg.dtype.param`` / ``cfg.dtype.compute``: 'float32' | 'bfloat16' | 'auto' (bf16 on TPU, fp32
        elsewhere). Missing fields mean 'float32' params and 'auto' compute."""
        dcfg = _cfg_get(cfg, "dtype", None)
        platform = platform or jax.default_backend()
        param = _cfg_get(dcfg, "param", "float32")
        compute = _cfg_get(dcfg, "compute", "auto")
        if compute == "auto":
            compute = "bfloat16" if platform == "tpu" else "float32"
        if param == "auto":
            param = "float32"
        return cls(param_dtype=_dtype(param, "param"), compute_dtype=_dtype(compute, "compute"))

    def cast_for_compute(self, tree: Any) -> Any:
        """Floating leaves -> compute dtype (integer leaves untouched)."""
        return jax.tree.map(lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            tree)

    def cast_params(self, params: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(self.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            params)


# ----------------------------------------------------------------------------------------------------------------
# shardings

def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract_state: TrainState, param_logical_axes: Any, mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] | None = None) -> TrainState:
    """NamedSharding for every leaf of a TrainState (an abstract one from ``jax.eval_shape`` is enough).

    params: their logical axes through ``rules`` (``parallel.logical_shardings``; axes that do not divide a dim are
    dropped). opt_state: a leaf whose key path ends with a param's key path and has its shape (Adam ``mu``/``nu``,
    masked or not) takes that param's sharding; otherwise a leaf with a param's shape takes it when all params of
    that shape agree; everything else (counts, scalars) is replicated. step / rng / counters are replicated.
    """
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    p_shard = parallel.logical_shardings(param_logical_axes, mesh, rules, shapes=abstract_state.params)
    p_leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_state.params)
    s_leaves = jax.tree.leaves(p_shard)
    if len(p_leaves) != len(s_leaves):
        raise ValueError(f"state_shardings: param_logical_axes has {len(s_leaves)} leaves but params have "
                         f"{len(p_leaves)}; pass the logical axes of the same (unboxed) params tree")
    by_path = {tuple(path): (x.shape, s) for (path, x), s in zip(p_leaves, s_leaves)}
    by_shape: dict[tuple, set] = {}
    for (_, x), s in zip(p_leaves, s_leaves):
        by_shape.setdefault(tuple(x.shape), set()).add(s)
    path_lens = sorted({len(p) for p in by_path}, reverse=True)
    repl = _replicated(mesh)

    def for_opt_leaf(path, x):
        shape = tuple(getattr(x, "shape", ()))
        if not shape:
            return repl
        path = tuple(path)
        for n in path_lens:
            if n <= len(path):
                hit = by_path.get(path[len(path) - n:])
                if hit is not None and tuple(hit[0]) == shape:
                    return hit[1]
        cands = by_shape.get(shape, set())
        if len(cands) == 1:
            return next(iter(cands))
        return repl

    o_shard = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
    return abstract_state.replace(step=repl, params=p_shard, opt_state=o_shard, rng=repl, skipped_nonfinite=repl,
                                  consecutive_nonfinite=repl)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for Orbax on any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


@dataclasses.dataclass
class StatePlan:
    """Everything known about a sharded TrainState before any array exists.

    abstract   TrainState of ShapeDtypeStructs (with ``tx``)
    shardings  TrainState of NamedShardings (for ``make_train_step`` and restore targets)
    init       () -> TrainState, jitted with ``out_shardings=shardings`` (params initialised in place, sharded)
    """
    abstract: TrainState
    shardings: TrainState
    init: Callable[[], TrainState]
    mesh: Mesh

    def restore_target(self) -> TrainState:
        """ShapeDtypeStructs with this plan's shardings: what Orbax restores into (any source mesh)."""
        return abstract_with_shardings(self.abstract, self.shardings)


def plan_sharded_state(init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh,
                       rules: Iterable[tuple[str, Any]] | None = None, *, rng: jax.Array,
                       param_logical_axes: Any = None) -> StatePlan:
    """Shapes and shardings of the TrainState that ``init_params_fn`` and ``tx`` define, plus its sharded init.

    ``init_params_fn(key) -> params`` may return Flax-boxed params (``nn.with_logical_partitioning``); their logical
    axes are then read from the boxes unless ``param_logical_axes`` is given. ``rng``: raw uint32[2] key; params are
    initialised with ``fold_in(rng, 0)`` and the state keeps ``fold_in(rng, 1)``. Nothing is computed until
    ``plan.init()`` is called, so a resumed run never pays for an init it throws away.
    """
    rng = jnp.asarray(rng)

    def init(key):
        params = nn.meta.unbox(init_params_fn(jax.random.fold_in(key, 0)))
        return TrainState.create(params=params, tx=tx, rng=jax.random.fold_in(key, 1))

    if param_logical_axes is None:
        boxed = jax.eval_shape(init_params_fn, rng)
        param_logical_axes = nn.get_partition_spec(boxed)
    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(abstract, param_logical_axes, mesh, rules)
    jitted = jax.jit(init, out_shardings=shardings)

    def run_init():
        with mesh:
            return jitted(rng)
    return StatePlan(abstract=abstract, shardings=shardings, init=run_init, mesh=mesh)


def create_sharded_state(init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Iterable[tuple[str, Any]] | None = None, *, rng: jax.Array,
                         param_logical_axes: Any = None) -> tuple[TrainState, TrainState]:
    """Initialise a TrainState directly sharded (never materialised on one device); see ``plan_sharded_state``.

    Returns ``(state, shardings)``; ``shardings`` is a TrainState of NamedShardings for ``make_train_step`` and
    checkpoint restore.
    """
    plan = plan_sharded_state(init_params_fn, tx, mesh, rules, rng=rng, param_logical_axes=param_logical_axes)
    return plan.init(), plan.shardings
