"""Orbax checkpoints under ``WORKDIR/checkpoints/<step>/``: train state, data-iterator state, config; resume.

Each step directory holds three items:
  state   ``ocp.args.StandardSave`` of the TrainState's arrays (params, opt_state, step, rng, NaN-guard counters),
          written collectively by every process (each writes the shards it owns)
  data    ``ocp.args.JsonSave`` of the Grain iterator state (``{"next_index": ...}``; identical on every process
          because all processes step their pipelines in lockstep; process 0 writes it)
  config  ``ocp.args.JsonSave`` of the run's config (for humans and for checking a resume; process 0 writes it)

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only after every
item (and, async, every process) has finished (on GCS: a ``commit_success.txt`` marker instead). ``latest_step``
and restore only ever see finalized steps, so a process killed mid-save leaves the previous checkpoint as the latest
one; leftover tmp directories are deleted when the next manager opens the directory.

Saves are asynchronous (``save`` returns once the arrays are copied to host memory) and happen every
``save_every`` steps (``force=True``: any step, e.g. on exit or preemption); the newest ``keep`` are kept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from edit_r1_jax.train.state import StatePlan, TrainState

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("state", "data", "config")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def _state_to_tree(state: TrainState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "tx"}


def _tree_to_state(tree: dict, like: TrainState) -> TrainState:
    return like.replace(**tree)


def _jsonable(obj: Any) -> Any:
    """Config / iterator state -> JSON-safe (ConfigDicts via to_dict, tuples as lists, others as str)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


@dataclasses.dataclass
class Restored:
    """What ``restore_or_init`` found: ``step`` is None for a fresh start."""
    state: TrainState
    data_state: dict | None
    config: dict | None
    step: int | None

    @property
    def resumed(self) -> bool:
        return self.step is not None


class Checkpointer:
    """A thin, documented wrapper over ``ocp.CheckpointManager`` with the project's three items."""

    def __init__(self, workdir: str, *, save_every: int = 1, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        if save_every < 1:
            raise ValueError(f"train.checkpoint_every={save_every}: must be >= 1")
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(   # the save policy is ours (see save), not Orbax's interval
            max_to_keep=keep if keep and keep > 0 else None, save_interval_steps=1,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # -- queries ---------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest finalized step (tmp directories of interrupted saves are never reported)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, *, data_state: dict | None = None, config: Any = None,
             force: bool = False) -> bool:
        """Start an (async) save of ``step`` if it is due (every ``save_every`` steps) or ``force``. Returns whether a
        save was started. A step that already exists is skipped (e.g. the final step saved twice)."""
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(_state_to_tree(state)),
                                  data=ocp.args.JsonSave(_jsonable(data_state or {})),
                                  config=ocp.args.JsonSave(_jsonable(config or {})))
        saved = self.manager.save(int(step), args=args, force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def wait(self) -> None:
        """Block until the pending async save is finalized."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------------------------
    def restore(self, step: int, target: TrainState) -> Restored:
        """Restore ``step`` into ``target`` (a TrainState of ShapeDtypeStructs *with shardings*, e.g.
        ``plan.restore_target()``): arrays land directly on the target's mesh, whatever mesh wrote them."""
        tree_target = _state_to_tree(target)
        for leaf in jax.tree.leaves(tree_target):
            if getattr(leaf, "sharding", None) is None:
                raise ValueError("Checkpointer.restore: every leaf of the target needs a sharding "
                                 "(use StatePlan.restore_target() or state.abstract_with_shardings)")
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(tree_target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        state = _tree_to_state(out["state"], target)
        data = out["data"] or None
        return Restored(state=state, data_state=data, config=out["config"], step=int(step))


def restore_or_init(ckpt: Checkpointer, plan: StatePlan | None = None, *,
                    init_fn: Callable[[], TrainState] | None = None, target: TrainState | None = None) -> Restored:
    """Resume from the latest finalized checkpoint if ``ckpt`` has one, else initialise.

    Either pass a ``StatePlan`` (``state.plan_sharded_state``; its ``init`` runs only for a fresh start and its
    shardings are the restore target, so the restore lands on the current mesh), or ``init_fn`` and ``target``.
    """
    if plan is not None:
        init_fn, target = plan.init, plan.restore_target()
    if init_fn is None or target is None:
        raise ValueError("restore_or_init: pass a StatePlan, or both init_fn and target")
    step = ckpt.latest_step()
    if step is None:
        return Restored(state=init_fn(), data_state=None, config=None, step=None)
    log.info("checkpoint: resuming from step %d in %s", step, ckpt.directory)
    restored = ckpt.restore(step, target)
    saved_step = int(jax.device_get(restored.state.step))
    if saved_step != step:
        raise RuntimeError(f"checkpoint {ckpt.directory}/{step}: state.step={saved_step} does not match the "
                           f"directory name {step}; the checkpoint directory is inconsistent")
    return restored
