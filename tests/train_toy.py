"""A tiny Flax Linen language model with logical-axis annotations, a masked next-token loss and token records:
the model-independent fixtures of the train-infrastructure tests (not a test module itself)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VOCAB, EMBED, MLP = 32, 16, 32


def _lp(init, axes):
    return nn.with_logical_partitioning(init, axes)


class ToyLM(nn.Module):
    """tokens (B, L) int32 -> logits (B, L, VOCAB) float32: embedding, one residual MLP block, LayerNorm, head."""
    vocab: int = VOCAB
    embed: int = EMBED
    mlp: int = MLP

    @nn.compact
    def __call__(self, tokens_bl):
        emb_ve = self.param("embedding", _lp(nn.initializers.normal(1.0), ("vocab", "embed")), (self.vocab, self.embed))
        x_ble = emb_ve[tokens_bl]
        h_blm = nn.Dense(self.mlp, name="up", kernel_init=_lp(nn.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=_lp(nn.initializers.normal(0.1), ("mlp",)))(x_ble)
        x_ble = x_ble + nn.Dense(self.embed, name="down",
                                 kernel_init=_lp(nn.initializers.lecun_normal(), ("mlp", "embed")),
                                 bias_init=_lp(nn.initializers.zeros, ("embed",)))(nn.gelu(h_blm))
        x_ble = nn.LayerNorm(name="norm", scale_init=_lp(nn.initializers.ones, ("norm",)),
                             bias_init=_lp(nn.initializers.zeros, ("norm",)))(x_ble)
        return nn.Dense(self.vocab, name="head", use_bias=False,
                        kernel_init=_lp(nn.initializers.lecun_normal(), ("embed", "vocab")))(x_ble).astype(jnp.float32)


MODEL = ToyLM()


def init_params(key, seq_len: int = 8):
    """Boxed params (LogicallyPartitioned leaves) of ToyLM: {'embedding', 'up', 'down', 'norm', 'head'}."""
    return MODEL.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


def loss_fn(params, batch, rng):
    """Token-mean next-token cross-entropy over mask==1 targets:
    L = -sum_{b,t} m[b,t+1] log p(tokens[b,t+1] | tokens[b,:t+1]) / sum m. aux carries loss_weight = sum m."""
    del rng
    logits_blv = MODEL.apply({"params": params}, batch["tokens"][:, :-1])
    logp_blv = jax.nn.log_softmax(logits_blv, axis=-1)
    tgt_bl = batch["tokens"][:, 1:]
    tok_lp = jnp.take_along_axis(logp_blv, tgt_bl[..., None], axis=-1)[..., 0]
    m = batch["mask"][:, 1:].astype(jnp.float32)
    n = m.sum()
    loss = -(tok_lp * m).sum() / jnp.maximum(n, 1.0)
    acc = ((jnp.argmax(logits_blv, -1) == tgt_bl) * m).sum() / jnp.maximum(n, 1.0)
    return loss, {"loss_weight": n, "token_accuracy": acc}


def make_batch(seed: int, batch: int = 16, seq_len: int = 8, ragged: bool = True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, seq_len), dtype=np.int32)
    mask = np.ones((batch, seq_len), np.int32)
    if ragged:  # different numbers of target tokens per row (tests the weighted accumulation)
        lengths = rng.integers(2, seq_len + 1, batch)
        mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens, "mask": mask}


def make_records(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12):
    """Token records of varying length: {'id', 'tokens': list[int]}."""
    rng = np.random.default_rng(seed)
    return [{"id": i, "tokens": rng.integers(0, VOCAB, int(rng.integers(min_len, max_len + 1))).tolist()}
            for i in range(n)]


def tokenize(record):
    """A record -> per-example arrays; 'tokens' and 'mask' have the sequence as their first axis."""
    t = np.asarray(record["tokens"], np.int32)
    return {"tokens": t, "mask": np.ones_like(t), "id": np.int32(record["id"])}


# ----------------------------------------------------------------------------------------------------------------
# the generic loop on the toy task, as a script (subprocess tests: SIGKILL / SIGTERM / resume)

def toy_config(steps: int = 6, checkpoint_every: int = 2, mesh=(2, 2, 2), **train):
    import ml_collections
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    c.sharding = dict(rules=None)
    c.train = dict(steps=steps, lr=1e-2, warmup_steps=1, global_batch_size=8, grad_clip=1.0, weight_decay=0.01,
                   log_every=1, checkpoint_every=checkpoint_every, keep_checkpoints=3, eval_every=0,
                   max_consecutive_nonfinite=3, grad_accum_steps=1)
    c.train.update(train)
    c.data = dict(length_buckets=(16,), pad_to_multiple=8, num_threads=1, prefetch=2)
    return c


def toy_task(num_records: int = 40, on_step=None, loss=None):
    from edit_r1_jax.train.generic_loop import Task
    return Task(init_params=init_params, loss_fn=loss or loss_fn, train_source=make_records(num_records),
                tokenize_fn=tokenize, pad_values={"tokens": 0, "mask": 0}, on_step=on_step,
                tokens_in_batch=lambda b: float(b["mask"].sum()))


def flat_params(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _main(argv=None):
    import argparse
    import time
    from edit_r1_jax.train.generic_loop import train
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--sleep-from", type=int, default=10**9, help="sleep after every step >= this")
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args(argv)
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()   # no-op unless launched by launchers/local_multiprocess.sh

    def on_step(step, m):
        print(f"STEP {step} loss={None if m is None else m.get('loss')}", flush=True)
        if step >= args.sleep_from:
            time.sleep(args.sleep)
    res = train(toy_config(args.steps, args.checkpoint_every), args.workdir, toy_task(on_step=on_step))
    if jax.process_index() == 0:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(res.state.params, tiled=True) if jax.process_count() > 1 \
            else res.state.params
        np.savez(f"{args.workdir}/final_params_{res.step}.npz", **flat_params(params))
    elif jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.process_allgather(res.state.params, tiled=True)
    print(f"RESULT stopped={res.stopped} step={res.step} resumed_from={res.resumed_from}", flush=True)
    return 0


if __name__ == "__main__":
    import os
    import sys
    raise SystemExit(_main())
