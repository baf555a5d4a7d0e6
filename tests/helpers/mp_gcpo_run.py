"""Worker for test_multiprocess_gcpo: ``gcpo.train`` (the loop behind ``edit-r1-jax gcpo``) on the tiny config with
three test-only changes, then the HF export as ``gcpo.run`` does it.

    python tests/helpers/mp_gcpo_run.py WORKDIR [--set key=value ...]

  1. scores: a random tiny RRM writes no parseable trace (every score NaN -> every pair skipped -> no update), so
     the scorer is a deterministic function of the decoded text, sum(utf-8 bytes) % 9; equal traces in two layouts
     give equal scores and advantages, different traces (almost surely) do not;
  2. extra EOS ids (token ids 100..149) end some traces early, so completion lengths are ragged;
  3. Adam eps 1e-3 (see tests/test_gcpo.py: with eps 1e-8 the first update is lr * sign(g), which turns
     last-bit differences of near-zero gradient entries into lr-sized parameter differences).
Every process writes WORKDIR/rollouts.proc<i>.npz: the sampled tokens and sampler log-probs of every GCPO step (the
full global arrays, which ``gcpo_rollout.sample`` all-gathers onto every process).

EDIT_R1_TEST_XLA_EXTRA="--flag ..." is appended to XLA_FLAGS before JAX starts (as in mp_sft_run.py).
"""
import os
import sys

if os.environ.get("EDIT_R1_TEST_XLA_EXTRA"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + os.environ["EDIT_R1_TEST_XLA_EXTRA"]).strip()

import logging  # noqa: E402

import numpy as np  # noqa: E402

from edit_r1_jax import parallel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")
EXTRA_EOS = tuple(range(100, 150))
ADAM_EPS = 1e-3


def text_scorer(texts, num_principles):
    scores = np.array([sum(t.encode("utf-8")) % 9 for t in texts], np.float32)
    return scores, ["ok"] * len(texts)


def main(argv):
    workdir, rest = argv[0], argv[1:]
    overrides = [rest[i + 1] for i in range(len(rest)) if rest[i] == "--set"]
    parallel.maybe_initialize_distributed()
    import jax
    logging.basicConfig(level=logging.INFO, format=f"[proc {jax.process_index()}] %(asctime)s %(name)s: %(message)s")
    from edit_r1_jax import config as config_lib
    from edit_r1_jax.train import gcpo
    from edit_r1_jax.train.export import export_rrm_hf

    cfg = config_lib.get_config(TINY, overrides, num_devices=jax.device_count())
    cfg.train.eps = ADAM_EPS

    init = gcpo.GCPOStep.__init__

    def init_with_extra_eos(self, *a, **k):
        init(self, *a, **k)
        self.eos_ids = tuple(sorted(set(self.eos_ids) | set(EXTRA_EOS)))
    gcpo.GCPOStep.__init__ = init_with_extra_eos

    sample, rollouts = gcpo.ro_lib.sample, []

    def recording_sample(*a, **k):
        ro = sample(*a, **k)
        rollouts.append((ro.tokens, ro.logps))
        return ro
    gcpo.ro_lib.sample = recording_sample

    os.makedirs(workdir, exist_ok=True)
    result, setup = gcpo.train(cfg, workdir, scorer=text_scorer)
    export_rrm_hf(setup, result.state.params, os.path.join(workdir, "hf"))    # collective; process 0 writes
    np.savez(os.path.join(workdir, f"rollouts.proc{jax.process_index()}.npz"),
             tokens=np.stack([t for t, _ in rollouts]), logps=np.stack([lp for _, lp in rollouts]))
    print(f"mp_gcpo_run: process {jax.process_index()} of {jax.process_count()}: {result.stopped} at step "
          f"{result.step}, {len(rollouts)} rollouts", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
