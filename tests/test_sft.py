"""RRM SFT: loss and every parameter's gradient equal torch autograd's; the loop learns; CLI runs and resumes."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax import rl
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.models.qwen2_5_vl import convert, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch():
    grid = np.array([[1, 4, 4], [1, 2, 4]])
    img_a = testing.image_tokens(grid[0])
    img_b = testing.image_tokens(grid[1])
    rows = [[3, 4] + img_a + [5, 6] + img_b + [12, 13, 14, 15, 16],
            [3] + img_a + [7, 8, 7] + img_b + [20, 21, 22, 23, 0]]
    ids = np.array(rows, np.int64)
    att = np.array([[1] * len(rows[0]), [1] * (len(rows[1]) - 1) + [0]], np.int64)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, -5:] = 1
    loss_mask[1, -1] = 0
    grids = np.concatenate([grid, grid])
    pv = testing.pixel_values_for(grids, seed=3)
    return ids, att, loss_mask, pv, grids


def test_sft_loss_and_grads_match_torch(tmp_path, highest_precision):
    """fp32, highest matmul precision: loss rel err <= 1e-5, every gradient rel (Frobenius) err <= 1e-5."""
    import torch
    model = testing.tiny_torch_model(seed=1)
    model.save_pretrained(tmp_path)
    cfg, params = qwen.load_pretrained(str(tmp_path))
    ids, att, lm, pv, grids = _batch()

    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att), pixel_values=torch.tensor(pv),
                image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor(testing.mm_token_type_ids(ids)))
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, torch.tensor(ids[:, 1:, None])).squeeze(-1)
    m = torch.tensor(lm[:, 1:], dtype=torch.float64)
    loss_t = -(logp * m).sum() / m.sum()
    loss_t.backward()
    grads_t = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}

    def loss_fn(p):
        logits = qwen.forward(cfg, p, ids, att, pv, grids)
        return rl.sft_loss(logits, ids, lm)[0]
    loss_j, grads_j = jax.value_and_grad(loss_fn)(params)
    assert abs(float(loss_j) - loss_t.item()) / abs(loss_t.item()) <= 1e-5
    # the per-token log-probs GCPO uses (token_logprobs) equal torch's on every attended position
    lp_j = np.asarray(qwen.token_logprobs(cfg, params, ids, att, pv, grids))
    lp_t = logp.detach().numpy()
    on = att[:, 1:] > 0
    assert np.abs(lp_j[on] - lp_t[on]).max() <= 1e-5 * max(1.0, np.abs(lp_t[on]).max())
    ours = dict(convert.to_torch_state(cfg, grads_j))
    hub_to_mem = {n.replace("model.language_model.", "model.").replace("model.visual.", "visual."): n
                  for n in grads_t}
    checked = 0
    for name, g in ours.items():
        tname = hub_to_mem.get(name, name)
        if tname not in grads_t:
            tname = {v: k for k, v in hub_to_mem.items()}.get(name, name)
        gt = grads_t.get(tname, grads_t.get(name.replace("model.", "model.language_model.", 1)))
        if gt is None and name.startswith("visual."):
            gt = grads_t.get("model." + name)
        assert gt is not None, f"no torch gradient for {name}"
        denom = max(np.linalg.norm(gt), 1e-12)
        assert np.linalg.norm(g - gt) / denom <= 1e-5 or np.abs(g - gt).max() <= 1e-9, name
        checked += 1
    assert checked == len(grads_t)


@pytest.mark.slow
def test_sft_overfits_fixed_batch(highest_precision):
    """A few hundred Adam steps on one fixed batch drive the SFT loss near zero."""
    import optax
    cfg = qwen.from_hf_dict(testing.tiny_hf_config().to_dict())
    params = qwen.init_params(cfg, jax.random.key(0))
    ids, att, lm, pv, grids = _batch()
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(lambda p: rl.sft_loss(qwen.forward(cfg, p, ids, att, pv, grids), ids, lm)[0])(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss
    first = None
    for _ in range(200):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert first > 3.0 and float(loss) < 0.05, (first, float(loss))


@pytest.mark.slow
def test_sft_cli_runs_and_resumes(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "edit_r1_jax.cli", "sft", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
           "--set", "train.steps=2", "--set", "train.global_batch_size=2", "--set", "data.num_train=4",
           "--set", "data.num_eval=2", "--set", "train.eval_every=0"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.exists(tmp_path / "hf" / "config.json")
    cmd[cmd.index("train.steps=2")] = "train.steps=3"
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]   # resumed at 2, one more step
