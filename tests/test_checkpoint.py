"""Checkpoints and the generic loop: keep-last-N, restore onto another mesh, kill mid-save, resume after SIGKILL
(bitwise), SIGTERM -> checkpoint at the step boundary and exit 0, NaN-guard stop with the last good state saved."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as T
from edit_r1_jax import parallel
from edit_r1_jax.train import checkpoint as C
from edit_r1_jax.train import generic_loop as G
from edit_r1_jax.train import metrics as M
from edit_r1_jax.train import state as S
from edit_r1_jax.train import step as ST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _env(cache_dir):
    env = dict(os.environ)   # inherits conftest's XLA_FLAGS: subprocesses compile exactly like this process
    flags = env.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")]),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")
    return env


def _toy_script(workdir, *args, cache_dir):
    """Run tests/train_toy.py (the generic loop on the toy task); stdout piped, stderr (logs, bar) to a file."""
    os.makedirs(cache_dir, exist_ok=True)
    err = open(os.path.join(cache_dir, f"stderr_{time.time_ns()}.txt"), "w")
    return subprocess.Popen([sys.executable, os.path.join(TESTS, "train_toy.py"), str(workdir), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=_env(cache_dir))


def _read_until(proc, prefix, timeout=240):
    """Lines of proc's stdout up to (and including) the first starting with ``prefix``."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"never saw {prefix!r}; output:\n{''.join(lines)[-3000:]}")


def _plan(mesh_shape, cfg=None):
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    cfg = cfg or T.toy_config().train
    return S.plan_sharded_state(T.init_params, S.make_optimizer(cfg), mesh, rng=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def jcc(tmp_path_factory):
    """One persistent JAX compilation cache for all subprocess runs of this module (they compile the same step)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step generic-loop run in this process (mesh 2x2x2, checkpoints every 2 steps)."""
    wd = tmp_path_factory.mktemp("reference")
    res = G.train(T.toy_config(steps=6, checkpoint_every=2), str(wd), T.toy_task())
    return wd, res


def test_loop_writes_metrics_checkpoints_and_learns(reference_run):
    wd, res = reference_run
    assert res.stopped == "done" and res.step == 6 and res.resumed_from is None
    recs = M.read_metrics(str(wd / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "grad_norm", "lr", "tokens_per_s", "token_accuracy"} <= r.keys() for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == [2, 4, 6]
    assert os.listdir(wd / "tb")
    with C.Checkpointer(str(wd)) as ck:
        r = ck.restore(6, _plan((2, 2, 2)).restore_target())
    assert r.data_state == {"next_index": 6}                  # one batch per step, position saved with the state
    assert r.config["train"]["steps"] == 6
    for a, b in zip(jax.tree.leaves(r.state.params), jax.tree.leaves(res.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_a_different_mesh(reference_run):
    """The 2x2x2 run's step-4 checkpoint restored on fsdp=8: bitwise equal values with the new mesh's shardings
    (a step on either mesh then gives the same result: test_train_step's sharded == unsharded tests)."""
    wd, _ = reference_run
    plan_a, plan_b = _plan((2, 2, 2)), _plan((1, 8, 1))
    with C.Checkpointer(str(wd)) as ck:
        ra = ck.restore(4, plan_a.restore_target())
        rb = ck.restore(4, plan_b.restore_target())
    assert ra.data_state == rb.data_state == {"next_index": 4}
    for a, b, sh in zip(jax.tree.leaves(ra.state), jax.tree.leaves(rb.state), jax.tree.leaves(plan_b.shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == sh
    emb = rb.state.params["embedding"]
    assert emb.addressable_shards[0].data.size * 8 == emb.size                # really split 8 ways now
    mu = [x for x in jax.tree.leaves(rb.state.opt_state) if x.shape == emb.shape]
    assert mu and all(x.sharding == emb.sharding for x in mu)                 # and the Adam moments with it


def test_keep_last_n_save_interval_and_fresh_init(tmp_path):
    plan = _plan((8, 1, 1))
    with C.Checkpointer(str(tmp_path), save_every=2, keep=2) as ck:
        fresh = C.restore_or_init(ck, plan)
        assert not fresh.resumed and fresh.data_state is None and int(fresh.state.step) == 0
        st = fresh.state
        started = []
        for s in range(1, 8):
            st = st.replace(step=jnp.asarray(s, jnp.int32))
            started.append(ck.save(s, st, data_state={"next_index": s}))
        assert started == [False, True, False, True, False, True, False]   # every 2 steps
        assert ck.save(7, st, data_state={"next_index": 7}, force=True)     # on exit: any step
        assert not ck.save(7, st, force=True)                               # never twice
        ck.wait()
        assert ck.all_steps() == [6, 7] and ck.latest_step() == 7           # keep the newest 2
    with C.Checkpointer(str(tmp_path)) as ck:
        r = C.restore_or_init(ck, plan)
    assert r.resumed and r.step == 7 and int(r.state.step) == 7 and r.data_state == {"next_index": 7}
    with pytest.raises(ValueError, match="sharding"):
        C.Checkpointer(str(tmp_path)).restore(7, plan.abstract)


def test_nan_guard_stops_the_loop_and_saves_the_last_good_state(tmp_path):
    def always_nan(params, batch, rng):
        loss, aux = T.loss_fn(params, batch, rng)
        return loss * jnp.nan, aux
    with pytest.raises(ST.NonFiniteError, match="3 consecutive train steps had a non-finite"):
        G.train(T.toy_config(steps=10, checkpoint_every=100), str(tmp_path), T.toy_task(loss=always_nan))
    recs = M.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["finite"], r["skipped_nonfinite"], r["loss"]) for r in recs] == \
        [(1, 0, 1, None), (2, 0, 2, None), (3, 0, 3, None)]
    plan = _plan((2, 2, 2))
    init = plan.init()
    with C.Checkpointer(str(tmp_path)) as ck:
        assert ck.latest_step() == 3
        r = ck.restore(3, plan.restore_target())
    assert int(r.state.skipped_nonfinite) == 3
    for a, b in zip(jax.tree.leaves(r.state.params), jax.tree.leaves(init.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # never updated: the initial params


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_equal(reference_run, tmp_path, jcc):
    """Kill -9 a 6-step run after step 3 (the step-2 checkpoint is finalized), rerun the same command: the final
    params equal the uninterrupted run's bit for bit, and metrics.jsonl reads as one run."""
    _, ref = reference_run
    wd = tmp_path / "run"
    proc = _toy_script(wd, "--steps", 6, "--sleep-from", 3, "--sleep", 30, cache_dir=jcc)
    _read_until(proc, "STEP 3")
    t0 = time.time()
    while not os.path.isdir(wd / "checkpoints" / "2") and time.time() - t0 < 60:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(wd / "final_params_6.npz")
    assert sorted(d for d in os.listdir(wd / "checkpoints") if d.isdigit()) == ["2"]

    proc = _toy_script(wd, "--steps", 6, cache_dir=jcc)
    out = _read_until(proc, "RESULT")
    proc.wait(timeout=60)
    assert proc.returncode == 0, "".join(out)[-3000:]
    assert "RESULT stopped=done step=6 resumed_from=2" in out[-1]
    assert [ln.split()[1] for ln in out if ln.startswith("STEP")] == ["3", "4", "5", "6"]
    got = np.load(wd / "final_params_6.npz")
    want = T.flat_params(ref.state.params)
    assert sorted(got.files) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)   # bitwise
    recs = M.read_metrics(str(wd / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_0(tmp_path, jcc):
    wd = tmp_path / "run"
    proc = _toy_script(wd, "--steps", 6, "--checkpoint-every", 1000, "--sleep-from", 1, "--sleep", 2,
                       cache_dir=jcc)
    lines = _read_until(proc, "STEP 2")
    proc.send_signal(signal.SIGTERM)
    lines += proc.stdout.readlines()
    proc.wait(timeout=60)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    last = max(int(ln.split()[1]) for ln in lines if ln.startswith("STEP"))
    assert f"RESULT stopped=preempted step={last} resumed_from=None" in lines[-1]
    with C.Checkpointer(str(wd)) as ck:
        assert ck.all_steps() == [last]                       # only the preemption save (interval is 1000)
        r = ck.restore(last, _plan((2, 2, 2)).restore_target())
    assert int(r.state.step) == last and r.data_state == {"next_index": last}
    assert M.read_metrics(str(wd / "metrics.jsonl"))[-1]["step"] == last


def test_preemption_handler_flag_and_restore():
    from edit_r1_jax.train.preemption import PreemptionHandler
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as pre:
        assert not pre.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)          # caught: only sets the flag
        t0 = time.time()
        while not pre.requested and time.time() - t0 < 5:
            time.sleep(0.01)
        assert pre.requested and pre.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before   # previous handler back
    manual = PreemptionHandler()
    manual.request()
    assert manual.should_stop()


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, jax, jax.numpy as jnp, optax
    from edit_r1_jax.train import checkpoint as C, state as S
    params = {"w": jnp.ones((4096, 4096), jnp.float32), "b": jnp.ones((4096,), jnp.float32)}   # 64 MiB
    st = S.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0))
    ck = C.Checkpointer(sys.argv[1], save_every=1, keep=5)
    ck.save(1, st, data_state={"next_index": 1}); ck.wait()
    st2 = st.replace(step=st.step + 1, params=jax.tree.map(lambda x: x * 2, st.params))
    ck.save(2, st2, data_state={"next_index": 2})   # returns once the arrays are on the host; writing goes on
    os.kill(os.getpid(), signal.SIGKILL)            # die while step 2 is being written (kill -9: no cleanup)
""")


def test_checkpoint_killed_mid_save_is_never_half_written(tmp_path, jcc):
    script = tmp_path / "save.py"
    script.write_text(KILL_MID_SAVE)
    wd = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(wd)], capture_output=True, text=True, env=_env(jcc),
                          timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckdir = wd / "checkpoints"
    entries = os.listdir(ckdir)
    assert "1" in entries and "2" not in entries, entries        # step 2 was never finalized
    assert any("tmp" in e for e in entries), entries             # ...its partial write is in a tmp dir
    tx = __import__("optax").sgd(0.1)
    plan_mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
    abstract = jax.eval_shape(lambda: S.TrainState.create(
        params={"w": jnp.ones((4096, 4096)), "b": jnp.ones((4096,))}, tx=tx, rng=jax.random.PRNGKey(0)))
    sh = S.state_shardings(abstract, {"w": ("embed", "mlp"), "b": ("mlp",)}, plan_mesh)
    with C.Checkpointer(str(wd), save_every=1) as ck:
        assert ck.latest_step() == 1
        r = ck.restore(1, S.abstract_with_shardings(abstract, sh))
        assert not any("tmp" in e for e in os.listdir(ckdir))   # leftovers cleaned when the manager opened
    assert int(r.state.step) == 0 and r.data_state == {"next_index": 1}
    assert float(jnp.min(r.state.params["w"])) == 1.0 and float(jnp.max(r.state.params["w"])) == 1.0
