"""Generic train step: sharded == unsharded, gradient accumulation == one big batch, NaN guard, donation.

Numerics: fp32 params and compute, ``highest`` matmul precision; relative error = max|a - b| / max|b| per leaf.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_toy as T
from edit_r1_jax import parallel
from edit_r1_jax.train import state as S
from edit_r1_jax.train import step as ST

CFG = dict(lr=3e-2, warmup_steps=0, steps=10, weight_decay=0.1, grad_clip=1.0)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _unsharded_run(batches, grad_accum_steps=1, cfg=CFG):
    tx = S.make_optimizer(cfg)
    dev = jax.devices()[0]
    init = jax.jit(lambda k: S.TrainState.create(params=nn.meta.unbox(T.init_params(jax.random.fold_in(k, 0))),
                                                 tx=tx, rng=jax.random.fold_in(k, 1)), device=dev)
    st = init(jax.random.PRNGKey(0))
    step = ST.make_train_step(T.loss_fn, grad_accum_steps=grad_accum_steps, donate=False,
                              lr_schedule=S.make_lr_schedule(cfg))
    losses = []
    for b in batches:
        st, m = step(st, jax.device_put(b, dev))
        losses.append(float(m["loss"]))
    return st, losses


@pytest.fixture(scope="module")
def reference():
    with jax.default_matmul_precision("highest"):
        batches = [T.make_batch(s) for s in range(2)]
        return batches, _unsharded_run(batches)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)], ids=["2x2x2", "fsdp8"])
def test_sharded_step_equals_unsharded(reference, mesh_shape, highest_precision):
    batches, (ref_state, ref_losses) = reference
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    tx = S.make_optimizer(CFG)
    st, sh = S.create_sharded_state(T.init_params, tx, mesh, rng=jax.random.PRNGKey(0))
    step = ST.make_train_step(T.loss_fn, state_shardings=sh, mesh=mesh, lr_schedule=S.make_lr_schedule(CFG))
    losses = []
    first = st
    for b in batches:
        st, m = step(st, parallel.global_batch_from_local(b, mesh))
        losses.append(float(m["loss"]))
    # donation: the input state's buffers were handed to the step
    assert first.params["up"]["kernel"].is_deleted() and not st.params["up"]["kernel"].is_deleted()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(st.params)[0], jax.tree.leaves(ref_state.params)):
        assert _rel(a, b) <= 1e-6, (jax.tree_util.keystr(path), _rel(a, b))
    for a, b in zip(jax.tree.leaves(st.opt_state), jax.tree.leaves(ref_state.opt_state)):
        assert _rel(a, b) <= 2e-6   # Adam nu = sum of g^2: twice the gradients' relative error
    # shardings survive the step (in == out) and the state really is distributed
    assert jax.tree.map(lambda x: x.sharding, st) == sh
    assert st.params["up"]["kernel"].addressable_shards[0].data.size < st.params["up"]["kernel"].size


def test_grad_accumulation_equals_one_big_batch(reference, highest_precision):
    """Token-mean loss over ragged masks: weighted microbatch accumulation reproduces the full-batch step."""
    batches, (ref_state, ref_losses) = reference
    st, losses = _unsharded_run(batches, grad_accum_steps=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(ref_state.params)):
        assert _rel(a, b) <= 1e-6


def test_grad_accumulation_sharded(reference, highest_precision):
    batches, (ref_state, ref_losses) = reference
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    st, sh = S.create_sharded_state(T.init_params, S.make_optimizer(CFG), mesh, rng=jax.random.PRNGKey(0))
    step = ST.make_train_step(T.loss_fn, state_shardings=sh, mesh=mesh, grad_accum_steps=2)
    for b in batches:
        st, m = step(st, parallel.global_batch_from_local(b, mesh))
    assert float(m["loss"]) == pytest.approx(ref_losses[-1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(ref_state.params)):
        assert _rel(a, b) <= 1e-6
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        ST.make_train_step(T.loss_fn, grad_accum_steps=3, donate=False)(st, T.make_batch(0))


def _poisonable_loss(params, batch, rng):
    loss, aux = T.loss_fn(params, batch, rng)
    return loss * batch["scale"][0], aux   # scale = nan poisons loss and gradients


def test_nan_guard_skips_counts_and_stops():
    mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
    st, sh = S.create_sharded_state(T.init_params, S.make_optimizer(CFG), mesh, rng=jax.random.PRNGKey(0))
    step = ST.make_train_step(_poisonable_loss, state_shardings=sh, mesh=mesh, donate=False)

    def batch(scale):
        b = T.make_batch(0)
        b["scale"] = np.full((16,), scale, np.float32)
        return parallel.global_batch_from_local(b, mesh)

    good, m = step(st, batch(1.0))
    assert int(m["finite"]) == 1 and int(good.skipped_nonfinite) == 0
    before = jax.device_get(good)
    bad, m = step(good, batch(np.nan))
    assert int(m["finite"]) == 0 and int(bad.skipped_nonfinite) == 1 and int(bad.consecutive_nonfinite) == 1
    assert int(bad.step) == int(good.step) + 1
    for a, b in zip(jax.tree.leaves(jax.device_get(bad.params)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)   # update skipped: params bitwise unchanged
    for a, b in zip(jax.tree.leaves(jax.device_get(bad.opt_state)), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)   # and no NaN leaked into the Adam moments
    ST.check_nonfinite(m, max_consecutive=2)  # 1 < 2: no error
    bad2, m2 = step(bad, batch(np.inf))
    assert int(bad2.consecutive_nonfinite) == 2
    with pytest.raises(ST.NonFiniteError, match="2 consecutive"):
        ST.check_nonfinite(m2, max_consecutive=2, step=3)
    ok, m3 = step(bad2, batch(1.0))      # a finite step resets the streak, keeps the total
    assert int(ok.consecutive_nonfinite) == 0 and int(ok.skipped_nonfinite) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ok.params))
    assert not np.array_equal(np.asarray(ok.params["up"]["kernel"]), before.params["up"]["kernel"])
