"""Multi-controller JAX: the RRM SFT loop on 2 processes x 4 CPU devices (gloo) against 1 process x 8 devices.

The 2-process job (mesh data=4 x fsdp=2, global batch 8, 3 steps, a checkpoint every step) runs the way a crashed
multi-host job does, which makes one job serve every check (the machine has 2 cores; each 2-process start compiles
the step twice):
  a. two plain processes (no launcher: it would kill the survivor itself); process 1 SIGKILLs itself after step 2,
     once checkpoint 1 is finalized. Process 0 must exit non-zero within a timeout, naming the dead task (the
     jax.distributed heartbeat, set low through EDIT_R1_HEARTBEAT_TIMEOUT_S), instead of hanging;
  b. the same command through launchers/local_multiprocess.sh resumes from checkpoint 1 and finishes steps 2-3.
Checks:
  1. losses (steps 1-3) and final params equal the 1-process x 8-device run's: relative error <= 1e-6 (params: of
     the whole vector, and <= 1e-5 per tensor; fp32, default matmul precision in both, same XLA flags);
  2. the final checkpoint restores in 1 process on another mesh (fsdp=4 x tensor=2) bit-exactly, and
     `edit-r1-jax export` of it loads in transformers with logits equal to our forward of the resharded params (fp32,
     highest precision, 1e-5);
  3. the dead process fails the other fast, and the rerun resumed from the last finalized checkpoint.
"""
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from edit_r1_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "helpers", "mp_sft_run.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
# tiny RRM, 16 records, global batch 8; every step checkpointed; one length bucket (all examples are < 320 tokens)
OVERRIDES = ["train.steps=3", "train.global_batch_size=8", "data.num_train=16", "data.num_eval=4",
             "train.eval_every=0", "mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=1", "train.checkpoint_every=1",
             "train.keep_checkpoints=3", "data.length_buckets=(320,)"]
# every training run is a subprocess compiled with the same flags (the LLVM optimization level changes fp32 last
# bits, so the 1-process reference must not run in this process); level 0 halves the CPU compile time. The launcher
# sets XLA_FLAGS to its device count only: the workers append these (tests/helpers/mp_sft_run.py).
from helpers.multiprocess_common import launch, subprocess_env  # noqa: E402
from helpers.multiprocess_common import load_safetensors_dir as _safetensors, read_metrics as _metrics  # noqa: E402
from helpers.multiprocess_common import compare_exports  # noqa: E402
HEARTBEAT_S = 10
DIE_AT = 2


def _overrides(tokenizer: str, extra=()) -> list[str]:
    return OVERRIDES + [f"rrm.tokenizer={tokenizer}", *extra]


def _cli_args(workdir: str, tokenizer: str) -> list[str]:
    args = ["sft", "--config", TINY, "--workdir", workdir]
    for o in _overrides(tokenizer):
        args += ["--set", o]
    return args


_env = subprocess_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_kill_process_1(workdir: str, tokenizer: str, logdir: str) -> dict:
    """Two plain processes, as on two hosts; process 1 dies after step DIE_AT. Returns return codes, logs, timing."""
    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):
        env = _env(EDIT_R1_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", EDIT_R1_NUM_PROCESSES="2",
                   EDIT_R1_PROCESS_ID=str(pid), EDIT_R1_LOCAL_DEVICE_COUNT="4",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   EDIT_R1_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
                   EDIT_R1_TEST_DIE_AT_STEP=str(DIE_AT), EDIT_R1_TEST_DIE_PROCESS="1")
        log = open(os.path.join(logdir, f"killed_run.proc{pid}.log"), "w+")
        procs.append(subprocess.Popen([sys.executable, HELPER, *_cli_args(workdir, tokenizer)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    rc0 = waited = None
    try:
        rc1 = procs[1].wait(timeout=420)
        died = time.monotonic()
        try:
            rc0 = procs[0].wait(timeout=HEARTBEAT_S + 90)
            waited = time.monotonic() - died
        except subprocess.TimeoutExpired:
            pass                                          # a hang: reported by the test
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    ckpts = os.path.join(workdir, "checkpoints")
    committed = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
    return dict(rc0=rc0, rc1=rc1, waited=waited, log0=out[0], log1=out[1], committed=committed)


def _launch(nproc: int, workdir: str, tokenizer: str, timeout: int) -> str:
    """launchers/local_multiprocess.sh N python mp_sft_run.py sft ...; nproc=0: one plain process with 8 devices.
    Returns the combined log (asserts rc 0)."""
    return launch(nproc, [sys.executable, HELPER, *_cli_args(workdir, tokenizer)], timeout, log_tail=4000)



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process job (killed, then rerun through the launcher) and the 1-process x 8-device run."""
    from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
    base = tmp_path_factory.mktemp("mp_sft")
    tokenizer = str(base / "tokenizer")
    ensure_world_tokenizer(tokenizer)            # built once, shared by every run (as rrm.tokenizer)
    two, one = str(base / "two_proc"), str(base / "one_proc")
    t0 = time.monotonic()
    killed = _run_and_kill_process_1(two, tokenizer, str(base))
    t_killed = time.monotonic() - t0
    resumed_log, t_resumed = None, float("nan")
    if killed["rc1"] == -9:                       # otherwise test_dead_process_fails_the_other_fast says why
        t0 = time.monotonic()
        resumed_log = _launch(2, two, tokenizer, timeout=420)
        t_resumed = time.monotonic() - t0
    t0 = time.monotonic()
    one_log = _launch(0, one, tokenizer, timeout=420)
    t_one = time.monotonic() - t0
    assert "Mesh(data=4, fsdp=2, tensor=1) over 8 devices" in one_log and "[proc 1]" not in one_log, one_log[-3000:]
    print(f"killed 2-process run {t_killed:.0f} s, rerun {t_resumed:.0f} s, 1-process run {t_one:.0f} s; process 0 "
          f"exited {killed['waited']} s after process 1 died")
    return dict(base=base, tokenizer=tokenizer, two=two, one=one, killed=killed, resumed_log=resumed_log)


@pytest.mark.slow
@pytest.mark.multihost
def test_dead_process_fails_the_other_fast(runs):
    k = runs["killed"]
    assert k["rc1"] == -9 and f"kills itself (SIGKILL) after step {DIE_AT}; checkpoint {DIE_AT - 1} finalized: True" \
        in k["log1"], k["log1"][-3000:]
    assert k["rc0"] is not None, f"process 0 still running {HEARTBEAT_S + 90} s after process 1 died (hang)\n" + \
        k["log0"][-3000:]
    assert k["rc0"] != 0, k["log0"][-3000:]
    # the survivor names the cause: the coordination service's heartbeat (or the JAX client's fatal-error) message
    assert re.search(r"heartbeat timeout|stopped sending heartbeats|another task died", k["log0"]), k["log0"][-3000:]
    assert k["committed"] == [DIE_AT - 1]             # step DIE_AT was never committed


@pytest.mark.slow
@pytest.mark.multihost
def test_rerun_resumes_from_last_checkpoint(runs):
    log = runs["resumed_log"]
    assert log is not None, "the killed run did not go as planned (see test_dead_process_fails_the_other_fast)"
    assert f"resumed from step {DIE_AT - 1}" in log, log[-3000:]
    # really two JAX processes of 4 devices each, on one 8-device mesh
    for i in (0, 1):
        assert re.search(rf"\[proc {i}\].*Mesh\(data=4, fsdp=2, tensor=1\) over 8 devices", log), log[-3000:]
    # metrics.jsonl is written once (process 0), one row a step; the dead run's rows after the checkpoint are dropped
    assert [r["step"] for r in _metrics(runs["two"])] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_equal_one_process(runs):
    assert runs["resumed_log"] is not None, "the 2-process job did not finish"
    two, one = _metrics(runs["two"]), _metrics(runs["one"])
    assert [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        for k in ("loss", "grad_norm", "token_acc"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(abs(b[k]), 1e-6), (a["step"], k, a[k], b[k])
        assert a["tokens"] == b["tokens"]             # the same global batch
    assert two[-1]["loss"] != two[0]["loss"]          # it trained
    # final params (the hf/ exports, written by process 0 from the all-gathered params): relative error of the whole
    # parameter vector <= 1e-6; per tensor <= 1e-5 (measured: ~5e-9 overall, worst tensor ~7e-7, a k_proj bias:
    # biases start at 0, so after 3 Adam steps they are sums of per-element normalized updates, the most sensitive
    # values to the last-bit differences of the gradient all-reduce, gloo across processes vs in-process)
    overall, worst, worst_err = compare_exports(os.path.join(runs["two"], "hf"), os.path.join(runs["one"], "hf"))
    assert overall <= 1e-6
    assert worst_err <= 1e-5, (worst, worst_err)


@pytest.mark.slow
@pytest.mark.multihost
def test_checkpoint_restores_on_another_mesh_and_exports(runs, tmp_path, highest_precision):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from edit_r1_jax import cli, parallel
    from edit_r1_jax.models import qwen2_5_vl as qwen
    from edit_r1_jax.models.qwen2_5_vl import testing
    from edit_r1_jax.train import checkpoint as ckpt_lib
    from edit_r1_jax.train import sft
    from edit_r1_jax.train import state as state_lib
    from edit_r1_jax.train.export import export_rrm_hf
    from edit_r1_jax.train.rrm_setup import build_rrm

    assert runs["resumed_log"] is not None, "the 2-process job did not finish"
    cfg = config_lib.get_config(TINY, _overrides(runs["tokenizer"], ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]),
                                num_devices=jax.device_count())
    setup = build_rrm(cfg, str(tmp_path))
    mesh = parallel.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    plan = state_lib.plan_sharded_state(setup.init_params, state_lib.make_optimizer(cfg.train), mesh,
                                        parallel.rules_from_config(cfg), rng=jax.random.PRNGKey(0),
                                        param_logical_axes=setup.param_logical_axes())
    ckpt = ckpt_lib.Checkpointer(runs["two"], async_save=False)
    try:
        assert ckpt.latest_step() == 3
        restored = ckpt.restore(3, plan.restore_target())
    finally:
        ckpt.close()
    assert restored.data_state and restored.config["mesh"]["fsdp"] == 2     # what the 2-process run saved
    params = restored.state.params
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs   # really resharded
    assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in jax.tree.leaves(params))

    # `edit-r1-jax export` of the 2-process checkpoint (its own job: params-only restore on one device) writes the
    # weights the training run exported, and the resharded restore holds exactly those values
    out = str(tmp_path / "hf_export")
    assert cli.main(["export", "--checkpoint", runs["two"], "--to", "hf", "--out", out]) == 0
    exported, trained = _safetensors(out), _safetensors(os.path.join(runs["two"], "hf"))
    assert sorted(exported) == sorted(trained)
    for k in trained:
        np.testing.assert_array_equal(exported[k], trained[k], err_msg=k)
    export_rrm_hf(setup, params, str(tmp_path / "hf_resharded"))     # one process: it is process 0 and writes
    resharded = _safetensors(str(tmp_path / "hf_resharded"))
    for k in trained:                                 # restore onto another mesh is exact
        np.testing.assert_array_equal(resharded[k], trained[k], err_msg=k)

    # transformers loads the export; its logits equal our forward of the restored (fsdp x tensor sharded) params
    rec = sft.sft_records(cfg, "eval")[0]
    ex = sft.sft_tokenize_fn(setup)(rec)
    ids = ex["input_ids"][None].astype(np.int64)                       # [1, T]
    pv = ex["pixel_values"].reshape(-1, ex["pixel_values"].shape[-1])  # [P, D]
    grid = setup.grid(1)                                               # [2, 3]: source and edited image
    qcfg = setup.cfg
    with mesh:
        ours = np.asarray(jax.jit(lambda p: qwen.forward(qcfg, p, ids, np.ones_like(ids), pv, grid))(params))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                    pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                    mm_token_type_ids=torch.tensor(testing.mm_token_type_ids(ids, qcfg.image_token_id))).logits.numpy()
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), err


def test_world_tokenizer_built_by_concurrent_processes(tmp_path):
    """Every process of a multi-process run may build the tokenizer in the same directory at once: each trains into
    its own temporary directory and renames it into place, so all of them load a complete tokenizer."""
    from concurrent.futures import ThreadPoolExecutor
    from transformers import AutoTokenizer, Qwen2TokenizerFast  # noqa: F401 - lazy imports are not thread-safe
    from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
    d = str(tmp_path / "tokenizer")
    with ThreadPoolExecutor(3) as pool:
        toks = list(pool.map(lambda _: ensure_world_tokenizer(d, vocab_size=400, n_records=10), range(3)))
    assert all(len(t) == 400 and t.get_vocab() == toks[0].get_vocab() for t in toks)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]          # the losers' temporary directories are gone
