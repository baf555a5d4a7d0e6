"""GCPO loop of the reward model (algorithms.md b2): sampler log-probs == recompute, sharded == unsharded,
zero-advantage pairs skipped and counted, the objective's equation, the CLI with resume.

Numerics: tiny random Qwen2.5-VL, fp32 params and compute, ``highest`` matmul precision. Relative error of a leaf =
max|a - b| / max|b|. The scores are injected (a random model does not write parseable traces), so the advantages
are known: pair 0 has preferred scores [7, 3] and rejected [5, 5] (A^w = [+1/2, -1/2], A^l = 0), pair 1 has two
parse failures on the preferred side and ties on the rejected side (all advantages 0: skipped).
"""
import functools
import json
import os
import signal

import jax
import numpy as np
import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax import parallel
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.train import gcpo
from edit_r1_jax.train import gcpo_rollout as R
from edit_r1_jax.train import rl_loop
from edit_r1_jax.train import state as S
from edit_r1_jax.train.rrm_setup import build_rrm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# Adam eps 1e-3: with eps 1e-8 Adam's first update is lr * sign(g), which turns fp32 rounding in near-zero gradient
# entries (tied-embedding rows of tokens that never occur) into lr-sized parameter differences; that is Adam, not
# sharding. The gradients themselves are compared through grad_norm and the second epoch's loss.
SETS = ["gcpo.max_new_tokens=16", "gcpo.num_samples=2", "gcpo.pairs_per_step=2", "gcpo.ppo_epochs=2",
        "train.warmup_steps=0", "train.lr=1e-3"]
ADAM_EPS = 1e-3
SCORES = np.array([7, 3, 5, 5, np.nan, np.nan, 4, 4], np.float32)   # rows (pair, side, sample)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _scorer(texts, num_principles):
    assert len(texts) == len(SCORES) and len(num_principles) == len(SCORES)
    return SCORES.copy(), ["ok" if np.isfinite(s) else "failed" for s in SCORES]


def _mesh(shape):
    devs = jax.devices()[: int(np.prod(shape))]
    return parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devs)


def _gcpo_step(tiny, shape):
    """(state, GCPOStep) on a mesh of ``shape``; the state is the same host-initialised one on every mesh."""
    cfg, setup, opts, _, params0 = tiny
    mesh = _mesh(shape)
    tx = S.make_optimizer(cfg.train)
    plan = S.plan_sharded_state(lambda k: qwen.init_params(setup.cfg, k), tx, mesh, rng=jax.random.PRNGKey(0),
                                param_logical_axes=setup.param_logical_axes())
    host = jax.tree.map(np.array, S.TrainState.create(params=params0, tx=tx, rng=jax.random.PRNGKey(1)))
    state = jax.device_put(host, plan.shardings)      # one buffer per leaf (the step donates its state)
    step = gcpo.GCPOStep(setup, opts, mesh, plan.shardings, train_cfg=cfg.train, prompt_len=opts["prompt_pad_to"],
                         scorer=_scorer)
    return state, step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = config_lib.get_config(TINY, SETS, num_devices=jax.device_count())
    cfg.train.eps = ADAM_EPS
    setup = build_rrm(cfg, str(tmp_path_factory.mktemp("gcpo_setup")))
    pairs = gcpo.pair_records(cfg)
    params0 = jax.device_get(qwen.init_params(setup.cfg, jax.random.PRNGKey(0)))
    records = [pairs[i] for i in rl_loop.epoch_indices(0, 2, len(pairs), 0)]
    return cfg, setup, gcpo.gcpo_options(cfg), records, params0


@pytest.fixture(scope="module")
def reference(tiny):
    """One GCPO step (rollout + 2 PPO epochs) on a 1-device mesh. Extra EOS ids (5% of the vocabulary) make a
    random model end some traces early, so trace lengths vary."""
    with jax.default_matmul_precision("highest"):
        state, step = _gcpo_step(tiny, (1, 1, 1))
        step.eos_ids = step.eos_ids + tuple(range(100, 150))
        ro, scores, statuses, adv, m_ro = step.rollout(state, tiny[3], 0)
        state, m_up = step.update(state, ro, adv)
        return dict(params0=tiny[4], ro=ro, adv=adv, m_ro=m_ro, m_up=m_up, gcpo_step=step, state=state,
                    params=jax.tree.map(np.asarray, jax.device_get(state.params)), step=int(state.step))


@pytest.mark.slow
def test_sampler_logprobs_match_recompute(reference):
    """The sampler's (KV-cached decode) log-probs equal (1e-5, fp32) the train step's full forward with the same
    params: its first epoch's max |log pi - log pi_old| and ratio statistics."""
    ro, m = reference["ro"], reference["m_up"]
    assert ro.tokens.shape == (8, 16) and ro.logps.shape == (8, 16)
    assert np.all(ro.completion_mask[:, 0] == 1)
    on = ro.completion_mask > 0
    assert 0 < ro.has_eos.sum() < len(ro.has_eos) and len(set(ro.lengths.tolist())) > 1   # ragged traces
    assert np.all(ro.logps[~on] == 0)
    assert m["logp_abs_diff_max"] <= 1e-5
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert abs(m[k] - 1.0) <= 1e-5, (k, m[k])
    assert m["clip_frac"] == 0.0


@pytest.mark.slow
def test_sampled_image_token_is_text(tiny, reference, highest_precision):
    """A sampled <|image_pad|> in a completion is an ordinary token, as it was for the sampler: the completion
    log-probs equal those with a text token D in its place whose embedding row is set equal to it, in every row
    (a plain forward would splice an image feature there, shift every later row's image features and move the
    later M-RoPE positions)."""
    _, setup, _, _, params0 = tiny
    ro, cfg = reference["ro"], setup.cfg
    rows = np.argsort(-ro.lengths, kind="stable")[:2]                # two rows, the first with a long trace
    b = {k: v[rows] for k, v in R.update_batch(ro, reference["adv"]).items()}
    n = b["completion_mask"].shape[1]
    pos, d = b["input_ids"].shape[1] - n + 3, 5
    assert ro.lengths[rows[0]] > 4 and b["input_ids"][0, pos] != cfg.image_token_id
    with_img, with_d = b["input_ids"].copy(), b["input_ids"].copy()
    with_img[0, pos], with_d[0, pos] = cfg.image_token_id, d
    emb = params0["embed_tokens"]["embedding"].copy()
    emb[d] = emb[cfg.image_token_id]
    params = {**params0, "embed_tokens": {"embedding": emb}}
    f = jax.jit(lambda p, ids: gcpo.completion_logprobs(cfg, p, ids, b["attention_mask"], b["pixel_values"],
                                                        setup.grid(2), n, 1.0))
    np.testing.assert_allclose(np.asarray(f(params, with_img)), np.asarray(f(params, with_d)), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_zero_advantage_pairs_are_skipped_and_counted(reference):
    adv, m_ro, m_up = reference["adv"], reference["m_ro"], reference["m_up"]
    np.testing.assert_allclose(adv.r_w, [[1, 0], [0, 0]])
    np.testing.assert_allclose(adv.r_l, [[0.5, 0.5], [0, 0]])
    np.testing.assert_allclose(adv.advantages, [0.5, -0.5, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(adv.keep, [1, 1, 1, 1, 0, 0, 0, 0])
    assert m_ro["pairs_skipped"] == 1 and m_ro["pairs"] == 2
    assert m_ro["parse_fail_frac"] == 0.25
    np.testing.assert_allclose(m_ro["reward"], (0.5 + 0.0) / 2)      # pair 0: 2 of 4 (w, l) pairs ordered
    assert m_up["kept_traces"] == 4 and m_up["update_skipped"] == 0
    assert reference["step"] == 2                                    # mu = 2 optimizer steps
    assert any(_rel(a, b) > 0 for a, b in zip(jax.tree.leaves(reference["params"]),
                                              jax.tree.leaves(reference["params0"])))


@pytest.mark.slow
def test_all_skipped_step_leaves_params_and_advances(reference):
    """Every pair constant -> no update runs, params unchanged, state.step advances by mu (checkpoint naming)."""
    step, state = reference["gcpo_step"], reference["state"]
    adv = R.advantages(np.array([5, 5, 5, 5, np.nan, 2, 2, np.nan], np.float32), 2)
    assert adv.num_skipped == 2 and not adv.keep.any()
    new, m = step.update(state, reference["ro"], adv)
    assert m == {"update_skipped": 1} and int(new.step) == int(state.step) + 2
    assert new.step.sharding == step.shardings.step
    assert new.params is state.params


def test_objective_is_mean_over_kept_traces():
    """gcpo_objective == (1/|K|) sum_{i in K} (1/T_i) sum_t [-min(rho A, clip(rho) A) + beta k3], in NumPy."""
    rng = np.random.default_rng(0)
    r, n = 6, 5
    lp, old, ref = (rng.normal(-2, 0.3, (r, n)).astype(np.float32) for _ in range(3))
    a = rng.normal(size=r).astype(np.float32)
    cm = np.ones((r, n), np.float32)
    cm[1, 3:] = 0
    cm[4, 1:] = 0
    keep = np.array([1, 1, 0, 1, 1, 0], np.float32)
    objective = jax.jit(functools.partial(gcpo.gcpo_objective, eps_low=0.2, eps_high=0.28, beta=0.1))
    loss, m = objective(lp, old, a, cm, keep, ref_logp=ref)
    rho = np.exp(lp - old)
    d = ref - lp
    tok = -np.minimum(rho * a[:, None], np.clip(rho, 0.8, 1.28) * a[:, None]) + 0.1 * (np.exp(d) - d - 1)
    per = (tok * cm).sum(1) / cm.sum(1)
    np.testing.assert_allclose(float(loss), per[keep > 0].mean(), rtol=1e-5)
    assert float(m["loss_weight"]) == 4
    np.testing.assert_allclose(float(m["logp_abs_diff_max"]), np.abs(lp - old)[cm > 0].max(), rtol=1e-6)
    np.testing.assert_allclose(float(m["ratio_min"]), rho[cm > 0].min(), rtol=1e-6)
    loss0, _ = objective(lp, old, a, cm, np.zeros(r, np.float32), ref_logp=ref)   # nothing kept: 0, not NaN
    assert float(loss0) == 0.0


@pytest.mark.slow
def test_reference_logprobs_for_kl(tiny, reference, highest_precision):
    """kl_beta > 0: the frozen reference's log-probs (computed once per step, sharded like the batch) equal the
    sampler's when the reference is the sampling policy."""
    _, setup, opts, _, params0 = tiny
    mesh = _mesh((1, 1, 1))
    sh = reference["gcpo_step"].shardings
    step = gcpo.GCPOStep(setup, {**opts, "kl_beta": 0.04}, mesh, sh, train_cfg=tiny[0].train,
                         prompt_len=opts["prompt_pad_to"], ref_params=jax.device_put(params0, sh.params))
    batch = gcpo.global_batch(R.update_batch(reference["ro"], reference["adv"]), mesh)
    ref_lp = np.asarray(step.ref_fn(step.ref_params, batch))
    on = reference["ro"].completion_mask > 0
    assert np.abs(ref_lp - reference["ro"].logps)[on].max() <= 1e-5


def test_completion_mask():
    eos = [9]
    toks = np.array([[1, 2, 9, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(R.completion_mask(toks, eos), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)], ids=["2x2x2", "fsdp8"])
def test_sharded_update_equals_unsharded(tiny, reference, shape, highest_precision):
    """The same rollout, 2 PPO epochs on a sharded state: losses, gradient norm and params within 1e-6 relative
    (the whole parameter vector and every leaf, zero-initialised leaves 1e-5), and every leaf's update within 1e-3
    of its own size."""
    state, step = _gcpo_step(tiny, shape)
    assert state.params["embed_tokens"]["embedding"].addressable_shards[0].data.size < \
        state.params["embed_tokens"]["embedding"].size
    state, m = step.update(state, reference["ro"], reference["adv"])
    ref = reference["m_up"]
    assert abs(m["loss"] - ref["loss"]) <= 1e-6 * max(abs(ref["last_epoch/loss"]), 1e-3)  # epoch 0: sum A = 0
    assert abs(ref["last_epoch/loss"]) > 1e-6                                               # epoch 1: rho != 1
    np.testing.assert_allclose(m["last_epoch/loss"], ref["last_epoch/loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-6)
    got = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    flat = lambda leaves: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])   # noqa: E731
    assert _rel(flat([a for _, a in got]), flat(jax.tree.leaves(reference["params"]))) <= 1e-6   # whole vector
    for (path, a), b, b0 in zip(got, jax.tree.leaves(reference["params"]), jax.tree.leaves(reference["params0"])):
        a, name = np.asarray(a), jax.tree_util.keystr(path)
        # zero-initialised leaves (biases) hold the update alone, whose gradient sum_i A_i grad log pi_i cancels
        # (sum_i A_i = 0): reduction-order rounding is ~1e-6 of it (1 device with 2 microbatches vs 1: up to 7e-5
        # of a leaf's update). A sharding bug (a missing or doubled reduction) is O(1) of the update.
        assert _rel(a, b) <= (1e-6 if np.any(b0 != 0) else 1e-5), (name, _rel(a, b))
        assert _rel(a - b0, b - b0) <= 1e-3, (name, _rel(a - b0, b - b0))


@pytest.mark.slow
def test_sigterm_then_cli_resumes(tiny, tmp_path):
    from edit_r1_jax import cli
    from edit_r1_jax.train import checkpoint as ckpt_lib
    from edit_r1_jax.train.metrics import read_metrics
    w = str(tmp_path / "run")
    tok = os.path.join(str(tmp_path), "tok")
    tiny[1].inputs.tokenizer.save_pretrained(tok)     # skips building the world tokenizer again
    sets = ["gcpo.max_new_tokens=16", "train.checkpoint_every=1", f"rrm.tokenizer={tok}"]
    # 1. SIGTERM after step 1: checkpoint at the step boundary, return "preempted"
    cfg = config_lib.get_config(TINY, sets + ["train.steps=3"], num_devices=jax.device_count())
    res, _ = gcpo.train(cfg, w, on_step=lambda s, m: os.kill(os.getpid(), signal.SIGTERM) if s == 1 else None)
    assert (res.stopped, res.step) == ("preempted", 1)
    assert ckpt_lib.Checkpointer(w).latest_step() == 1
    # 2. the CLI resumes and finishes; 3. rerunning with more steps resumes again
    args = ["gcpo", "--config", TINY, "--workdir", w] + [x for kv in sets for x in ("--set", kv)]
    assert cli.main(args + ["--set", "train.steps=2"]) == 0
    assert ckpt_lib.Checkpointer(w).latest_step() == 2
    assert cli.main(args + ["--set", "train.steps=3"]) == 0
    recs = read_metrics(os.path.join(w, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["pairs"] == 4 and 0.0 <= r["parse_fail_frac"] <= 1.0 and r["trace_len_mean"] <= 16
    assert ckpt_lib.Checkpointer(w).latest_step() == 3
    with open(os.path.join(w, "hf", "config.json")) as f:
        assert json.load(f)["model_type"].startswith("qwen2_5_vl")
    # 4. a fresh run with gcpo.init_from=<that export> starts from exactly the exported params
    cfg2 = config_lib.apply_overrides(config_lib.load_config_file(TINY),
                                      sets + ["train.steps=0", f"gcpo.init_from={w}/hf"])
    res2, setup2 = gcpo.train(cfg2, str(tmp_path / "run2"))
    assert setup2.checkpoint == f"{w}/hf" and res2.resumed_from is None
    exported = qwen.load_pretrained(f"{w}/hf")[1]
    for a, b in zip(jax.tree.leaves(jax.device_get(res2.state.params)), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(a, b)
