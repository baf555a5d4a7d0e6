"""The native CPU decode kernel (`edit_r1_jax.native.panel_matmul`): built from source here, it equals the plain
product for every row count it tiles (1-8 rows per register tile, remainders, more than one tile), for output widths
that are and are not multiples of its 32-output panels; bad inputs and a missing compiler give clear errors.

Tolerances: fp32; the reference is the float64 product, and the kernel's error is that of an fp32 dot of length K
(|err| <= ~K * eps * sum|w x|, here below 1e-5 relative to the output's scale)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.native import build
from edit_r1_jax.native import panel_matmul as pm


def _case(rows, out, k, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((out, k)).astype(np.float32), rng.standard_normal((rows, k)).astype(np.float32))


@pytest.mark.parametrize("rows,out,k", [(1, 64, 32), (3, 70, 33), (8, 96, 512), (13, 40, 17), (64, 130, 100),
                                         (517, 200, 96)])
def test_panel_matmul_equals_float64_product(rows, out, k):
    assert pm.usable(), pm.unavailable_reason()
    w_ok, x_rk = _case(rows, out, k)
    want = x_rk.astype(np.float64) @ w_ok.astype(np.float64).T
    w_p = pm.pack_panels(jnp.asarray(w_ok))
    assert w_p.shape == (-(-out // 32), k, 32)
    got = np.asarray(jax.jit(pm.panel_matmul, static_argnums=2)(w_p, jnp.asarray(x_rk), out))
    assert got.shape == (rows, out)
    scale = np.abs(x_rk).astype(np.float64) @ np.abs(w_ok).astype(np.float64).T
    assert np.max(np.abs(got - want) / scale) < 1e-6


def test_pack_panels_round_trip_and_zero_padding():
    w_ok, _ = _case(1, 70, 9)
    w_p = np.asarray(pm.pack_panels(jnp.asarray(w_ok)))
    assert w_p.shape == (3, 9, 32)
    np.testing.assert_array_equal(w_p[1, :, 5], w_ok[32 + 5])                 # panel 1, output 5 = row 37
    assert not w_p[2, :, 70 - 64:].any()                                      # outputs 70..95 are padding
    np.testing.assert_array_equal(np.asarray(pm.unpack_panels(jnp.asarray(w_p), 70)), w_ok)


def test_panel_matmul_in_a_loop_and_sharing_the_thread_pool():
    """Two independent products per iteration (XLA may run them at once on its pool threads, each call then also
    schedules its helpers there) inside a while loop: same values as outside it."""
    w1, x = _case(8, 256, 64, seed=1)
    w2, _ = _case(8, 192, 64, seed=2)
    p1, p2 = pm.pack_panels(jnp.asarray(w1)), pm.pack_panels(jnp.asarray(w2))

    @jax.jit
    def loop(x):
        def body(i, acc):
            return acc + pm.panel_matmul(p1, x, 256)[:, :64] + pm.panel_matmul(p2, x, 192)[:, :64]
        return jax.lax.fori_loop(0, 5, body, jnp.zeros_like(x))
    want = 5 * (pm.panel_matmul(p1, jnp.asarray(x), 256)[:, :64] + pm.panel_matmul(p2, jnp.asarray(x), 192)[:, :64])
    np.testing.assert_allclose(np.asarray(loop(jnp.asarray(x))), np.asarray(want), rtol=1e-6, atol=1e-5)


def test_panel_matmul_rejects_bad_inputs():
    w_p = pm.pack_panels(jnp.ones((64, 16), jnp.float32))
    with pytest.raises(ValueError, match=r"x \(3, 15\) \(expected \[R, 16\]\)"):
        pm.panel_matmul(w_p, jnp.ones((3, 15), jnp.float32), 64)
    with pytest.raises(ValueError, match="out_features 65"):
        pm.panel_matmul(w_p, jnp.ones((3, 16), jnp.float32), 65)
    with pytest.raises(ValueError, match=r"expected \[P, K, 32\]"):
        pm.panel_matmul(jnp.ones((2, 16, 16), jnp.float32), jnp.ones((3, 16), jnp.float32), 32)
    with pytest.raises(ValueError, match="float32 only"):
        pm.panel_matmul(w_p.astype(jnp.bfloat16), jnp.ones((3, 16), jnp.bfloat16), 64)


def test_dense_panel_equals_dense():
    """common.DensePanel on `to_panels`-style kernel_p == nn.DenseGeneral on the kernel, for an o_proj-like
    projection ([H, hd] -> [D], two input axes), with a decode step's few rows and a prefill's many."""
    from edit_r1_jax.models.qwen2_5_vl import common
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((4, 5, 40)), jnp.float32)                    # [H, hd, D]
    kernel_p = pm.pack_panels(kernel.reshape(20, 40).T)
    for rows in (3, 100):
        x = jnp.asarray(rng.standard_normal((1, rows, 4, 5)), jnp.float32)
        with jax.default_matmul_precision("highest"):
            want = common.dense(40, (None,) * 3, use_bias=False, name="o", axis=(-2, -1)).apply(
                {"params": {"kernel": kernel}}, x)
            got = common.DensePanel(40, axis=(-2, -1)).apply({"params": {"kernel_p": kernel_p}}, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_build_reports_missing_compiler_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("EDIT_R1_JAX_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(build.NativeBuildError, match="no C\\+\\+ compiler: 'no-such-compiler-xyz'"):
        build.build_library(pm.SOURCE)
    monkeypatch.delenv("CXX")
    with pytest.raises(build.NativeBuildError, match="source missing"):
        build.build_library("no_such_kernel.cc")
    assert not os.listdir(tmp_path)                                    # nothing half-written left behind


def test_without_the_kernel_auto_decodes_with_xla(tmp_path):
    """With no compiler, "auto" falls back to XLA's weight-left product ("out_in") and says why (a fresh process:
    the kernel's load is cached per process)."""
    code = ("import logging; logging.basicConfig()\n"
            "from edit_r1_jax.native import panel_matmul as pm\n"
            "import sys; m = sys.modules['edit_r1_jax.models.qwen2_5_vl.generate']\n"
            "print(pm.usable(), m.resolve_decode_layout('auto'))\n")
    code = "import edit_r1_jax.models.qwen2_5_vl.generate\n" + code
    env = {**os.environ, "EDIT_R1_JAX_NATIVE_CACHE": str(tmp_path), "CXX": "no-such-compiler-xyz",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "out_in"]
    assert "native panel_matmul kernel unavailable" in res.stderr and "no-such-compiler-xyz" in res.stderr


def test_panel_layout_on_a_mesh(tmp_path):
    """On params sharded over a 2x2x2 mesh "auto" keeps XLA's product (the custom call has no partitioning rule);
    "panel" asked for explicitly still decodes correctly there (XLA gathers its operands): same tokens as the
    unsharded Flax-layout decode, log-probs within 1e-6."""
    import sys
    from edit_r1_jax import parallel
    from edit_r1_jax.models import qwen2_5_vl as q
    from edit_r1_jax.models.qwen2_5_vl import testing as T
    gen_lib = sys.modules["edit_r1_jax.models.qwen2_5_vl.generate"]
    T.tiny_torch_model(tie=False, seed=3).save_pretrained(str(tmp_path))
    cfg, params = q.load_pretrained(str(tmp_path))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = q.load_pretrained(str(tmp_path), mesh=mesh)
    assert gen_lib.resolve_decode_layout("auto", sharded) == "out_in"
    ids = np.array([[0, 0, 1, 5, 7, 3], [1, 9, 8, 7, 6, 5]])
    mask = (ids > 0).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        want = q.generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=[], decode_layout="in_out")
        got = q.generate(cfg, sharded, ids, mask, max_new_tokens=8, eos_token_id=[], decode_layout="panel")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6, rtol=0)
