"""GCPO rollouts (algorithms.md b2): prompts of a step's pairs -> N sampled traces per image -> scores -> advantages.

Everything here runs on the host except ``sample`` (one jitted ``qwen2_5_vl.generate`` call). Shapes are static so
nothing recompiles from step to step: a step's P pairs give R = 2 P N trace rows, ordered

    row (p, s, j) = (p * 2 + s) * N + j,   s = 0: (source, preferred) = x^w,   s = 1: (source, rejected) = x^l,

every prompt is left-padded to a fixed length ``prompt_len`` (so the sampled tokens follow the prompt directly and
their M-RoPE positions are the same in the sampler and in the training forward pass), and every trace is
``max_new_tokens`` long (after the first EOS: padding, log-prob 0, completion mask 0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import rl
from edit_r1_jax.rrm import parse as parse_lib
from edit_r1_jax.rrm.inputs import RRMInputs, pad_batch

SIDES = ("preferred", "rejected")
Scorer = Callable[[Sequence[str], Sequence[int]], tuple[np.ndarray, list]]


def load_image(x: Any) -> np.ndarray:
    """An in-memory array as is; a path / data URI / bytes through ``formats.load_image``."""
    if isinstance(x, np.ndarray):
        return x
    from edit_r1_jax.data.formats import load_image as _load
    return _load(x)


# ----------------------------------------------------------------------------------------------------------------
# prompts

@dataclasses.dataclass
class PromptBatch:
    """The 2P scoring prompts of P pairs, rows (p, s): left-padded ids/mask [2P, Tp], pixels [2P, Np, D]."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    num_principles: list          # [P]


def prompt_examples(inputs: RRMInputs, rec: dict) -> list[dict]:
    """The two scoring prompts of one pair record: (source, preferred), (source, rejected)."""
    src = load_image(rec["source"])
    return [inputs.scoring_prompt(rec["instruction"], rec["principles"], src, load_image(rec[s])) for s in SIDES]


def prompt_length(inputs: RRMInputs, records: Sequence[dict], multiple: int = 64) -> int:
    """Longest scoring prompt of ``records``, rounded up to ``multiple`` (the fixed prompt length)."""
    longest = max(len(ex["input_ids"]) for rec in records for ex in prompt_examples(inputs, rec))
    return int(math.ceil(longest / multiple) * multiple)


def prompt_batch(inputs: RRMInputs, records: Sequence[dict], prompt_len: int) -> PromptBatch:
    exs = []
    for rec in records:
        for s, ex in zip(SIDES, prompt_examples(inputs, rec)):
            if len(ex["input_ids"]) > prompt_len:
                raise ValueError(f"pair {rec.get('_origin', rec.get('id', '?'))} ({s}): the scoring prompt has "
                                 f"{len(ex['input_ids'])} tokens, more than gcpo.prompt_pad_to={prompt_len}. "
                                 f"Fix: --set gcpo.prompt_pad_to=<multiple of 64 >= {len(ex['input_ids'])}>")
            exs.append(ex)
    b = pad_batch(exs, inputs.pad_id, length=prompt_len, left=True)
    pv = b["pixel_values"]
    return PromptBatch(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=pv.reshape(len(exs), -1, pv.shape[-1]),
                       num_principles=[len(rec["principles"]) for rec in records])


# ----------------------------------------------------------------------------------------------------------------
# sampling

@dataclasses.dataclass
class Rollout:
    """R = 2 P N sampled traces (host arrays).

    prompt_ids, prompt_mask  [R, Tp] int32 (left-padded)
    pixel_values             [R, Np, D] float32
    tokens                   [R, Nn] int32 sampled completion (pad after the first EOS)
    logps                    [R, Nn] float32 sampler log-probs log softmax(logits / temperature)[token] (0 after EOS)
    completion_mask          [R, Nn] int32: 1 up to and including the first EOS
    has_eos                  [R] bool: the trace ended (False: truncated at max_new_tokens)
    texts                    R decoded traces (up to the EOS)
    num_principles           [R] principle count of each row's pair (for the parser)
    """
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    pixel_values: np.ndarray
    tokens: np.ndarray
    logps: np.ndarray
    completion_mask: np.ndarray
    has_eos: np.ndarray
    texts: list
    num_principles: list

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(-1)


def completion_mask(tokens_rn: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """1 on every token up to and including the first EOS (all tokens when there is none), else 0."""
    is_eos = np.isin(tokens_rn, np.asarray(list(eos_ids)))
    eos_before = np.cumsum(is_eos, axis=-1) - is_eos      # EOS tokens strictly before position t
    return (eos_before == 0).astype(np.int32)


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-process sharded) jax.Array -> the full NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sample(cfg: Any, params: Any, inputs: RRMInputs, prompts: PromptBatch, num_samples: int, grid_fn: Callable,
           *, max_new_tokens: int, temperature: float, rng: jax.Array, eos_ids: Sequence[int]) -> Rollout:
    """N traces per prompt with ``qwen2_5_vl.generate`` (temperature sampling, no top-k / top-p, so the sampler's
    log-probs are those of the policy being trained)."""
    from edit_r1_jax.models import qwen2_5_vl as qwen
    n = int(num_samples)
    ids = np.repeat(prompts.input_ids, n, axis=0)
    mask = np.repeat(prompts.attention_mask, n, axis=0)
    pv = np.repeat(prompts.pixel_values, n, axis=0)
    r = ids.shape[0]
    tokens, logps = qwen.generate(cfg, params, ids, mask, pv.reshape(-1, pv.shape[-1]), grid_fn(r),
                                  max_new_tokens=int(max_new_tokens), temperature=float(temperature), rng=rng,
                                  eos_token_id=list(eos_ids), pad_token_id=inputs.pad_id)
    tokens, logps = to_host(tokens).astype(np.int32), to_host(logps).astype(np.float32)
    cm = completion_mask(tokens, eos_ids)
    texts = [inputs.decode(row[m > 0]) for row, m in zip(tokens, cm)]
    per_row = [k for k in prompts.num_principles for _ in range(2 * n)]
    return Rollout(prompt_ids=ids, prompt_mask=mask, pixel_values=pv, tokens=tokens, logps=logps,
                   completion_mask=cm, has_eos=np.isin(tokens, list(eos_ids)).any(-1), texts=texts,
                   num_principles=per_row)


# ----------------------------------------------------------------------------------------------------------------
# scores, rewards, advantages

def parse_scorer(fallback: bool = False) -> Scorer:
    """Scores from ``rrm.parse``: the ``<score>`` number; NaN for a parse failure (decision e6). ``fallback=True``
    also accepts the parser's 10 x average_score fallback."""
    def score(texts: Sequence[str], num_principles: Sequence[int]) -> tuple[np.ndarray, list]:
        out, statuses = np.full(len(texts), np.nan, np.float32), []
        for i, (t, k) in enumerate(zip(texts, num_principles)):
            res = parse_lib.parse(t, k)
            statuses.append(res.status)
            if res.score is not None and (res.status == "ok" or fallback):
                out[i] = res.score
        return out, statuses
    return score


@dataclasses.dataclass
class Advantages:
    """Per pair p: rewards r_w, r_l [P, N] (eqs. 1-2), advantages in row order [R] (eq. 3), keep [R] (0 on the
    rows of pairs whose 2N advantages are all zero: skipped), pair_accuracy [P] (fraction of correctly ordered
    (w, l) trace pairs)."""
    r_w: np.ndarray
    r_l: np.ndarray
    advantages: np.ndarray
    keep: np.ndarray
    pair_accuracy: np.ndarray

    @property
    def num_skipped(self) -> int:
        return int(np.sum(self.keep.reshape(self.r_w.shape[0], -1)[:, 0] == 0))


def advantages(scores_r: np.ndarray, num_pairs: int, *, std_normalize: bool = False,
               divide_by_non_tied: bool = False, skip_zero: bool = True) -> Advantages:
    """scores [R] in row order (p, s, j) -> ``rl.gcpo_rewards`` -> ``rl.gcpo_advantages`` per pair."""
    s_p2n = np.asarray(scores_r, np.float32).reshape(num_pairs, 2, -1)
    w, l = s_p2n[:, 0], s_p2n[:, 1]
    r_w, r_l = rl.gcpo_rewards(jnp.asarray(w), jnp.asarray(l), divide_by_non_tied=divide_by_non_tied)
    a_w, a_l = rl.gcpo_advantages(r_w, r_l, std_norm=std_normalize)
    adv_p2n = np.stack([np.asarray(a_w), np.asarray(a_l)], axis=1)
    keep_p = np.any(adv_p2n != 0, axis=(1, 2)) if skip_zero else np.ones(num_pairs, bool)
    keep_r = np.broadcast_to(keep_p[:, None, None], adv_p2n.shape).reshape(-1).astype(np.float32)
    acc = (w[:, :, None] > l[:, None, :]).mean(axis=(1, 2))
    return Advantages(r_w=np.asarray(r_w), r_l=np.asarray(r_l), advantages=adv_p2n.reshape(-1).astype(np.float32),
                      keep=keep_r, pair_accuracy=acc.astype(np.float32))


def update_batch(ro: Rollout, adv: Advantages) -> dict:
    """The train step's batch, every leaf with the R trace rows first.

    input_ids [R, Tp + Nn] = prompt ++ completion; attention_mask [R, Tp + Nn] = prompt mask ++ completion mask;
    pixel_values [R, Np, D]; completion_mask [R, Nn] f32; old_logp [R, Nn] (sampler); advantages [R]; keep [R].
    """
    return {"input_ids": np.concatenate([ro.prompt_ids, ro.tokens], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([ro.prompt_mask, ro.completion_mask], axis=1).astype(np.int32),
            "pixel_values": ro.pixel_values.astype(np.float32),
            "completion_mask": ro.completion_mask.astype(np.float32),
            "old_logp": np.where(ro.completion_mask > 0, ro.logps, 0.0).astype(np.float32),
            "advantages": adv.advantages, "keep": adv.keep}


def rollout_metrics(ro: Rollout, scores: np.ndarray, statuses: Sequence[str], adv: Advantages) -> dict:
    """reward (= fraction of correctly ordered trace pairs, Fig. 3d), parse failures, trace lengths, the paper's
    weighted advantage (1/R) sum_i A_i / L_i (Fig. 3c), skipped pairs."""
    lengths = ro.lengths.astype(np.float32)
    st = np.asarray(list(statuses))
    return {"reward": float(adv.pair_accuracy.mean()), "reward_w": float(adv.r_w.mean()),
            "reward_l": float(adv.r_l.mean()),
            "parse_fail_frac": float(np.mean(np.isnan(scores))),
            "parse_ok_frac": float(np.mean(st == "ok")),
            "parse_fallback_frac": float(np.mean(st == "fallback_average")),
            "score_w_mean": _nanmean(scores.reshape(len(adv.pair_accuracy), 2, -1)[:, 0]),
            "score_l_mean": _nanmean(scores.reshape(len(adv.pair_accuracy), 2, -1)[:, 1]),
            "trace_len_mean": float(lengths.mean()), "trace_len_max": float(lengths.max()),
            "truncated_frac": float(1.0 - np.mean(ro.has_eos)),
            "weighted_advantage": float(np.mean(adv.advantages / np.maximum(lengths, 1.0))),
            "adv_abs_mean": float(np.mean(np.abs(adv.advantages))),
            "pairs_skipped": adv.num_skipped, "pairs": len(adv.pair_accuracy)}


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")
