"""Editing GRPO (Flow-GRPO on a tiny random Kontext editor): sharded == unsharded, sampler/trainer log-prob identity,
KL-only movement at zero advantage, frozen base under LoRA, resume determinism, and the loop raising a toy reward.

All in fp32 on 8 fake CPU devices with 32 px images (pixel codec factor 4 -> 16 target + 16 reference tokens),
3 sampling steps, G=4 edits x 2 prompts, LoRA r=8 and the toy mean-brightness reward. Tests that train share one
optimizer config and loss spec so the compiled update is reused across them.
"""
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax.train import grpo
from edit_r1_jax.train import grpo_rollout as ro
from edit_r1_jax.train import roles as roles_lib
from edit_r1_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["editor.tokenizer=bytes", "editor.image_size=32", "grpo.num_steps=3", "grpo.eval_steps=3", "train.lr=1e-2",
        "train.checkpoint_every=1000", "train.eval_every=0", "grpo.eval_at_start=false", "train.async_checkpoint=false"]


def _config(*overrides, adam_eps=None):
    cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    config_lib.apply_overrides(cfg, BASE + list(overrides))
    cfg.train.warmup_steps = 0               # lr > 0 from the first step (the file's validator wants warmup >= 1)
    cfg.train.schedule = "constant"
    if adam_eps is not None:
        cfg.train.eps = adam_eps
    return cfg


@pytest.fixture(scope="module")
def editor():
    from edit_r1_jax.train.editor_setup import build_editor
    return build_editor(_config(), None)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _frob(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def one_step(editor, tmp_path_factory):
    """One GRPO step (rollout + update, LoRA, beta 0.04 with the inline reference) on the 8-device mesh and on one
    device."""
    out = {}
    for name, devices in (("sharded", None), ("single", [jax.devices()[0]])):
        # Adam eps 1e-4: the first Adam step is g / (|g| + eps), which for |g| ~ 1e-8 turns last-bit differences of
        # the (cancellation-dominated) smallest gradient entries into 1e-5 differences of the update
        t = grpo.GRPOTrainer(_config(adam_eps=1e-4), str(tmp_path_factory.mktemp(name)),
                             reward_fn=grpo.BrightnessReward(),
                             editor=editor, devices=devices)
        state = t.init_state()
        r = t.rollout(state, t.step_records(0), 0)
        state, m = t.update(state, r)
        out[name] = (t, r, _host(state.params), m)
    return out


@pytest.mark.slow
def test_one_grpo_step_sharded_matches_unsharded(one_step):
    """fp32: latents, log-probs, rewards, gradient norm and every updated param (relative Frobenius error) within
    1e-6. At ratio 1 the
    policy loss is -mean(A) ~ 0 (advantages are centred per group), so it is compared absolutely against |A| ~ 1."""
    t8, r8, p8, m8 = one_step["sharded"]
    t1, r1, p1, m1 = one_step["single"]
    assert t8.mesh.size == 8 and t1.mesh.size == 1
    assert _rel(r8.latents, r1.latents) <= 1e-6
    np.testing.assert_allclose(r8.log_probs, r1.log_probs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r8.rewards, r1.rewards, rtol=1e-6)
    for k in ("loss", "policy_loss", "kl"):
        assert abs(float(m8[k]) - float(m1[k])) <= 1e-6, (k, m8[k], m1[k])
    assert _rel(m8["grad_norm"], m1["grad_norm"]) <= 1e-6 and float(m8["grad_norm"]) > 0
    leaves8, leaves1 = jax.tree.leaves(p8), jax.tree.leaves(p1)
    assert len(leaves8) == len(leaves1) > 0
    for a, b in zip(leaves8, leaves1):
        assert _frob(a, b) <= 1e-6
    assert m8["update_skipped"] == 0 and m8["kept_rows"] > 0


@pytest.mark.slow
def test_first_inner_step_logprobs_equal_sampler(one_step):
    """The update's recomputed log-probs (params = the sampler's) equal the stored ones to 1e-5 (fp32)."""
    for name in ("sharded", "single"):
        _, r, _, m = one_step[name]
        assert float(m["logp_abs_diff_max"]) <= 1e-5, (name, m["logp_abs_diff_max"])
        for k in ("ratio_min", "ratio_max", "ratio_mean"):
            assert abs(float(m[k]) - 1.0) <= 1e-5, (name, k, m[k])
        assert np.all(r.log_probs[: r.plan.train_steps.shape[1]] != 0)     # SDE steps have a density
        assert np.all(r.log_probs[r.plan.train_steps.shape[1]:] == 0)      # noise_on=trained: ODE steps are 0


def _perturbed_lora(t, state, seed=3):
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        if str(p[-1]).find("lora_b") >= 0 else x, _host(state.params))
    return state.replace(params=jax.device_put(params, t.plan.shardings.params))


@pytest.mark.slow
def test_zero_advantages_move_policy_only_through_kl(editor, one_step, tmp_path):
    """A == 0 (no filtering): the policy term is 0 and the loss is beta * KL; with beta = 0 nothing moves
    (bitwise); with all samples filtered the update is skipped."""
    t8 = one_step["sharded"][0]
    tz = grpo.GRPOTrainer(_config("grpo.beta=0.0", "grpo.filter_zero_adv=false"), str(tmp_path),
                          reward_fn=grpo.BrightnessReward(), editor=editor)
    for t, beta in ((t8, 0.04), (tz, 0.0)):
        state = _perturbed_lora(t, t.init_state())             # policy != reference (lora_b != 0)
        r = t.rollout(state, t.step_records(1), 1)
        r = dataclasses.replace(r, advantages=np.zeros_like(r.advantages), keep=np.ones_like(r.keep))
        before = _host(state.params)
        state, m = t.update(state, r)
        after = _host(state.params)
        assert float(m["policy_loss"]) == 0.0
        if beta:
            assert float(m["kl"]) > 0 and float(m["grad_norm"]) > 0
            assert abs(float(m["loss"]) - beta * float(m["kl"])) <= 1e-6 * float(m["loss"])
            assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
        else:
            assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0
            for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
                np.testing.assert_array_equal(a, b)
    # filtering on (default): constant rewards -> every sample filtered -> no update, step still advances
    t8.reward_fn = lambda images, records: np.zeros((len(images),), np.float32)
    try:
        state = t8.init_state()
        r = t8.rollout(state, t8.step_records(2), 2)
        assert r.metrics["filtered_samples"] == t8.batch and r.metrics["kept_samples"] == 0
        state, m = t8.update(state, r)
        assert m == {"update_skipped": 1} and int(jax.device_get(state.step)) == 1
    finally:
        t8.reward_fn = grpo.BrightnessReward()


@pytest.mark.slow
def test_toy_reward_rises_and_lora_base_is_frozen(editor, tmp_path):
    """beta = 0, LoRA: 12 GRPO steps raise the mean brightness of ODE edits of held-out prompts, and the base
    transformer weights are bitwise unchanged (only adapters train)."""
    cfg = _config("grpo.beta=0.0", "train.steps=12", "train.eval_every=12", "grpo.eval_at_start=true")
    t = grpo.GRPOTrainer(cfg, str(tmp_path), reward_fn=grpo.BrightnessReward(), editor=editor)
    base_before = _host(t.frozen["base"])
    res = t.train()
    assert res.stopped == "done" and res.step == 12
    recs = read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
    evals = {r["step"]: r["eval/reward"] for r in recs if "eval/reward" in r}
    assert set(evals) == {0, 12}
    assert evals[12] > evals[0] + 0.03, evals
    rollout = [r["reward_mean"] for r in recs if "reward_mean" in r]
    assert np.mean(rollout[-3:]) > np.mean(rollout[:3]) + 0.03, rollout
    assert all(r["logp_abs_diff_max"] <= 1e-5 for r in recs if "logp_abs_diff_max" in r)
    for a, b in zip(jax.tree.leaves(_host(t.frozen["base"])), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(a, b)
    lora_b = [x for p, x in jax.tree_util.tree_leaves_with_path(_host(res.state.params)) if "lora_b" in str(p)]
    assert lora_b and any(np.abs(x).max() > 0 for x in lora_b)
    assert os.path.isfile(os.path.join(str(tmp_path), "images", "eval_grid_12.png"))

    # export (base editor + LoRA adapters) -> `edit-r1-jax eval-edit` reproduces the trainer's ODE edits exactly
    out = t.export(res.state, str(tmp_path / "editor"))
    assert os.path.isfile(os.path.join(out, "lora", "adapter_model.safetensors"))
    # ... and as diffusers' LoRA file (pipe.load_lora_weights), holding exactly the trained adapters
    from edit_r1_jax.models import lora as lora_lib
    from edit_r1_jax.models.flux import lora_diffusers
    back, lcfg = lora_diffusers.load_diffusers_lora(os.path.join(out, "lora"), t.setup.tcfg)
    assert (lcfg.rank, lcfg.scale) == (t.lora_cfg.rank, t.lora_cfg.scale)
    trained = dict(lora_lib.adapter_modules(_host(t.policy_params(res.state))))
    assert len(trained) == len(lora_lib.adapter_modules(back)) > 0
    for mod, node in lora_lib.adapter_modules(back):
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(np.asarray(node[leaf]), np.asarray(trained[mod][leaf], np.float32))
    # `export --to diffusers` of the run's checkpoint writes the same diffusers LoRA file
    from edit_r1_jax import cli
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--to", "diffusers", "--out",
                     str(tmp_path / "exported")]) == 0
    again, _ = lora_diffusers.load_diffusers_lora(str(tmp_path / "exported" / "lora"), t.setup.tcfg)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["eval-edit", "--editor", out, "--rrm", "gold", "--data", "synthetic:4", "--steps", "3",
                     "--batch", "8", "--out", str(tmp_path / "eval")]) == 0
    results = [json.loads(line) for line in open(tmp_path / "eval" / "results.jsonl")]
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert len(results) == 4 and summary["overall"]["n"] == 4
    assert os.path.isfile(tmp_path / "eval" / "contact_sheet.png")
    from PIL import Image
    sheet = np.asarray(Image.open(tmp_path / "eval" / "contact_sheet.png"))
    mine = t.sample_ode(res.state.params, t.records("eval")[:4])
    np.testing.assert_array_equal(sheet[:32, 34:66], mine[0])        # row 0: [source | gap | edit]


@pytest.mark.slow
def test_resume_is_deterministic(editor, tmp_path):
    """A run stopped by SIGTERM after step 2 and rerun on the same workdir ends bitwise equal to an uninterrupted
    4-step run (params, rollout rewards)."""
    def run(workdir, stop_at=None):
        cfg = _config("grpo.beta=0.0", "train.steps=4", "train.checkpoint_every=2")
        t = grpo.GRPOTrainer(cfg, workdir, reward_fn=grpo.BrightnessReward(), editor=editor)

        def on_step(step, m):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return t.train(on_step=on_step)

    full = run(str(tmp_path / "full"))
    part = run(str(tmp_path / "part"), stop_at=2)
    assert part.stopped == "preempted" and part.step == 2
    resumed = run(str(tmp_path / "part"))
    assert resumed.resumed_from == 2 and resumed.step == 4
    for a, b in zip(jax.tree.leaves(_host(full.state.params)), jax.tree.leaves(_host(resumed.state.params))):
        np.testing.assert_array_equal(a, b)
    m_full = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    m_part = read_metrics(str(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in m_part] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in m_full] == [r["reward_mean"] for r in m_part]


# ------------------------------------------------------------------------------------------------ cheap units

def test_step_plan_variants():
    p = ro.step_plan(6, 4, 0.9)                                     # Flow-GRPO: first floor(6 * 0.99) = 5 steps
    assert p.train_steps.shape == (4, 5) and np.all(p.train_steps == np.arange(5))
    assert np.all(p.noise_levels == np.float32(0.9))
    p = ro.step_plan(6, 4, 0.9, noise_on="trained")
    assert p.noise_levels[5] == 0 and np.all(p.noise_levels[:5] == np.float32(0.9))
    p = ro.step_plan(6, 4, 0.7, sde_window=2, sde_window_range=(1, 5), rng=np.random.default_rng(1))
    start = int(p.train_steps[0, 0])
    assert 1 <= start <= 3 and np.all(p.train_steps == [start, start + 1])
    assert np.count_nonzero(p.noise_levels) == 2 and p.noise_levels[start] == np.float32(0.7)
    p = ro.step_plan(10, 3, 1.0, timestep_fraction=0.6, selection="random", rng=np.random.default_rng(0))
    assert p.train_steps.shape == (3, 6) and len({tuple(r) for r in p.train_steps}) > 1
    with pytest.raises(ValueError, match="sde_window"):
        ro.step_plan(4, 2, 0.9, sde_window=5)


def test_make_rows_layout_and_padding():
    s, b, l, c = 3, 2, 4, 5
    lat = np.arange((s + 1) * b * l * c, dtype=np.float32).reshape(s + 1, b, l, c)
    lps = np.arange(s * b, dtype=np.float32).reshape(s, b)
    plan = ro.StepPlan(np.array([0.9, 0.9, 0], np.float32), np.array([[0, 1], [0, 1]]))
    sig = np.array([1.0, 0.6, 0.3, 0.0], np.float32)
    rows = ro.make_rows(lat, lps, plan, sig, sig[:-1], np.array([1.5, -1.5], np.float32),
                        np.array([1.0, 0.0], np.float32), {"ref": np.ones((b, l, c)) * np.arange(b)[:, None, None]},
                        multiple=8)
    assert rows["x_t"].shape == (8, l, c) and rows["valid"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(rows["x_t"][3], lat[1, 1])          # sample 1, step 1
    np.testing.assert_array_equal(rows["x_next"][3], lat[2, 1])
    assert rows["logp_old"][3] == lps[1, 1] and rows["sigma"][3] == sig[1] and rows["sigma_next"][3] == sig[2]
    assert rows["keep"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0] and rows["adv"][2] == -1.5
    assert rows["ref"][3, 0, 0] == 1.0


def test_ema_tracker_and_grid():
    import optax
    tx = optax.chain(optax.sgd(1.0), grpo.ema_tracker(0.5, every=2))
    p = {"w": jnp.array([1.0])}
    s = tx.init(p)
    for g in (1.0, 1.0):
        u, s = tx.update({"w": jnp.array([g])}, s, p)
        p = optax.apply_updates(p, u)
    assert float(p["w"][0]) == -1.0 and float(s[-1].ema["w"][0]) == 0.5 * 1.0 + 0.5 * -1.0
    grid = grpo.edit_grid([np.zeros((4, 4, 3), np.uint8)] * 2, [np.full((4, 4, 3), 9, np.uint8)] * 2)
    assert grid.shape == (10, 10, 3) and grid[0, 6, 0] == 9 and grid[0, 4, 0] == 255


def test_roles_submeshes_and_offload():
    cfg = _config()
    cfg.roles = {"policy": {"devices": "0:4"}, "reference": {"devices": "4:8"}, "reward": {"devices": "policy"}}
    r = roles_lib.build_roles(cfg)
    assert r["policy"].mesh.size == 4 and not r["reference"].colocated and r["reward"].colocated
    assert {d.id for d in r["reference"].mesh.devices.flat} == {4, 5, 6, 7}
    x = jax.device_put(jnp.arange(8.0), jax.sharding.NamedSharding(r["policy"].mesh, jax.sharding.PartitionSpec()))
    y = roles_lib.offload({"x": x})["x"]
    assert y.sharding.memory_kind == "pinned_host"
    z = roles_lib.onload({"x": y})["x"]
    assert z.sharding.memory_kind == "device" and np.array_equal(np.asarray(z), np.arange(8.0))
    with pytest.raises(ValueError, match="roles.policy.devices"):
        cfg.roles = {"policy": {"devices": "0:9"}}
        roles_lib.build_roles(cfg)


def test_rewards_and_options():
    imgs = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    np.testing.assert_allclose(grpo.BrightnessReward()(imgs, [{}, {}]), [0.0, 1.0])
    inner = lambda ims, recs: np.array([im.shape[0] for im in ims], np.float32)   # noqa: E731
    np.testing.assert_array_equal(grpo.ResizedReward(inner, 8)(imgs, [{}, {}]), [8, 8])
    with pytest.raises(ValueError, match="grpo.sde_type"):
        grpo.grpo_options(_config("grpo.sde_type=ode"))
    with pytest.raises(ValueError, match="reward_rrm"):
        grpo.build_reward(_config(), dict(grpo.grpo_options(_config()), reward="rrm"))
    assert json.loads(json.dumps(grpo.grpo_options(_config())))["group_size"] == 4
