"""flow_sde_step / ode_step against NumPy float64 references written from algorithms.md b3/b4 (not from the code).

dtype: float32 outputs vs float64 references; tolerance rtol 1e-6 with atol 1e-6 (elementwise ops only).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edit_r1_jax import rl

TOL = dict(rtol=1e-6, atol=1e-6)
SHAPES = [(2, 5), (3, 4, 6), (2, 3, 4, 5)]


# ---------------------------------------------------------------------------------------------- NumPy reference
def ref_flow_step(x, v, sig, sig_next, a, sig_max, eps=None, prev=None, kind="sde"):
    """float64 reference of one step; sig, sig_next, a, sig_max are per-sample vectors [B]."""
    x = x.astype(np.float64)
    v = v.astype(np.float64)
    col = lambda s: np.asarray(s, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731
    sig, sig_next, a, sig_max = col(sig), col(sig_next), col(a), col(sig_max)
    dt = sig_next - sig
    if kind == "sde":
        denom_sig = np.where(sig == 1.0, sig_max, sig)
        s_t = a * np.sqrt(sig / (1.0 - denom_sig))
        drift = v + s_t**2 / (2.0 * sig) * (x + (1.0 - sig) * v)  # dx = [v + s^2/(2 sigma)(x + (1-sigma)v)] dsigma
        mean = x + drift * dt
        n = s_t * np.sqrt(-dt)
    elif kind == "dance":
        s_t = a + 0.0 * sig
        x0 = x - sig * v
        score = -(x - (1.0 - sig) * x0) / sig**2
        mean = x + dt * (v - 0.5 * a**2 * score)
        n = a * np.sqrt(-dt)
    else:  # cps
        s_t = sig_next * np.sin(a * np.pi / 2)
        x0, x1 = x - sig * v, x + (1.0 - sig) * v
        mean = (1.0 - sig_next) * x0 + np.sqrt(sig_next**2 - s_t**2) * x1
        n = s_t
    if prev is None:
        prev = mean + n * eps.astype(np.float64)
    prev = prev.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    if kind == "cps":
        lp = np.mean(-((prev - mean) ** 2), axis=axes)
    else:
        lp = np.mean(-0.5 * np.log(2 * np.pi * n**2) - (prev - mean) ** 2 / (2 * n**2), axis=axes)
    return prev, lp, mean, np.broadcast_to(s_t, sig.shape).reshape(-1)


def _inputs(shape, seed, first_is_one=True):
    rng = np.random.default_rng(seed)
    b = shape[0]
    x = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    sigmas, _ = rl.flux_sigmas(6, 1024)
    idx = rng.integers(0, 6, size=b)
    if first_is_one:
        idx[0] = 0  # one sample on the sigma == 1 step
    sig = sigmas[idx]
    sig_next = sigmas[idx + 1]
    a = rng.uniform(0.3, 1.0, size=b).astype(np.float32)
    return x, v, eps, sig, sig_next, a, np.float32(sigmas[1])


# ---------------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("kind", ["sde", "dance", "cps"])
@pytest.mark.parametrize("shape", SHAPES)
def test_step_matches_numpy_reference(kind, shape):
    x, v, eps, sig, sig_next, a, sig_max = _inputs(shape, seed=len(shape) * 7 + len(kind))
    prev, lp, mean, std = rl.flow_sde_step(x, v, sig, sig_next, a, sigma_max=sig_max, noise=eps, sde_type=kind)
    r_prev, r_lp, r_mean, r_std = ref_flow_step(x, v, sig, sig_next, a, np.full_like(sig, sig_max), eps=eps, kind=kind)
    for got in (prev, lp, mean, std):
        assert got.dtype == jnp.float32
    assert prev.shape == shape and mean.shape == shape and lp.shape == (shape[0],) and std.shape == (shape[0],)
    np.testing.assert_allclose(mean, r_mean, **TOL)
    np.testing.assert_allclose(prev, r_prev, **TOL)
    np.testing.assert_allclose(std, r_std, **TOL)
    np.testing.assert_allclose(lp, r_lp, **TOL)

    # evaluating a given x' (and a fresh one) matches the reference too
    other = (x + 0.1).astype(np.float32)
    _, lp2, _, _ = rl.flow_sde_step(x, v, sig, sig_next, a, sigma_max=sig_max, prev_sample=other, sde_type=kind)
    _, r_lp2, _, _ = ref_flow_step(x, v, sig, sig_next, a, np.full_like(sig, sig_max), prev=other, kind=kind)
    np.testing.assert_allclose(lp2, r_lp2, **TOL)


def test_scalar_sigmas_broadcast_like_vectors():
    x, v, eps, _, _, _, _ = _inputs((3, 4, 2), seed=1)
    a = rl.flow_sde_step(x, v, 0.7, 0.5, 0.9, noise=eps)
    b = rl.flow_sde_step(x, v, np.full(3, 0.7), np.full(3, 0.5), np.full(3, 0.9), noise=eps)
    for u, w in zip(a, b):
        np.testing.assert_array_equal(u, w)


def test_ode_step_matches_reference():
    x, v, _, sig, sig_next, _, _ = _inputs((3, 5, 2), seed=2)
    got = rl.ode_step(x, v, sig, sig_next)
    ref = x.astype(np.float64) + (sig_next - sig).astype(np.float64)[:, None, None] * v
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, **TOL)


def test_sigma_max_default_is_sigma_next_on_first_step():
    sigmas, _ = rl.flux_sigmas(6, 4096)
    x, v, eps, *_ = _inputs((2, 8), seed=3)
    with_max = rl.flow_sde_step(x, v, sigmas[0], sigmas[1], 0.9, sigma_max=sigmas[1], noise=eps)
    default = rl.flow_sde_step(x, v, sigmas[0], sigmas[1], 0.9, noise=eps)
    for u, w in zip(with_max, default):
        np.testing.assert_array_equal(u, w)
    assert np.all(np.isfinite(default[1]))


def test_hand_computed_sde_step():
    # B=1, one element: x=1, v=2, sigma=0.5, sigma_next=0.25, a=1 -> s_t = sqrt(0.5/0.5) = 1, dt = -0.25
    # mean = 1*(1 + 1/(2*.5)*(-.25)) + 2*(1 + 1*.5/(2*.5))*(-.25) = 0.75 - 0.75 = 0.0;  n = 1*sqrt(.25) = 0.5
    # eps = 2 -> x' = 1.0;  log p = -(1)^2/(2*.25) - log(.5) - .5 log(2 pi)
    prev, lp, mean, std = rl.flow_sde_step(
        np.array([[1.0]]), np.array([[2.0]]), 0.5, 0.25, 1.0, noise=np.array([[2.0]])
    )
    np.testing.assert_allclose(mean, [[0.0]], atol=1e-7)
    np.testing.assert_allclose(prev, [[1.0]], atol=1e-7)
    np.testing.assert_allclose(std, [1.0], atol=1e-7)
    np.testing.assert_allclose(lp, [-2.0 - math.log(0.5) - 0.5 * math.log(2 * math.pi)], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- noise_level 0
@pytest.mark.parametrize("kind", ["sde", "dance", "cps"])
def test_noise_level_zero_is_deterministic_ode_step(kind):
    x, v, eps, sig, sig_next, _, sig_max = _inputs((3, 4, 5), seed=4)
    zero = np.zeros(3, np.float32)
    prev, lp, mean, std = rl.flow_sde_step(x, v, sig, sig_next, zero, sigma_max=sig_max, noise=eps, sde_type=kind)
    ode = rl.ode_step(x, v, sig, sig_next)
    np.testing.assert_allclose(mean, ode, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(prev, mean)
    np.testing.assert_array_equal(lp, np.zeros(3))  # defined as 0 (sde/dance); exact 0 for cps's drawn sample
    np.testing.assert_array_equal(std, np.zeros(3))

    # no NaN in gradients either (the unused Gaussian branch divides by 0 unless guarded)
    def f(vel):
        p, l, m, _ = rl.flow_sde_step(x, vel, sig, sig_next, 0.0, sigma_max=sig_max, noise=eps, sde_type=kind)
        return l.sum() + m.sum()

    g = jax.grad(f)(jnp.asarray(v))
    assert np.all(np.isfinite(g))


def test_noise_level_zero_given_prev_sample():
    x, v, _, sig, sig_next, _, sig_max = _inputs((2, 6), seed=5)
    other = x + 1.0
    _, lp, _, _ = rl.flow_sde_step(x, v, sig, sig_next, 0.0, sigma_max=sig_max, prev_sample=other)
    np.testing.assert_array_equal(lp, np.zeros(2))
    _, lp_cps, mean_cps, _ = rl.flow_sde_step(x, v, sig, sig_next, 0.0, prev_sample=other, sde_type="cps")
    np.testing.assert_allclose(lp_cps, -np.mean((other - np.asarray(mean_cps)) ** 2, axis=1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- gradients, jit
def test_log_prob_gradient_flows_through_mean_only():
    # d lp / d v = c_v * (x' - mean) / (n^2 D) with c_v = (1 + s^2 (1 - sigma)/(2 sigma)) dt, x' held fixed
    x, v, eps, sig, sig_next, a, sig_max = _inputs((2, 3, 4), seed=6)
    prev = rl.flow_sde_step(x, v, sig, sig_next, a, sigma_max=sig_max, noise=eps)[0]

    def lp_of(vel):
        return rl.flow_sde_step(x, vel, sig, sig_next, a, sigma_max=sig_max, prev_sample=prev)[1].sum()

    # tolerance 1e-5: the float32 gradient contains x' - mean, a difference of two rounded float32 values
    g = np.asarray(jax.jit(jax.grad(lp_of))(jnp.asarray(v + 0.05)), np.float64)
    _, _, mean, s = ref_flow_step(x, v + 0.05, sig, sig_next, a, np.full_like(sig, sig_max), prev=np.asarray(prev))
    col = lambda z: np.asarray(z, np.float64)[:, None, None]  # noqa: E731
    dt = col(sig_next) - col(sig)
    c_v = (1 + col(s) ** 2 * (1 - col(sig)) / (2 * col(sig))) * dt
    n2 = col(s) ** 2 * (-dt)
    expected = c_v * (np.asarray(prev, np.float64) - mean) / (n2 * 12)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)

    # drawing and evaluating in one call: x' is detached inside the log-prob, so the gradient is the same form
    def lp_drawn(vel):
        return rl.flow_sde_step(x, vel, sig, sig_next, a, sigma_max=sig_max, noise=eps)[1].sum()

    g2 = np.asarray(jax.jit(jax.grad(lp_drawn))(jnp.asarray(v)), np.float64)
    expected2 = (1 + col(s) ** 2 * (1 - col(sig)) / (2 * col(sig))) * dt * (col(s) * np.sqrt(-dt) * eps) / (n2 * 12)
    np.testing.assert_allclose(g2, expected2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sde", "dance", "cps"])
def test_jit_and_vmap(kind):
    x, v, eps, sig, sig_next, a, sig_max = _inputs((2, 3, 4), seed=7)
    step = jax.jit(rl.flow_sde_step, static_argnames="sde_type")
    eager = rl.flow_sde_step(x, v, sig, sig_next, a, sig_max, eps, sde_type=kind)
    jitted = step(x, v, sig, sig_next, a, sig_max, eps, sde_type=kind)
    for u, w in zip(eager, jitted):
        np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-6)
    # vmap over an extra leading axis of 2 independent batches
    xs, vs, es = (np.stack([z, z * 0.5]) for z in (x, v, eps))
    vm = jax.vmap(lambda xx, vv, ee: rl.flow_sde_step(xx, vv, sig, sig_next, a, sig_max, ee, sde_type=kind))
    out = vm(xs, vs, es)
    for i in range(2):
        single = rl.flow_sde_step(xs[i], vs[i], sig, sig_next, a, sig_max, es[i], sde_type=kind)
        for u, w in zip(out, single):
            np.testing.assert_allclose(u[i], w, rtol=1e-6, atol=1e-6)


def test_bf16_inputs_compute_in_float32():
    x, v, eps, sig, sig_next, a, sig_max = _inputs((2, 8), seed=8)
    out = rl.flow_sde_step(jnp.asarray(x, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), sig, sig_next, a,
                           sig_max, eps)
    assert all(o.dtype == jnp.float32 for o in out)


def test_errors_name_the_problem():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="sde_type"):
        rl.flow_sde_step(x, x, 0.5, 0.4, 0.7, noise=x, sde_type="ddim")
    with pytest.raises(ValueError, match="velocity"):
        rl.flow_sde_step(x, np.zeros((2, 4)), 0.5, 0.4, 0.7, noise=x)
    with pytest.raises(ValueError, match="noise"):
        rl.flow_sde_step(x, x, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="sigma"):
        rl.flow_sde_step(x, x, np.ones(3) * 0.5, 0.4, 0.7, noise=x)


# ---------------------------------------------------------------------------------------------- properties
_step_cases = st.tuples(
    st.sampled_from(["sde", "dance"]),
    st.integers(0, 5),  # step index in a 6-step schedule (0 is sigma == 1)
    st.floats(0.05, 1.5),  # noise level
    st.integers(0, 2**31 - 1),
    st.sampled_from(SHAPES),
)


@settings(max_examples=30, deadline=None)
@given(_step_cases)
def test_property_drawn_sample_log_prob_is_gaussian_density(case):
    kind, i, a, seed, shape = case
    sigmas, _ = rl.flux_sigmas(6, 4096)
    rng = np.random.default_rng(seed)
    x, v, eps = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    prev, lp, mean, std = rl.flow_sde_step(x, v, sigmas[i], sigmas[i + 1], a, sigma_max=sigmas[1], noise=eps,
                                           sde_type=kind)
    # x' - mean = n * eps with n = std * sqrt(-dt): log N(x'; mean, n^2) = -eps^2/2 - log n - log(2 pi)/2
    n = np.asarray(std, np.float64) * math.sqrt(float(sigmas[i]) - float(sigmas[i + 1]))
    axes = tuple(range(1, len(shape)))
    analytic = np.mean(-0.5 * eps.astype(np.float64) ** 2, axis=axes) - np.log(n) - 0.5 * math.log(2 * math.pi)
    # 1e-5: x' = mean + n eps is rounded to float32 before x' - mean is formed, which costs ~|mean|/n ulps
    np.testing.assert_allclose(lp, analytic, rtol=1e-5, atol=1e-5)
    # and re-evaluating the stored x' reproduces the log-prob and mean that drew it
    _, lp2, mean2, std2 = rl.flow_sde_step(x, v, sigmas[i], sigmas[i + 1], a, sigma_max=sigmas[1], prev_sample=prev,
                                           sde_type=kind)
    np.testing.assert_allclose(lp2, lp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(std2, std)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 5), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_property_cps_prev_sample_reproduces_log_prob(i, a, seed):
    sigmas, _ = rl.flux_sigmas(6, 1024)
    rng = np.random.default_rng(seed)
    x, v, eps = (rng.standard_normal((2, 4, 3)).astype(np.float32) for _ in range(3))
    prev, lp, mean, std = rl.flow_sde_step(x, v, sigmas[i], sigmas[i + 1], a, noise=eps, sde_type="cps")
    np.testing.assert_allclose(lp, -np.mean((np.asarray(std)[:, None, None] * eps) ** 2, axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    _, lp2, _, _ = rl.flow_sde_step(x, v, sigmas[i], sigmas[i + 1], a, prev_sample=prev, sde_type="cps")
    np.testing.assert_allclose(lp2, lp, rtol=1e-6, atol=1e-7)
