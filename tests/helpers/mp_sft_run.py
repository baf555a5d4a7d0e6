"""Worker for test_multiprocess_training: the ``edit-r1-jax`` CLI (argv as for ``edit-r1-jax``), plus two test hooks.

  EDIT_R1_TEST_XLA_EXTRA="--flag ..."      appended to XLA_FLAGS before JAX starts (the launcher overwrites XLA_FLAGS;
                                           the test uses this to compile with the same flags as its own process)
  EDIT_R1_TEST_DIE_AT_STEP=k               process EDIT_R1_TEST_DIE_PROCESS (default 1) SIGKILLs itself right after
  EDIT_R1_TEST_DIE_PROCESS=p               training step k, once checkpoint k-1 is finalized on disk, so the resume
                                           point of the rerun is deterministic (k-1)

Without the variables this is exactly ``python -m edit_r1_jax.cli ARGS``.
"""
import os
import signal
import sys
import time

if os.environ.get("EDIT_R1_TEST_XLA_EXTRA"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + os.environ["EDIT_R1_TEST_XLA_EXTRA"]).strip()

import logging  # noqa: E402

from edit_r1_jax import cli  # noqa: E402

_handlers = list(logging.root.handlers)
from edit_r1_jax.train import generic_loop  # noqa: E402

# orbax/grain add a root handler at import; drop it so the CLI's logging.basicConfig (process-prefixed INFO lines)
# applies exactly as in a plain `edit-r1-jax` run, which imports them only after configuring logging
for _h in logging.root.handlers[len(_handlers):]:
    logging.root.removeHandler(_h)


def _install_die_hook() -> None:
    die_at = int(os.environ.get("EDIT_R1_TEST_DIE_AT_STEP", "0"))
    if die_at <= 0:
        return
    who = int(os.environ.get("EDIT_R1_TEST_DIE_PROCESS", "1"))
    train = generic_loop.train

    def train_then_die(config, workdir, task):
        previous = task.on_step

        def on_step(step, metrics):
            if previous is not None:
                previous(step, metrics)
            import jax
            if step != die_at or jax.process_index() != who:
                return
            last = os.path.join(os.path.abspath(workdir), "checkpoints", str(step - 1))
            deadline = time.monotonic() + 300
            while not os.path.isdir(last) and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"mp_sft_run: process {who} kills itself (SIGKILL) after step {step}; "
                  f"checkpoint {step - 1} finalized: {os.path.isdir(last)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        task.on_step = on_step
        return train(config, workdir, task)
    generic_loop.train = train_then_die   # train/sft.py looks it up at call time


if __name__ == "__main__":
    _install_die_hook()
    sys.exit(cli.main(sys.argv[1:]))
