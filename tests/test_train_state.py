"""TrainState, optimizer factory (against torch.optim.AdamW), trainable masks, dtype policy, state shardings."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import train_toy as T
from edit_r1_jax import parallel
from edit_r1_jax.train import state as S


def _plain_params(seed=0):
    return jax.device_get(jax.jit(lambda k: nn.meta.unbox(T.init_params(k)))(jax.random.PRNGKey(seed)))


def test_lr_schedule_warmup_then_cosine():
    cfg = dict(lr=2e-3, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    sched = S.make_lr_schedule(cfg)
    for t in range(0, 25):
        if t < 4:
            want = 2e-3 * t / 4
        else:
            prog = min(t - 4, 16) / 16
            want = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t
    const = S.make_lr_schedule(dict(lr=1e-3, warmup_steps=2, schedule="constant"))
    assert [float(const(t)) for t in (0, 1, 2, 10)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="schedule"):
        S.make_lr_schedule(dict(schedule="linear"))


def test_optimizer_matches_torch_adamw_with_clip_and_schedule():
    """5 steps of our AdamW(+clip, warmup/cosine, decay on matrices only) vs torch.optim.AdamW + clip_grad_norm_ +
    LambdaLR on the same random gradients, fp32: params agree to 1e-5 relative."""
    torch = pytest.importorskip("torch")
    cfg = dict(lr=1e-2, warmup_steps=2, steps=6, weight_decay=0.1, grad_clip=0.5, b1=0.9, b2=0.95, eps=1e-8)
    params = {"w": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),
              "b": np.random.default_rng(1).normal(size=(3,)).astype(np.float32)}
    grads = [{k: np.random.default_rng(10 + i).normal(size=v.shape).astype(np.float32) * (3.0 if i == 1 else 0.2)
              for k, v in params.items()} for i in range(5)]
    tx = S.make_optimizer(cfg)
    p = jax.tree.map(jnp.asarray, params)
    o = jax.jit(tx.init)(p)

    @jax.jit
    def upd(g, o, p):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o
    for g in grads:
        p, o = upd(g, o, p)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.1}, {"params": [tp["b"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)

    def lam(t):
        if t < 2:
            return t / 2
        return 0.5 * (1 + math.cos(math.pi * min(t - 2, 4) / 4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
        opt.step()
        sched.step()
    for k in params:
        ours, ref = np.asarray(p[k]), tp[k].detach().numpy()
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), k


def test_mask_from_regex_and_frozen_leaves_do_not_move():
    params = _plain_params()
    frozen = S.mask_from_regex(params, [r"^embedding$", r"^norm/"])
    assert frozen["embedding"] and frozen["norm"]["scale"] and frozen["norm"]["bias"]
    assert not frozen["up"]["kernel"] and not frozen["head"]["kernel"]
    trainable = jax.tree.map(lambda f: not f, frozen)
    tx = S.make_optimizer(dict(lr=1e-1, warmup_steps=0, steps=10, weight_decay=0.1), trainable_mask=trainable)
    st = jax.jit(lambda p: S.TrainState.create(params=p, tx=tx, rng=jax.random.PRNGKey(0)))(params)
    # frozen leaves carry no Adam moments
    n_moment = sum(x.size for x in jax.tree.leaves(st.opt_state) if getattr(x, "ndim", 0) > 0)
    assert n_moment == 2 * S.count_params(params, trainable)
    grads = jax.tree.map(jnp.ones_like, st.params)
    new = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))(grads, st.opt_state, st.params)
    np.testing.assert_array_equal(new["embedding"], params["embedding"])
    np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])
    assert not np.allclose(new["up"]["kernel"], params["up"]["kernel"])
    with pytest.raises(ValueError, match="trainable_mask"):
        bad = S.make_optimizer(dict(lr=1.0), trainable_mask={"up": True})
        bad.init(st.params)


def test_train_state_create_and_rng():
    tx = S.make_optimizer(dict(lr=1e-3))
    st = S.TrainState.create(params={"w": jnp.ones((2,))}, tx=tx, rng=jax.random.key(3))
    assert st.rng.dtype == jnp.uint32 and st.rng.shape == (2,)
    assert int(st.step) == 0 and int(st.skipped_nonfinite) == 0
    k0 = st.step_rng()
    k1 = st.replace(step=st.step + 1).step_rng()
    assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
    with pytest.raises(ValueError, match="uint32"):
        S.TrainState.create(params={}, tx=tx, rng=jnp.zeros((3,), jnp.uint32))


def test_dtype_policy_from_config():
    pol = S.DTypePolicy.from_config({"dtype": {"param": "float32", "compute": "auto"}}, platform="tpu")
    assert pol.compute_dtype == jnp.bfloat16 and pol.param_dtype == jnp.float32 and pol.logits_dtype == jnp.float32
    assert S.DTypePolicy.from_config({}, platform="cpu").compute_dtype == jnp.float32
    pol = S.DTypePolicy.from_config({"dtype": {"compute": "bf16"}}, platform="cpu")
    cast = pol.cast_for_compute({"x": jnp.ones(2), "i": jnp.ones(2, jnp.int32)})
    assert cast["x"].dtype == jnp.bfloat16 and cast["i"].dtype == jnp.int32
    with pytest.raises(ValueError, match="dtype.compute"):
        S.DTypePolicy.from_config({"dtype": {"compute": "float8"}})


@pytest.mark.parametrize("mesh_shape,masked", [((2, 2, 2), False), ((1, 8, 1), True)])
def test_sharded_state_optimizer_follows_params(mesh_shape, masked):
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    mask = (lambda p: jax.tree.map(lambda f: not f, S.mask_from_regex(p, [r"^norm/"]))) if masked else None
    tx = S.make_optimizer(dict(lr=1e-3, weight_decay=0.1), trainable_mask=mask)
    st, sh = S.create_sharded_state(T.init_params, tx, mesh, rng=jax.random.PRNGKey(0))
    logical = {"embedding": ("vocab", "embed"), "up": {"kernel": ("embed", "mlp")}, "head": {"kernel": ("embed",
                                                                                                      "vocab")}}
    for path, want_logical in [(("embedding",), logical["embedding"]), (("up", "kernel"), logical["up"]["kernel"]),
                               (("head", "kernel"), logical["head"]["kernel"])]:
        leaf = st.params
        for k in path:
            leaf = leaf[k]
        want = parallel.fit_spec_to_shape(parallel.logical_to_mesh_spec(want_logical, parallel.DEFAULT_RULES),
                                          leaf.shape, mesh)
        assert leaf.sharding.spec == want, (path, leaf.sharding.spec, want)
    # every Adam moment lives exactly where its param lives; scalars are replicated
    p_paths = {tuple(str(k) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(st.params)[0]}
    n_checked = 0
    for path, x in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]:
        keys = tuple(str(k) for k in path)
        if x.ndim == 0:
            assert x.sharding.spec == P(), keys
            continue
        match = [pk for pk in p_paths if keys[-len(pk):] == pk]
        assert match, keys
        assert x.sharding == p_paths[match[0]].sharding, keys
        n_checked += 1
    assert n_checked == 2 * (8 - (2 if masked else 0))
    assert st.step.sharding.spec == P() and st.rng.sharding.spec == P()
    if mesh_shape == (1, 8, 1):  # fsdp=8: each device holds 1/8 of the embedding and its moments
        emb = st.params["embedding"]
        assert emb.addressable_shards[0].data.size * 8 == emb.size


def test_state_shardings_leaf_count_mismatch_is_clear():
    mesh = parallel.make_mesh(dict(data=-1))
    tx = S.make_optimizer(dict(lr=1e-3))
    abstract = jax.eval_shape(lambda: S.TrainState.create(params={"a": jnp.ones(2), "b": jnp.ones(2)}, tx=tx,
                                                          rng=jax.random.PRNGKey(0)))
    with pytest.raises(ValueError):
        S.state_shardings(abstract, {"a": P()}, mesh)
