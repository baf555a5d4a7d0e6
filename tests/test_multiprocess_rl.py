"""Multi-controller JAX: the RL loops on 2 processes x 4 CPU devices (gloo) against 1 process x 8 devices (issue #11),
the same mesh (data=2 x fsdp=2 x tensor=2) in both: GCPO of the reward model and Flow-GRPO of the editor.

GCPO. Both runs are ``tests/helpers/mp_gcpo_run.py`` (``gcpo.train`` + HF export; a text-hash scorer, extra EOS ids for
ragged traces, Adam eps 1e-3: see that file) with the same config and seed: 2 GCPO steps of 2 pairs x 2 images x
N=2 traces (R = 8 rows, 16 new tokens), 2 PPO epochs each. The sampling key is ``fold_in(state.rng, step)``, the
same global key on every process, and ``qwen2_5_vl.generate`` runs as one SPMD program over the global mesh, so the
traces do not depend on the process layout: this test requires them to be identical (tokens bit-exact), which also
makes the scores, advantages and update batches identical, and then compares the updates.

Numerics: fp32 params and compute, default matmul precision in both runs, the same XLA flags (every run is a
subprocess). Checks:
  1. sampled tokens: equal on both processes and to the 1-process run's, both steps (step 2 samples with the params
     after step 1's update); sampler log-probs within 1e-6 relative;
  2. metrics (loss, last-epoch loss, grad norm, reward, trace lengths, ...) within 1e-6 relative;
  3. final params (the hf/ exports): relative error (Frobenius) of the whole parameter vector and of every tensor
     <= 1e-6.
Measured (2026-11-27): tokens identical; sampler log-probs 1.3e-7; metrics <= 1.4e-7 (last-epoch loss); params
6.1e-9 overall, worst tensor 1.3e-7 (a vision MLP bias: zero-initialised, it holds the update alone). Runtime:
2-process run ~135 s, 1-process run ~75 s on the loaded 2-core machine.

Flow-GRPO. ``edit-r1-jax grpo`` (through tests/helpers/mp_sft_run.py, which is the CLI) on the tiny config: LoRA rank 8
on the tiny FLUX.1-Kontext, gold (pixel-verifier) reward, group 4 x 2 prompts, 4 SDE steps, 2 GRPO steps of 2 PPO
epochs, no evaluation. The initial noise comes from the global rollout key on the host and the SDE noise from the
same key inside the one SPMD sampler, so the edits, rewards and advantages do not depend on the layout. Checks: every
logged metric (rewards, kept samples, sampler log-prob mean, losses, gradient norms, KL) and every exported tensor
(base editor and LoRA adapters) within 1e-6 relative (max-norm). Measured: all bit-identical. Runtime: 2-process run
~85 s, 1-process run ~50 s.
"""
import glob
import os
import re
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "helpers", "mp_gcpo_run.py")
CLI_HELPER = os.path.join(ROOT, "tests", "helpers", "mp_sft_run.py")    # the edit-r1-jax CLI (+ unused test hooks)
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 2
OVERRIDES = [f"train.steps={STEPS}", "gcpo.max_new_tokens=16", "gcpo.num_samples=2", "gcpo.pairs_per_step=2",
             "gcpo.ppo_epochs=2", "train.warmup_steps=0", "train.lr=1e-3", "data.num_train=8", "mesh.data=2",
             "mesh.fsdp=2", "mesh.tensor=2", "train.checkpoint_every=100"]
GRPO_OVERRIDES = [f"train.steps={STEPS}", "grpo.ppo_epochs=2", "grpo.eval_at_start=False", "train.eval_every=0",
                  "train.warmup_steps=0", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.checkpoint_every=100"]
ROUNDING_SIZED = {"approx_kl", "kl", "logp_abs_diff_max", "logp_abs_diff_mean", "ratio_max", "ratio_min",
                  "ratio_mean"}
from helpers.multiprocess_common import launch as _launch  # noqa: E402
from helpers.multiprocess_common import compare_exports, read_metrics as _metrics  # noqa: E402


def _sets(overrides) -> list:
    return [x for o in overrides for x in ("--set", o)]


def _two_and_one(base, name: str, worker) -> dict:
    """worker(workdir) -> argv; runs it on 2 processes, then on 1, in base/<name>_{two,one}_proc."""
    two, one = str(base / f"{name}_two_proc"), str(base / f"{name}_one_proc")
    t0 = time.monotonic()
    log2 = _launch(2, worker(two), timeout=600)
    t_two = time.monotonic() - t0
    t0 = time.monotonic()
    log1 = _launch(0, worker(one), timeout=600)
    print(f"2-process {name} run {t_two:.0f} s, 1-process run {time.monotonic() - t0:.0f} s")
    return dict(two=two, one=one, log2=log2, log1=log1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
    d = str(tmp_path_factory.mktemp("mp_rl") / "tokenizer")
    ensure_world_tokenizer(d)                    # built once, shared by every run
    return d


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory):
    sets = _sets(OVERRIDES + [f"rrm.tokenizer={tokenizer}"])
    return _two_and_one(tmp_path_factory.mktemp("mp_gcpo"), "gcpo",
                        lambda w: [sys.executable, HELPER, w, *sets])


@pytest.fixture(scope="module")
def grpo_runs(tokenizer, tmp_path_factory):
    sets = _sets(GRPO_OVERRIDES + [f"editor.tokenizer={tokenizer}"])
    return _two_and_one(tmp_path_factory.mktemp("mp_grpo"), "grpo",
                        lambda w: [sys.executable, CLI_HELPER, "grpo", "--config", TINY, "--workdir", w, *sets])


@pytest.mark.slow
@pytest.mark.multihost
def test_two_process_gcpo_samples_the_same_traces(runs):
    log2, log1 = runs["log2"], runs["log1"]
    for i in (0, 1):             # really two JAX processes of 4 devices each, on one 8-device mesh
        assert f"mp_gcpo_run: process {i} of 2: done at step {STEPS}" in log2, log2[-3000:]
        assert f"[proc {i}]" in log2 and "Mesh(data=2, fsdp=2, tensor=2) over 8 devices" in log2, log2[-3000:]
    assert "process 0 of 1: done" in log1 and "[proc 1]" not in log1, log1[-3000:]
    ref = np.load(os.path.join(runs["one"], "rollouts.proc0.npz"))
    assert ref["tokens"].shape == (STEPS, 8, 16)
    on = ref["logps"] != 0
    lengths = on.sum(-1)
    assert len(np.unique(lengths)) > 1 and (lengths < 16).any()           # ragged traces, some ended early
    assert not np.array_equal(ref["tokens"][0], ref["tokens"][1])
    for pid in (0, 1):
        got = np.load(os.path.join(runs["two"], f"rollouts.proc{pid}.npz"))
        np.testing.assert_array_equal(got["tokens"], ref["tokens"], err_msg=f"process {pid}")
        np.testing.assert_array_equal(got["logps"] != 0, on)
        err = np.abs(got["logps"] - ref["logps"]).max() / np.abs(ref["logps"]).max()
        print(f"process {pid}: sampler log-probs relative error {err:.2e}")
        assert err <= 1e-6, (pid, err)


@pytest.mark.slow
@pytest.mark.multihost
def test_two_process_gcpo_equals_one_process(runs):
    two, one = _metrics(runs["two"]), _metrics(runs["one"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(two, one):
        assert b["update_skipped"] == 0 and b["kept_traces"] > 0, b       # a real update ran
        assert abs(b["last_epoch/loss"]) > 1e-6                          # epoch 2: rho != 1
        for k in ("reward", "trace_len_mean", "pairs_skipped", "kept_traces", "adv_abs_mean"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])              # same traces -> same scores, advantages
        for k in ("loss", "last_epoch/loss", "grad_norm", "last_epoch/grad_norm", "policy_loss"):
            # epoch 1's loss is -(1/|K|) sum_i A_i with rho = 1: 0 up to rounding (measured 7e-9 against 0), so it
            # is bounded on the scale of its terms, |A_i| (adv_abs_mean)
            scale = b["adv_abs_mean"] if k in ("loss", "policy_loss") else abs(b[k])
            assert abs(a[k] - b[k]) <= 1e-6 * scale, (a["step"], k, a[k], b[k])
    overall, worst, worst_err = compare_exports(os.path.join(runs["two"], "hf"), os.path.join(runs["one"], "hf"))
    assert overall <= 1e-6
    assert worst_err <= 1e-6, (worst, worst_err)


def _safetensors_tree(d: str) -> dict:
    """Every tensor of every *.safetensors file under ``d``, keyed 'relative/file.safetensors:name'."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "**", "*.safetensors"), recursive=True)):
        out.update({f"{os.path.relpath(f, d)}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no safetensors under {d}"
    return out


@pytest.mark.slow
@pytest.mark.multihost
def test_two_process_grpo_equals_one_process(grpo_runs):
    log2, log1 = grpo_runs["log2"], grpo_runs["log1"]
    for i in (0, 1):             # two JAX processes, one 8-device policy mesh
        assert f"[proc {i}] grpo: done at step {STEPS}" in log2, log2[-3000:]
        assert re.search(rf"\[proc {i}\].*role policy: devices=all mesh=\{{'data': 2, 'fsdp': 2, 'tensor': 2\}}",
                         log2), log2[-3000:]
    assert "grpo: done" in log1 and "[proc 1]" not in log1, log1[-3000:]
    two, one = _metrics(grpo_runs["two"]), _metrics(grpo_runs["one"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert one[0]["update_skipped"] == 0 and one[0]["kept_samples"] > 0         # a real update ran in step 1
    assert abs(one[0]["last_epoch/loss"]) > 1e-7                                 # epoch 2: rho != 1
    for a, b in zip(two, one):
        assert sorted(a) == sorted(b)
        for k in b:
            if k.endswith("_s") or k == "step":                                  # timings
                continue
            # epoch 1's loss is -mean A rho with rho = 1: 0 up to rounding; bounded on the scale of |A|. The sampler
            # check's statistics (|log pi - log pi_old|, rho - 1, KL) are rounding-sized by construction: absolute.
            scale = b["adv_abs_mean"] if k in ("loss", "policy_loss") else \
                1.0 if k.split("/")[-1] in ROUNDING_SIZED else abs(b[k])
            assert abs(a[k] - b[k]) <= 1e-6 * scale, (a["step"], k, a[k], b[k])
    p2, p1 = _safetensors_tree(os.path.join(grpo_runs["two"], "editor")), \
        _safetensors_tree(os.path.join(grpo_runs["one"], "editor"))
    assert sorted(p2) == sorted(p1) and any(k.startswith("lora") for k in p1)
    errs = {k: float(np.abs(p2[k].astype(np.float64) - p1[k]).max() / max(np.abs(p1[k]).max(), 1e-30)) for k in p1}
    worst = max(errs, key=errs.get)
    print(f"GRPO exports: worst tensor {errs[worst]:.2e} ({worst})")
    assert errs[worst] <= 1e-6, (worst, errs[worst])
