"""The scaffolding of a rollout-then-update RL loop (editing GRPO; the GCPO loop has the same shape).

``generic_loop.train`` pulls batches from a Grain pipeline; an RL step instead samples with the current policy,
scores, and then updates, so the loop body is a callback. Everything around it is shared here:

    restored   <- checkpoint.restore_or_init(Checkpointer(workdir), init_fn, target)     # resume if possible
    with PreemptionHandler():
        [eval at step 0 on a fresh run]
        while step < steps:
            state, m = step_fn(state, step)          # rollout + reward + update (mu optimizer steps)
            step += 1
            eval every N steps; log (metrics.jsonl + TensorBoard); NaN guard; checkpoint every N; SIGTERM -> save, stop
        final checkpoint

``state.step`` counts optimizer steps (``steps_per_iter`` = mu per RL step, also for a step whose update was
skipped), so checkpoint directories are named by optimizer step and the RL step is ``state.step // mu``. The data
position is a pure function of the RL step (``epoch_indices``) and the rollout key is ``fold_in(state.rng, step)``,
so a killed run resumed on the same workdir repeats exactly what an uninterrupted run does.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import numpy as np

from edit_r1_jax.train import checkpoint as ckpt_lib
from edit_r1_jax.train import metrics as metrics_lib
from edit_r1_jax.train import state as state_lib
from edit_r1_jax.train import step as step_lib
from edit_r1_jax.train.generic_loop import LoopResult
from edit_r1_jax.train.preemption import PreemptionHandler

log = logging.getLogger(__name__)

IMAGES_KEY = "_images"     # an eval_fn may return {IMAGES_KEY: {tag: HWC image}}: PNG under WORKDIR/images + TB


def epoch_indices(step: int, per_step: int, num_records: int, seed: int) -> list[int]:
    """Record indices of RL step ``step``: positions step*P .. step*P+P-1 of per-epoch seeded permutations."""
    out = []
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(g, num_records)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_records)[pos]))
    return out


def rollout_key(state: state_lib.TrainState, stream: int, step: int) -> jax.Array:
    """The sampling key of RL step ``step``: fold_in(fold_in(state.rng, stream), step) (host-side, typed)."""
    key = jax.random.wrap_key_data(jax.device_get(state.rng))
    return jax.random.fold_in(jax.random.fold_in(key, stream), int(step))


@dataclasses.dataclass
class LoopSpec:
    """What the loop needs besides the callbacks (counts in RL steps unless said otherwise)."""
    total_steps: int
    steps_per_iter: int = 1            # optimizer steps per RL step (mu)
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_every: int = 0
    eval_at_start: bool = False
    max_consecutive_nonfinite: int = 5
    desc: str = "rl"


def run(config: Any, workdir: str, spec: LoopSpec, *, init_fn: Callable[[], state_lib.TrainState],
        target: state_lib.TrainState, step_fn: Callable[[state_lib.TrainState, int], tuple],
        eval_fn: Callable[[state_lib.TrainState, int], dict] | None = None,
        data_state_fn: Callable[[int], dict] | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> LoopResult:
    """Drive ``step_fn`` for ``spec.total_steps`` RL steps in ``workdir`` (resuming from its latest checkpoint)."""
    mu = int(spec.steps_per_iter)
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=int(spec.checkpoint_every) * mu, keep=int(spec.keep_checkpoints),
                                 async_save=bool(spec.async_checkpoint))
    restored = ckpt_lib.restore_or_init(ckpt, init_fn=init_fn, target=target)
    state = restored.state
    step = int(jax.device_get(state.step)) // mu
    if restored.resumed:
        log.info("resumed from RL step %d (optimizer step %d)", step, step * mu)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=step if restored.resumed else None)
    bar = metrics_lib.progress_bar(spec.total_steps, initial=step, desc=spec.desc)
    data_state_fn = data_state_fn or (lambda s: {"rl_step": s})

    def evaluate(s: int) -> dict:
        out = dict(eval_fn(state, s))
        images = out.pop(IMAGES_KEY, None)
        if images:
            writer.write_images(s, images)
        return {f"eval/{k}": v for k, v in out.items()}

    def save(force: bool = False) -> None:
        ckpt.save(int(jax.device_get(state.step)), state, data_state=data_state_fn(step), config=config, force=force)

    stopped, last = "done", {}
    try:
        with PreemptionHandler() as preempt:
            if eval_fn is not None and spec.eval_at_start and not restored.resumed and step == 0:
                last = writer.write_scalars(0, evaluate(0))
            while step < spec.total_steps:
                t0 = time.perf_counter()
                state, m = step_fn(state, step)
                step += 1
                m = dict(m)
                m["step_time_s"] = time.perf_counter() - t0
                if eval_fn is not None and spec.eval_every and step % spec.eval_every == 0:
                    m.update(evaluate(step))
                logged = None
                if step % max(1, spec.log_every) == 0 or step == spec.total_steps or any(
                        k.startswith("eval/") for k in m):
                    logged = last = writer.write_scalars(step, m)
                    bar.set_postfix(reward=logged.get("reward_mean"), loss=logged.get("loss"), refresh=False)
                if "consecutive_nonfinite" in m:
                    try:
                        step_lib.check_nonfinite(m, int(spec.max_consecutive_nonfinite), step)
                    except step_lib.NonFiniteError:
                        save(force=True)
                        raise
                bar.update(1)
                if on_step is not None:
                    on_step(step, logged if logged is not None else m)
                if preempt.should_stop():
                    save(force=True)
                    stopped = "preempted"
                    break
                save()
        if stopped == "done":
            save(force=True)
    finally:
        ckpt.close()
        writer.close()
        bar.close()
    log.info("%s %s at step %d", spec.desc, stopped, step)
    return LoopResult(state=state, step=step, stopped=stopped,
                      resumed_from=None if restored.step is None else restored.step // mu, last_metrics=last)
