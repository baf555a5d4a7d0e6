"""The reference training loop: one readable function wiring state, step, data, checkpoints, metrics, preemption.

The SFT, GCPO and GRPO loops follow this shape (their steps differ, the scaffolding does not):

    mesh, rules          <- config.mesh, config.sharding.rules
    plan                 <- state.plan_sharded_state(task.init_params, make_optimizer(config.train), mesh)
    restored             <- checkpoint.restore_or_init(Checkpointer(workdir), plan)   # resume if possible
    data iterator        <- pipeline.make_pipeline(...); set_state(restored.data_state)
    step_fn              <- step.make_train_step(task.loss_fn, state_shardings=plan.shardings, mesh=mesh)
    with PreemptionHandler():
        while step < steps:
            batch = pipeline.global_batch(next(it), mesh)          # this process's rows -> global jax.Array
            state, m = step_fn(state, batch)
            log (metrics.jsonl + TensorBoard), NaN-guard check, eval, checkpoint (every N), SIGTERM -> save, stop
        final checkpoint

Config fields read (defaults in ``LOOP_DEFAULTS``): ``seed``, ``mesh.{data,fsdp,tensor}``, ``sharding.rules``,
``train.{steps, global_batch_size, grad_accum_steps, log_every, checkpoint_every, keep_checkpoints, eval_every,
max_consecutive_nonfinite, async_checkpoint, report_mfu}`` plus the optimizer fields of ``state.make_optimizer``, and
``data.{length_buckets, pad_to_multiple, num_threads, prefetch}``.

Determinism: the step's key is ``fold_in(state.rng, state.step)`` and the data position is checkpointed with the
state, so a run killed at any point and rerun on the same workdir ends bitwise equal to an uninterrupted run
(on the same backend and device count).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from edit_r1_jax import parallel
from edit_r1_jax.data import pipeline
from edit_r1_jax.train import checkpoint as ckpt_lib
from edit_r1_jax.train import metrics as metrics_lib
from edit_r1_jax.train import state as state_lib
from edit_r1_jax.train import step as step_lib
from edit_r1_jax.train.preemption import PreemptionHandler

log = logging.getLogger(__name__)

LOOP_DEFAULTS = dict(steps=1, global_batch_size=8, grad_accum_steps=1, log_every=1, checkpoint_every=100,
                     keep_checkpoints=3, eval_every=0, max_consecutive_nonfinite=5, async_checkpoint=True,
                     report_mfu=False)


@dataclasses.dataclass
class Task:
    """What a concrete training task gives the loop.

    init_params      key -> params; Flax-boxed (``nn.with_logical_partitioning``) unless ``param_logical_axes``
    loss_fn          (params, batch, rng) -> (loss, aux dict); aux["loss_weight"] weights microbatches
    train_source     random-access records (list, ``formats.JsonlSource``, ``tfds_builders.TfdsRecords``)
    tokenize_fn      record -> dict of numpy arrays
    pad_values       {key: pad value} for keys whose first axis is the sequence
    trainable_mask   bool tree / callable params -> bool tree (None: everything trains)
    eval_fn          (state, step) -> dict of metrics, run every ``train.eval_every`` steps on every process
    tokens_in_batch  local batch -> number of tokens (for tokens/s), e.g. ``lambda b: b["mask"].sum()``
    flops_per_step   FLOPs per step per device for MFU; None with ``train.report_mfu`` = XLA's count of the
                     compiled step (one extra compile at the first step); MFU is logged where the peak is known
    on_step          (step, metrics or None) -> None after every step (tests, custom logging)
    """
    init_params: Callable[[jax.Array], Any]
    loss_fn: step_lib.LossFn
    train_source: Any
    tokenize_fn: Callable[[Any], Mapping[str, Any]]
    pad_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    param_logical_axes: Any = None
    trainable_mask: Any = None
    eval_fn: Callable[[state_lib.TrainState, int], Mapping[str, Any]] | None = None
    tokens_in_batch: Callable[[Mapping[str, np.ndarray]], float] | None = None
    flops_per_step: float | None = None
    on_step: Callable[[int, Mapping[str, Any] | None], None] | None = None


@dataclasses.dataclass
class LoopResult:
    state: state_lib.TrainState
    step: int
    stopped: str                    # "done" | "preempted"
    resumed_from: int | None        # checkpoint step the run started from (None: fresh)
    last_metrics: dict


def _get(cfg: Any, key: str, default: Any) -> Any:
    return state_lib.cfg_get(cfg, key, default)


def train(config: Any, workdir: str, task: Task) -> LoopResult:
    """Train ``task`` for ``config.train.steps`` steps in ``workdir`` (resuming from its latest checkpoint)."""
    tcfg, dcfg = _get(config, "train", {}), _get(config, "data", {})
    opt = {k: _get(tcfg, k, v) for k, v in LOOP_DEFAULTS.items()}
    total_steps = int(opt["steps"])

    # -- mesh, optimizer, state plan ---------------------------------------------------------------------------
    mesh = parallel.make_mesh(_get(config, "mesh", None))
    rules = parallel.rules_from_config(config)
    log.info("%s", parallel.describe_mesh(mesh))
    tx = state_lib.make_optimizer(tcfg, task.trainable_mask)
    plan = state_lib.plan_sharded_state(task.init_params, tx, mesh, rules,
                                        rng=jax.random.PRNGKey(int(_get(config, "seed", 0))),
                                        param_logical_axes=task.param_logical_axes)

    # -- resume or init ----------------------------------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=int(opt["checkpoint_every"]), keep=int(opt["keep_checkpoints"]),
                                 async_save=bool(opt["async_checkpoint"]))
    restored = ckpt_lib.restore_or_init(ckpt, plan)
    state = restored.state
    start = int(jax.device_get(state.step))
    if restored.resumed:
        log.info("resumed from step %d", start)

    # -- data --------------------------------------------------------------------------------------------------
    buckets = _get(dcfg, "length_buckets", None)
    ds = pipeline.make_pipeline(task.train_source, tokenize_fn=task.tokenize_fn,
                                global_batch_size=int(opt["global_batch_size"]), seed=int(_get(config, "seed", 0)),
                                pad_values=task.pad_values, length_buckets=tuple(buckets) if buckets else None,
                                pad_to_multiple=int(_get(dcfg, "pad_to_multiple", 8)),
                                num_threads=int(_get(dcfg, "num_threads", 2)), prefetch=int(_get(dcfg, "prefetch", 4)))
    it = iter(ds)
    if restored.data_state:
        it.set_state(restored.data_state)

    # -- step function -----------------------------------------------------------------------------------------
    step_fn = step_lib.make_train_step(task.loss_fn, state_shardings=plan.shardings, mesh=mesh,
                                       grad_accum_steps=int(opt["grad_accum_steps"]),
                                       trainable_mask=task.trainable_mask,
                                       lr_schedule=state_lib.make_lr_schedule(tcfg))

    # -- metrics -----------------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start if restored.resumed else None)
    meter = metrics_lib.ThroughputMeter(flops_per_step_per_device=task.flops_per_step)
    bar = metrics_lib.progress_bar(total_steps, initial=start)
    log_every, eval_every = max(1, int(opt["log_every"])), int(opt["eval_every"])
    max_bad = int(opt["max_consecutive_nonfinite"])

    step, stopped, last = start, "done", {}
    tokens_since = examples_since = steps_since = 0
    try:
        with PreemptionHandler() as preempt:
            while step < total_steps:
                local = next(it)
                if task.tokens_in_batch is not None:
                    # this process's tokens; all processes hold equal shares of the global batch
                    tokens_since += float(task.tokens_in_batch(local)) * jax.process_count()
                examples_since += int(opt["global_batch_size"])
                batch = pipeline.global_batch(local, mesh, task.pad_values)
                if meter.flops is None and bool(opt["report_mfu"]):
                    with mesh:
                        meter.flops = metrics_lib.compiled_flops_per_device(step_fn.jitted, state, batch)
                state, m = step_fn(state, batch)
                step += 1
                steps_since += 1
                logged = None
                evals = {}
                if eval_every and task.eval_fn is not None and step % eval_every == 0:
                    evals = {f"eval/{k}": v for k, v in task.eval_fn(state, step).items()}
                if step % log_every == 0 or step == total_steps or evals:
                    perf = meter.update(steps_since, tokens=tokens_since if task.tokens_in_batch else None,
                                        examples=examples_since)
                    tokens_since = examples_since = steps_since = 0
                    logged = writer.write_scalars(step, {**m, **perf, **evals})
                    last = logged
                    bar.set_postfix(loss=logged.get("loss"), refresh=False)
                    try:
                        step_lib.check_nonfinite(m, max_bad, step)
                    except step_lib.NonFiniteError:
                        # skipped steps never change params: this state is the last good one
                        ckpt.save(step, state, data_state=it.get_state(), config=config, force=True)
                        raise
                bar.update(1)
                if task.on_step is not None:
                    task.on_step(step, logged)
                if preempt.should_stop():
                    ckpt.save(step, state, data_state=it.get_state(), config=config, force=True)
                    stopped = "preempted"
                    break
                ckpt.save(step, state, data_state=it.get_state(), config=config)
        if stopped == "done":
            ckpt.save(step, state, data_state=it.get_state(), config=config, force=True)
    finally:
        ckpt.close()   # waits for the pending async save to be finalized
        writer.close()
        bar.close()
    log.info("training %s at step %d", stopped, step)
    return LoopResult(state=state, step=step, stopped=stopped, resumed_from=restored.step, last_metrics=last)
