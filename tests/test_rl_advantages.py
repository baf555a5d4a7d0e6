"""group_advantages, gcpo_rewards, gcpo_advantages vs NumPy references and hand cases (algorithms.md b2, b3, e1-e3).

dtype: float32 outputs vs float64 references written from the equations; tolerance rtol 1e-6, atol 1e-6.
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


# ---------------------------------------------------------------------------------------------- NumPy references
def ref_group_advantages(r, g, std="group", eps=1e-4, clip=5.0, ddof=0):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    global_sd = r.std(ddof=ddof) if len(r) > ddof else 0.0
    for gid in np.unique(g):
        idx = np.flatnonzero(g == gid)
        grp = r[idx]
        if np.all(grp == grp[0]):
            continue  # zero-variance group -> 0
        if std == "group":
            out[idx] = (grp - grp.mean()) / (grp.std(ddof=ddof) + eps)
        elif std == "global":
            out[idx] = (grp - grp.mean()) / (global_sd + eps)
        else:
            out[idx] = grp - grp.mean()
    return out if clip is None else np.clip(out, -clip, clip)


def ref_gcpo_rewards(w, l, non_tied=False):
    n = len(w)
    r_w, r_l = np.zeros(n), np.zeros(n)
    for j in range(n):
        wins = sum(1 for k in range(n) if w[j] > l[k])  # NaN comparisons are False
        dec = sum(1 for k in range(n) if w[j] > l[k] or w[j] < l[k])
        r_w[j] = wins / (max(dec, 1) if non_tied else n)
        losses = sum(1 for k in range(n) if l[j] < w[k])
        dec = sum(1 for k in range(n) if l[j] < w[k] or l[j] > w[k])
        r_l[j] = losses / (max(dec, 1) if non_tied else n)
    return r_w, r_l


# --------------------------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("std", ["group", "global", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("b,groups", [(6, 2), (24, 3), (17, 5)])
def test_group_advantages_matches_reference(std, ddof, b, groups):
    rng = np.random.default_rng(b + groups)
    r = rng.uniform(0, 10, size=b).astype(np.float32)
    ids = np.array([-7, 3, 1000003, 42, 5])[:groups]  # arbitrary ids, not 0..G-1
    g = rng.choice(ids, size=b)
    g[:groups] = ids
    r[g == 3] = 4.0  # one constant group
    got = rl.group_advantages(r, g, std=std, ddof=ddof)
    assert got.dtype == jnp.float32 and got.shape == (b,)
    np.testing.assert_allclose(got, ref_group_advantages(r, g, std, ddof=ddof), **TOL)
    got = rl.group_advantages(r, g, std=std, eps=1e-6, clip=None, ddof=ddof)
    np.testing.assert_allclose(got, ref_group_advantages(r, g, std, eps=1e-6, clip=None, ddof=ddof), **TOL)


def test_group_advantages_hand_case_constant_group():
    r = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0], np.float32)
    g = np.array([7, 7, 7, 3, 3, 3])
    a = np.asarray(rl.group_advantages(r, g))
    sd = math.sqrt(2 / 3)
    np.testing.assert_array_equal(a[:3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(a[3:], [-1 / (sd + 1e-4), 0.0, 1 / (sd + 1e-4)], rtol=1e-6, atol=1e-7)
    # a constant group with a value whose mean is inexact in float32 still gives exactly 0
    a = rl.group_advantages(np.full(3, 0.1, np.float32), np.zeros(3, int), std="none")
    np.testing.assert_array_equal(a, np.zeros(3))
    # clipping: one outlier in a large group
    r = np.zeros(40, np.float32)
    r[0] = 1.0
    a = rl.group_advantages(r, np.zeros(40, int), eps=0.0)
    assert float(a[0]) == 5.0


def test_group_advantages_under_jit_with_integer_ids():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(12).astype(np.float32)
    g = np.repeat(np.array([11, 29, 5]), 4).astype(np.int32)
    f = jax.jit(rl.group_advantages, static_argnames=("std", "eps", "clip"))
    np.testing.assert_allclose(f(r, jnp.asarray(g)), ref_group_advantages(r, g), **TOL)
    np.testing.assert_allclose(f(r, jnp.asarray(g), std="global"), ref_group_advantages(r, g, "global"), **TOL)
    # vmap over independent batches (e.g. one per device shard)
    r2 = np.stack([r, r[::-1]])
    out = jax.vmap(lambda rr: rl.group_advantages(rr, jnp.asarray(g)))(r2)
    np.testing.assert_allclose(out[1], ref_group_advantages(r[::-1], g), **TOL)
    w = np.stack([r[:4], r[4:8]])
    r_w, _ = jax.vmap(rl.gcpo_rewards)(w, w[::-1])
    np.testing.assert_allclose(r_w[0], ref_gcpo_rewards(w[0], w[1])[0], **TOL)


# --------------------------------------------------------------------------------------------------------- GCPO
def test_gcpo_hand_case_n3_with_ties():
    w = np.array([5.0, 3.0, 7.0], np.float32)
    l = np.array([3.0, 3.0, 8.0], np.float32)
    r_w, r_l = rl.gcpo_rewards(w, l)
    # w0=5 beats 3,3 -> 2/3; w1=3 ties 3,3 and loses to 8 -> 0; w2=7 beats 3,3 -> 2/3
    np.testing.assert_allclose(r_w, [2 / 3, 0.0, 2 / 3], rtol=1e-6)
    # l0=3 is below 5 and 7 (tie with 3 is not counted) -> 2/3; l1 likewise; l2=8 is below nothing -> 0
    np.testing.assert_allclose(r_l, [2 / 3, 2 / 3, 0.0], rtol=1e-6)
    assert float(r_w.mean()) == pytest.approx(float(r_l.mean()))
    # divide-by-non-tied variant: w1 has one decisive comparison (lost) -> 0; l0, l1 have two (both won) -> 1
    r_w, r_l = rl.gcpo_rewards(w, l, divide_by_non_tied=True)
    np.testing.assert_allclose(r_w, [2 / 3, 0.0, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(r_l, [1.0, 1.0, 0.0], rtol=1e-6)
    # advantages: mean-centred per group, no std
    a_w, a_l = rl.gcpo_advantages(*rl.gcpo_rewards(w, l))
    np.testing.assert_allclose(a_w, [2 / 9, -4 / 9, 2 / 9], rtol=1e-6)
    np.testing.assert_allclose(a_l, [2 / 9, 2 / 9, -4 / 9], rtol=1e-6)


def test_gcpo_hand_case_nan_never_wins_nor_loses():
    w = np.array([np.nan, 5.0, 5.0], np.float32)
    l = np.array([4.0, np.nan, 6.0], np.float32)
    r_w, r_l = rl.gcpo_rewards(w, l)
    np.testing.assert_allclose(r_w, [0.0, 1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(r_l, [2 / 3, 0.0, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(r_w)) and np.all(np.isfinite(r_l))
    r_w, r_l = rl.gcpo_rewards(w, l, divide_by_non_tied=True)  # NaN comparisons are not decisive
    np.testing.assert_allclose(r_w, [0.0, 1 / 2, 1 / 2], rtol=1e-6)
    np.testing.assert_allclose(r_l, [1.0, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("p,n", [(1, 2), (3, 4), (5, 8)])
@pytest.mark.parametrize("non_tied", [False, True])
def test_gcpo_rewards_batched_match_reference(p, n, non_tied):
    rng = np.random.default_rng(p * 10 + n)
    w = rng.integers(0, 6, size=(p, n)).astype(np.float32)
    l = rng.integers(0, 6, size=(p, n)).astype(np.float32)
    w[0, 0] = np.nan
    r_w, r_l = rl.gcpo_rewards(w, l, divide_by_non_tied=non_tied)
    assert r_w.shape == (p, n) and r_l.shape == (p, n) and r_w.dtype == jnp.float32
    for i in range(p):
        e_w, e_l = ref_gcpo_rewards(w[i], l[i], non_tied)
        np.testing.assert_allclose(r_w[i], e_w, **TOL)
        np.testing.assert_allclose(r_l[i], e_l, **TOL)


@pytest.mark.parametrize("std_norm", [False, True])
def test_gcpo_advantages_match_reference(std_norm):
    rng = np.random.default_rng(3)
    r_w = rng.uniform(size=(4, 6)).astype(np.float32)
    r_l = rng.uniform(size=(4, 6)).astype(np.float32)
    r_l[1] = 0.5  # constant group
    a_w, a_l = rl.gcpo_advantages(r_w, r_l, std_norm=std_norm)
    for got, r in ((a_w, r_w), (a_l, r_l)):
        r64 = r.astype(np.float64)
        exp = r64 - r64.mean(-1, keepdims=True)
        if std_norm:
            exp = exp / (r64.std(-1, keepdims=True) + 1e-6)
        exp[np.all(r == r[:, :1], axis=-1)] = 0.0
        np.testing.assert_allclose(got, exp, **TOL)
    np.testing.assert_array_equal(a_l[1], np.zeros(6))


# ---------------------------------------------------------------------------------------------- properties
_jit_group_adv = jax.jit(lambda r, g, std: rl.group_advantages(r, g, std=std, clip=None), static_argnames="std")
_jit_gcpo = jax.jit(rl.gcpo_rewards)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100, width=32), st.integers(0, 3)), min_size=1, max_size=16),
       st.sampled_from(["group", "none"]))
def test_property_group_advantages_zero_mean_per_group(items, std):
    r = np.array([x for x, _ in items], np.float32)
    g = np.array([gid for _, gid in items])
    # pad to a fixed B=16 with singleton groups (ids >= 100; they cannot affect the real groups) -> one compile
    pad = 16 - len(r)
    r_pad = np.concatenate([r, np.arange(pad, dtype=np.float32)])
    g_pad = np.concatenate([g, 100 + np.arange(pad)])
    a = np.asarray(_jit_group_adv(r_pad, g_pad, std=std), np.float64)[: len(r)]
    for gid in np.unique(g):
        grp = a[g == gid]
        scale = 1.0 if std == "group" else max(1.0, np.abs(r[g == gid]).max())
        assert abs(grp.mean()) <= 1e-5 * scale


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.integers(0, 4).map(float), st.just(float("nan"))), min_size=n, max_size=n),
    st.lists(st.one_of(st.integers(0, 4).map(float), st.just(float("nan"))), min_size=n, max_size=n))))
def test_property_gcpo_mean_reward_equal_in_both_groups(pair):
    w, l = (np.array(x, np.float32) for x in pair)
    r_w, r_l = _jit_gcpo(w, l)
    assert float(r_w.mean()) == pytest.approx(float(r_l.mean()), abs=1e-6)
    # and equals the fraction of correctly ordered (w, l) trace pairs
    correct = np.mean([[a > b for b in l] for a in w])
    assert float(r_w.mean()) == pytest.approx(correct, abs=1e-6)
    assert np.all((np.asarray(r_w) >= 0) & (np.asarray(r_w) <= 1))
