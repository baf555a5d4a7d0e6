"""RRM SFT train step on the tiny Qwen2.5-VL reward model: sharded == unsharded (issue #7).

The step under test is the one the SFT loop runs (``sft.make_task`` -> ``step.make_train_step`` with the
``plan_sharded_state`` shardings): 2 AdamW steps on 2 fixed batches of 8 synthetic SFT examples (two 56x56 images
each, ragged target masks, right padding), from the same host-initialised state, on a 1-device mesh (the reference)
and on a 2x2x2 ('data','fsdp','tensor') and a fsdp=8 mesh of the fake CPU devices.

Numerics: fp32 params and compute, ``highest`` matmul precision. Relative error of a leaf = max|a - b| / max|b|.
Bounds: losses and gradient norms 1e-6 relative; every param leaf 1e-6 relative; Adam moments (opt state) 2e-6
(nu sums g^2, so it carries twice the gradients' relative error).

Adam eps 1e-3 (as in tests/test_gcpo.py): with eps 1e-8 Adam's first update is lr * g / (|g| + 1e-8) ~ lr * sign(g),
so gradient entries near zero (down to 6e-12 here: vision qkv, tied-embedding rows of rare tokens) turn their fp32
reduction-order rounding into lr-sized parameter differences. Measured with eps 1e-8 on 2x2x2: every gradient leaf
within 6.2e-7 relative of the 1-device one (max|dg| / max|g|), yet g / (|g| + eps) differs by up to 2e-3 (k_proj)
and the params after the step by 1.0e-5 (o_proj kernel). That is Adam, not sharding; with eps 1e-3 the update is
~ lr * g / eps for small entries, linear in g, so the param check below is an elementwise check of the gradients.
Measured with eps 1e-3 (2 steps; 2x2x2 / fsdp=8): losses 1.4e-7 / 2.8e-7, gradient norms 1.2e-7 / 1.2e-7, worst param
leaf 2.8e-7 (v_proj bias) / 3.8e-7 (vision qkv bias), worst Adam moment 8.9e-7 / 1.03e-6 (nu).
Runtime ~140 s on the loaded 2-core machine (three compiles of the step: 1-device, 2x2x2, fsdp=8).
"""
import jax
import numpy as np
import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax import parallel
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.train import sft
from edit_r1_jax.train import state as S
from edit_r1_jax.train import step as ST
from edit_r1_jax.train.rrm_setup import build_rrm

from test_gcpo import TINY, _mesh, _rel

STEPS, BATCH = 2, 8
SETS = ["train.warmup_steps=0", "train.lr=1e-3", f"train.steps={STEPS}", "data.num_train=16", "data.num_eval=1"]
ADAM_EPS = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = config_lib.get_config(TINY, SETS, num_devices=jax.device_count())
    cfg.train.eps = ADAM_EPS
    setup = build_rrm(cfg, str(tmp_path_factory.mktemp("sft_sharded")))
    task = sft.make_task(cfg, setup, sft.sft_records(cfg, "train"))
    exs = [task.tokenize_fn(r) for r in task.train_source]
    t = max(len(e["input_ids"]) for e in exs)
    batches = []
    for s in range(STEPS):
        rows = exs[s * BATCH:(s + 1) * BATCH]
        b = {k: np.stack([np.pad(e[k], (0, t - len(e[k])), constant_values=v) for e in rows])
             for k, v in task.pad_values.items()}                                 # [B, T]
        b["pixel_values"] = np.stack([e["pixel_values"] for e in rows])          # [B, 2 images x 16 patches, D]
        batches.append(b)
    assert len({int(b["loss_mask"][i].sum()) for b in batches for i in range(BATCH)}) > 1     # ragged targets
    assert (batches[0]["attention_mask"] == 0).any()                                          # some padding
    params0 = jax.device_get(qwen.init_params(setup.cfg, jax.random.PRNGKey(0)))
    return cfg, setup, task, batches, params0


def _run(tiny, shape):
    """STEPS SFT steps on a mesh of ``shape`` -> (losses, grad norms, final state, state shardings, first state)."""
    cfg, setup, task, batches, params0 = tiny
    mesh = _mesh(shape)
    tx = S.make_optimizer(cfg.train, task.trainable_mask)
    plan = S.plan_sharded_state(setup.init_params, tx, mesh, rng=jax.random.PRNGKey(0),
                                param_logical_axes=task.param_logical_axes)
    host = jax.tree.map(np.array, S.TrainState.create(params=params0, tx=tx, rng=jax.random.PRNGKey(1)))
    state = first = jax.device_put(host, plan.shardings)
    step = ST.make_train_step(task.loss_fn, state_shardings=plan.shardings, mesh=mesh,
                              trainable_mask=task.trainable_mask, lr_schedule=S.make_lr_schedule(cfg.train))
    losses, gnorms = [], []
    for b in batches:
        state, m = step(state, parallel.global_batch_from_local(b, mesh))
        losses.append(float(m["loss"]))
        gnorms.append(float(m["grad_norm"]))
        assert int(m["finite"]) == 1
    return losses, gnorms, state, plan.shardings, first


@pytest.fixture(scope="module")
def reference(tiny):
    with jax.default_matmul_precision("highest"):
        losses, gnorms, state, _, _ = _run(tiny, (1, 1, 1))
    return losses, gnorms, jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)], ids=["2x2x2", "fsdp8"])
def test_sft_step_sharded_equals_unsharded(tiny, reference, shape, highest_precision):
    ref_losses, ref_gnorms, ref = reference
    losses, gnorms, state, sh, first = _run(tiny, shape)
    assert ref_losses[-1] < ref_losses[0]                     # it trains (lr 1e-3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(gnorms, ref_gnorms, rtol=1e-6)
    got = jax.device_get(state)
    errs = {}
    for (path, a), b, b0 in zip(jax.tree_util.tree_flatten_with_path(got.params)[0], jax.tree.leaves(ref.params),
                                jax.tree.leaves(tiny[4])):
        name = jax.tree_util.keystr(path)
        errs[name] = _rel(a, b)
        assert not np.array_equal(np.asarray(b), np.asarray(b0)), name       # every leaf was updated
    worst = max(errs, key=errs.get)
    opt_errs = {jax.tree_util.keystr(path): _rel(a, b) for (path, a), b in
                zip(jax.tree_util.tree_flatten_with_path(got.opt_state)[0], jax.tree.leaves(ref.opt_state))}
    opt_worst = max(opt_errs, key=opt_errs.get)
    print(f"{shape}: losses {_rel(losses, ref_losses):.1e}, grad norms {_rel(gnorms, ref_gnorms):.1e}, worst param "
          f"leaf {errs[worst]:.2e} ({worst}), worst opt-state leaf {opt_errs[opt_worst]:.2e} ({opt_worst})")
    assert errs[worst] <= 1e-6, (worst, errs[worst])
    assert opt_errs[opt_worst] <= 2e-6, (opt_worst, opt_errs[opt_worst])
    assert int(got.step) == int(ref.step) == STEPS

    # the shardings: in == out, the input state was donated, and params / Adam moments really are distributed
    assert jax.tree.map(lambda x: x.sharding, state) == sh
    assert first.params["embed_tokens"]["embedding"].is_deleted()
    mesh = _mesh(shape)
    specs = jax.tree.map(lambda s: s.spec, sh.params)
    emb = state.params["embed_tokens"]["embedding"]                               # [vocab, hidden]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb.sharding.spec  # (vocab, embed)
    assert emb.addressable_shards[0].data.size == emb.size // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    flat_specs = [str(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))]
    assert sum("fsdp" in s for s in flat_specs) >= 10                            # most matrices fsdp-sharded
    if shape == (2, 2, 2):
        assert sum("tensor" in s for s in flat_specs) >= 10                      # ... and tensor-sharded
    # every Adam moment lives where its param lives; counts are replicated
    adam = state.opt_state[1][0]                                                 # chain(clip, adamw) -> ScaleByAdam
    for moments in (adam.mu, adam.nu):
        for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(moments)):
            assert m.sharding == p.sharding
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()
