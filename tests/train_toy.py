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
