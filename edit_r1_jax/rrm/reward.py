"""Batched, sharded scoring with the reasoning reward model: (source, edited, instruction, principles) -> scores.

Two modes (algorithms.md §c2, decisions e6, e7, e14):

* ``generate`` (the paper's reward): build the scoring prompt, decode a trace with the KV-cache sampler (greedy by
  default, e14; or ``samples=k`` traces at a temperature, averaged), parse it with `edit_r1_jax.rrm.parse`. Per
  trace (e6): status ``ok`` -> score = the ``<score>`` value; ``fallback_average`` -> score = 10 * average_score;
  ``failed`` -> score NaN (GCPO: never wins or loses) and reward 0 (editing GRPO: the lowest reward). ``reward`` is
  the score with failures replaced by 0. With k samples: ``score`` = mean over parsed traces (NaN if none),
  ``reward`` = mean of the per-trace rewards, ``status`` = ``ok`` / ``fallback_average`` when every trace parsed
  (the worse of the two), ``failed`` when none did, ``partial`` otherwise.
* ``logits`` (one forward, no decoding): the prompt is followed by a fixed scoring prefix (default ``<score>``)
  and the digit ``1``; with ``p`` = the next-token distribution after the prefix renormalised over the ten digit
  tokens and ``r`` = P(``0`` | prefix + ``1``) under the full softmax one position later, the expected score is

      E[s] = sum_{d != 1} d * p_d  +  p_1 * (10 * r + 1 * (1 - r))

  i.e. the expectation over the integer part of the score, with ``1`` followed by ``0`` read as 10. Decimals
  are ignored. The teacher-forced ``1`` makes both distributions come out of one forward pass.

Static shapes: prompts are left-padded to a multiple of ``bucket`` and every batch is padded to ``batch_size`` rows
(repeating its last row), so scoring a dataset compiles once per prompt-length bucket. With a mesh, ``batch_size``
is rounded up to a multiple of the data-parallel size and batches are laid out on the ``('data', 'fsdp')`` axes;
params are sharded by their logical axes. Every process must pass the same records.

Shared prefixes (editing-GRPO groups): rows whose prompts agree up to the edited image (same source image; the
system turn is fixed) are batched together and decoded with
`edit_r1_jax.models.qwen2_5_vl.prefix.generate_shared_prefix`, which encodes the source image and prefills that
prefix once per group. ``share_prefix=None`` turns it on when rows average two or more per prefix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.models.qwen2_5_vl.generate import HELD_LAYOUTS, resolve_decode_layout
from edit_r1_jax.rrm import parse as parse_lib
from edit_r1_jax.rrm import prompts
from edit_r1_jax.rrm.inputs import RRMInputs, pad_batch

MODES = ("generate", "logits")
RRM_META_FILE = "rrm.json"          # optional checkpoint metadata: {"compact_prompt": bool}
_STATUS_RANK = {"ok": 0, "fallback_average": 1}


# ---------------------------------------------------------------------------------------------------- results

@dataclasses.dataclass
class ScoreResult:
    """Score of one record. ``score`` is NaN when no trace parsed; ``reward`` replaces that by 0 (e6)."""
    id: Any
    score: float
    reward: float
    status: str                      # ok | fallback_average | failed | partial (k > 1: some traces failed)
    verdicts: list                   # per principle: 0/1/None (k = 1) or the mean over traces that gave one
    average: float | None
    traces: list                     # generated texts, one per sample ([] in logits mode)
    sample_scores: list              # per trace (NaN = failed)
    digit_probs: list | None = None  # logits mode: p(0..9) after the scoring prefix

    @property
    def trace(self) -> str:
        return self.traces[0] if self.traces else ""

    def to_json(self) -> dict:
        """JSON-safe dict (NaN -> null)."""
        def f(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
        out = {"id": self.id, "score": f(self.score), "reward": f(self.reward), "status": self.status,
               "verdicts": [f(v) for v in self.verdicts], "average": f(self.average)}
        if self.digit_probs is not None:
            out["digit_probs"] = self.digit_probs
        else:
            out["trace"] = self.trace if len(self.traces) == 1 else self.traces
            if len(self.sample_scores) > 1:
                out["sample_scores"] = [f(s) for s in self.sample_scores]
        return out


class Scores(list):
    """``list[ScoreResult]`` in input order, with run statistics as attributes."""
    mode: str = "generate"
    num_traces: int = 0               # generated traces (records x samples)
    num_failed_traces: int = 0
    seconds: float = 0.0

    @property
    def parse_failure_rate(self) -> float:
        return self.num_failed_traces / self.num_traces if self.num_traces else 0.0

    def rewards(self) -> np.ndarray:
        return np.asarray([r.reward for r in self], np.float32)

    def scores(self) -> np.ndarray:
        return np.asarray([r.score for r in self], np.float32)


def trace_score(p: parse_lib.ParseResult) -> float:
    """Score of one parsed trace: the parsed score, NaN when parsing failed (e6)."""
    return float("nan") if p.score is None else float(p.score)


def aggregate(rid: Any, texts: Sequence[str], num_principles: int) -> ScoreResult:
    """Parse the traces of one record and combine them (module docstring)."""
    parsed = [parse_lib.parse(t, num_principles) for t in texts]
    s = np.asarray([trace_score(p) for p in parsed], np.float64)
    ok = ~np.isnan(s)
    score = float(s[ok].mean()) if ok.any() else float("nan")
    reward = float(np.where(ok, s, 0.0).mean())
    if not ok.any():
        status = "failed"
    elif not ok.all():
        status = "partial"
    else:
        status = max((p.status for p in parsed), key=lambda st: _STATUS_RANK[st])
    if len(parsed) == 1:
        verdicts = list(parsed[0].verdicts)
    else:
        verdicts = []
        for k in range(num_principles):
            vs = [p.verdicts[k] for p in parsed if p.verdicts[k] is not None]
            verdicts.append(float(np.mean(vs)) if vs else None)
    avgs = [p.average for p in parsed if p.average is not None]
    return ScoreResult(rid, score, reward, status, verdicts, float(np.mean(avgs)) if avgs else None, list(texts),
                       [float(x) for x in s])


def expected_digit_score(logits_b2v: np.ndarray, digit_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Logit-mode score from the logits after the prefix ([:, 0]) and after prefix + '1' ([:, 1]).

    -> (expected score [B] in [0, 10], digit probabilities [B, 10]); formula in the module docstring. float64.
    """
    lg = np.asarray(logits_b2v, np.float64)
    d = np.asarray(digit_ids)
    dl = lg[:, 0, d]
    p = np.exp(dl - dl.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    after_one = lg[:, 1]
    q = np.exp(after_one - after_one.max(-1, keepdims=True))
    r = q[:, d[0]] / q.sum(-1)
    values = np.broadcast_to(np.arange(10, dtype=np.float64), p.shape).copy()
    values[:, 1] = 1.0 + 9.0 * r
    return (p * values).sum(-1), p


# ---------------------------------------------------------------------------------------------------- model

def _last_logits_impl(params, ids_bt, mask_bt, pv, *, cfg, grid, sharding=None):
    """Same computation as ``qwen2_5_vl.forward`` but projecting only the last two positions to the vocabulary."""
    import flax.linen as nn
    from edit_r1_jax.models.qwen2_5_vl.common import sharding_context
    from edit_r1_jax.models.qwen2_5_vl.model import Qwen25VL, embed_inputs, position_ids_for

    with sharding_context(*(sharding or (None, ()))):
        def body(mdl):
            x, _ = embed_inputs(mdl, cfg, ids_bt, pv, grid)
            h, _, _ = mdl.decode(x, position_ids_for(cfg, ids_bt, mask_bt, grid), mask_bt)
            return mdl.logits(h[:, -2:])
        return nn.apply(body, Qwen25VL(cfg))({"params": params})


_last_logits = jax.jit(_last_logits_impl, static_argnames=("cfg", "grid", "sharding"))


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _load(img: Any) -> np.ndarray:
    from edit_r1_jax.data.formats import load_image
    return load_image(img)


class RewardModel:
    """The RRM as a scorer: ``RewardModel(cfg, params, inputs, mesh=None).score(records)``.

    ``records``: dicts with ``instruction``, ``principles`` (list of str or ``{"question", "category"}``),
    ``source`` and ``edited`` images (uint8 HWC arrays, float arrays in [0, 1], paths, ...; see
    `edit_r1_jax.data.formats.load_image`) and optionally ``id``.
    """

    def __init__(self, cfg, params, inputs: RRMInputs, mesh=None, *, rules=None, batch_size: int = 8,
                 bucket: int = 64, max_new_tokens: int = 512, score_prefix: str = "<score>"):
        self.cfg, self.inputs, self.mesh = cfg, inputs, mesh
        self.rules = rules
        self.bucket = int(bucket)
        self.max_new_tokens = int(max_new_tokens)
        self.score_prefix = score_prefix
        self.batch_size = int(batch_size)
        if mesh is not None:
            from edit_r1_jax import parallel
            rules = tuple(parallel.DEFAULT_RULES if rules is None else rules)
            leaf = jax.tree.leaves(params)[0]
            if not (isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
                    and leaf.sharding.mesh == mesh):
                shardings = parallel.logical_shardings(qwen.param_logical_axes(cfg), mesh, rules,
                                                       shapes=qwen.param_shapes(cfg))
                params = parallel.shard_tree(params, shardings)
        self.params = params
        self._digit_ids = None

    @property
    def params(self) -> dict:
        return self._params

    @params.setter
    def params(self, params: dict):
        """New parameters (a checkpoint, GRPO's offload/onload) drop the decode weights held for the old ones."""
        self._params = params
        self._held_decode = None

    def decode_weights(self):
        """`qwen2_5_vl.prepare_decode` of ``params``, made at the first generation and held across batches, on CPU
        only (there it saves every call's kernel transposes; on accelerators it would only copy the weights)."""
        if resolve_decode_layout("auto", self.params) not in HELD_LAYOUTS:
            return None
        if self._held_decode is None:
            self._held_decode = qwen.prepare_decode(self.cfg, self.params)
        return self._held_decode

    @classmethod
    def from_dir(cls, path: str, mesh=None, dtype=jnp.float32, compact: bool | None = None, **kw) -> "RewardModel":
        """Load an exported RRM directory (config.json + safetensors + tokenizer + preprocessor_config.json, as
        ``edit-r1-jax sft`` writes to WORKDIR/hf). ``compact``: the short scoring system prompt; default from
        ``rrm.json`` in the directory (``{"compact_prompt": true}``), else the full prompt."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"reward model directory not found: {path}")
        if compact is None:
            meta = os.path.join(path, RRM_META_FILE)
            compact = bool(json.load(open(meta)).get("compact_prompt", False)) if os.path.exists(meta) else False
        cfg, params = qwen.load_pretrained(path, dtype=dtype, mesh=mesh)
        return cls(cfg, params, RRMInputs.from_dir(path, compact=compact), mesh, **kw)

    # ------------------------------------------------------------------------------------------ inputs

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        from edit_r1_jax import parallel
        return parallel.data_parallel_size(self.mesh)

    def effective_batch_size(self, batch_size: int | None = None) -> int:
        return _round_up(int(batch_size or self.batch_size), self._batch_multiple())

    @property
    def digit_ids(self) -> list:
        if self._digit_ids is None:
            ids = []
            for d in range(10):
                enc = self.inputs.encode_ids(str(d))
                if len(enc) != 1:
                    raise ValueError(f"logit mode needs single-token digits, but '{d}' tokenises to {list(enc)}")
                ids.append(int(enc[0]))
            self._digit_ids = ids
        return self._digit_ids

    def example(self, record: dict, mode: str = "generate") -> dict:
        """Tokenised prompt of one record (logits mode: followed by the scoring prefix and '1')."""
        principles = record.get("principles")
        if not principles:
            raise ValueError(f"record {record.get('id', '?')}: 'principles' is missing or empty")
        ex = self.inputs.scoring_prompt(record["instruction"], principles, _load(record["source"]),
                                        _load(record["edited"]))
        if mode == "logits":
            tail = self.inputs.encode_ids(self.score_prefix + "1")
            if len(tail) < 2 or int(tail[-1]) != self.digit_ids[1]:
                raise ValueError(f"score prefix {self.score_prefix!r} + '1' must end in the single token '1', got "
                                 f"{list(tail)}")
            ex["input_ids"] = np.concatenate([ex["input_ids"], tail]).astype(np.int32)
        ex["num_principles"] = len(principles)
        return ex

    def _place(self, x: np.ndarray):
        if self.mesh is None:
            return x
        from edit_r1_jax import parallel
        if x.shape[0] % parallel.data_parallel_size(self.mesh):
            return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))

    def _padded(self, examples: Sequence[dict], batch_size: int) -> dict:
        examples = list(examples) + [examples[-1]] * (batch_size - len(examples))
        t = _round_up(max(len(e["input_ids"]) for e in examples), self.bucket)
        return pad_batch(examples, self.inputs.pad_id, length=t, left=True)

    # ------------------------------------------------------------------------------------------ decoding

    def generate_tokens(self, examples: Sequence[dict], *, temperature: float = 0.0, rng=None,
                        max_new_tokens: int | None = None, batch_size: int | None = None) -> np.ndarray:
        """Plain path: one static-shape batch (``len(examples) <= batch_size``) -> tokens [len, N]."""
        bs = self.effective_batch_size(batch_size)
        b = self._padded(examples, bs)
        toks, _ = qwen.generate(self.cfg, self.params, self._place(b["input_ids"]), self._place(b["attention_mask"]),
                                self._place(b["pixel_values"]), b["image_grid_thw"],
                                max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=temperature,
                                rng=rng, eos_token_id=self.inputs.eos_id, pad_token_id=self.inputs.pad_id,
                                bucket=self.bucket, decode_weights=self.decode_weights())
        return _to_host(toks)[: len(examples)]

    def generate_tokens_shared(self, examples: Sequence[dict], keys: Sequence[str], num_prefixes: int, *,
                               temperature: float = 0.0, rng=None, max_new_tokens: int | None = None,
                               batch_size: int | None = None) -> np.ndarray:
        """Shared-prefix path for one batch: rows with equal ``keys`` share the prompt up to the edited image."""
        from edit_r1_jax.models.qwen2_5_vl.prefix import generate_shared_prefix
        bs = self.effective_batch_size(batch_size)
        n = len(examples)
        examples = list(examples) + [examples[-1]] * (bs - n)
        keys = list(keys) + [keys[-1]] * (bs - n)
        order = list(dict.fromkeys(keys))
        if len(order) > num_prefixes:
            raise ValueError(f"batch has {len(order)} distinct prefixes, more than num_prefixes={num_prefixes}")
        first = {k: keys.index(k) for k in order}
        pre, suf = [], []
        for e in examples:
            p, s = split_at_edited_image(e, self.inputs)
            pre.append(p)
            suf.append(s)
        pre_rows = [pre[first[k]] for k in order]
        pre_rows += [pre_rows[-1]] * (num_prefixes - len(pre_rows))
        gidx = np.asarray([order.index(k) for k in keys], np.int32)
        pb = pad_batch(pre_rows, self.inputs.pad_id, _round_up(max(len(p["input_ids"]) for p in pre_rows),
                                                                self.bucket), left=True)
        sb = pad_batch(suf, self.inputs.pad_id, _round_up(max(len(s["input_ids"]) for s in suf), self.bucket),
                       left=False)
        toks, _ = generate_shared_prefix(
            self.cfg, self.params, pb["input_ids"], pb["attention_mask"], pb["pixel_values"], pb["image_grid_thw"],
            gidx, sb["input_ids"], sb["attention_mask"], sb["pixel_values"], sb["image_grid_thw"],
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=temperature, rng=rng,
            eos_token_id=self.inputs.eos_id, pad_token_id=self.inputs.pad_id, bucket=self.bucket,
            decode_weights=self.decode_weights())
        return _to_host(toks)[:n]

    def last_logits(self, examples: Sequence[dict], batch_size: int | None = None) -> np.ndarray:
        """Logits at the last two prompt positions of one static-shape batch -> [len, 2, vocab] float32."""
        from edit_r1_jax.models.qwen2_5_vl.model import _prep, sharding_of
        bs = self.effective_batch_size(batch_size)
        b = self._padded(examples, bs)
        grid, ids, mask, pv = _prep(self.cfg, self.params, b["input_ids"], b["attention_mask"], b["pixel_values"],
                                    b["image_grid_thw"])
        out = _last_logits(self.params, self._place(np.asarray(ids)), self._place(np.asarray(mask)),
                           self._place(np.asarray(pv)), cfg=self.cfg, grid=grid,
                           sharding=sharding_of(self.params, self.mesh, self.rules))
        return _to_host(out)[: len(examples)]

    def decode(self, tokens: np.ndarray) -> list:
        return [self.inputs.decode(row) for row in tokens]

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, records: Sequence[dict], mode: str = "generate", samples: int = 1,
              temperature: float | None = None, rng=None, batch_size: int | None = None,
              share_prefix: bool | None = None, max_new_tokens: int | None = None) -> Scores:
        """Score records -> `Scores` (results in input order; ``.parse_failure_rate``). See the module docstring.

        ``temperature``: default 0 (greedy) for one sample, 0.7 for ``samples > 1``; sampling uses ``rng``
        (default ``jax.random.key(0)``), folded with the batch number.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if samples < 1:
            raise ValueError(f"samples={samples} must be >= 1")
        t0 = time.perf_counter()
        out = Scores()
        out.mode = mode
        records = list(records)
        if not records:
            return out
        ids = [r.get("id", i) for i, r in enumerate(records)]
        examples = [self.example(r, mode) for r in records]
        bs = self.effective_batch_size(batch_size)
        if mode == "logits":
            for lo in range(0, len(examples), bs):
                chunk = examples[lo:lo + bs]
                exp, probs = expected_digit_score(self.last_logits(chunk, bs), self.digit_ids)
                for j, e in enumerate(chunk):
                    n = e["num_principles"]
                    s = float(np.clip(exp[j], 0.0, 10.0))
                    out.append(ScoreResult(ids[lo + j], s, s, "ok", [None] * n, None, [], [s],
                                           [float(x) for x in probs[j]]))
            out.seconds = time.perf_counter() - t0
            return out

        temperature = (0.0 if samples == 1 else 0.7) if temperature is None else float(temperature)
        if samples > 1 and temperature == 0.0:
            raise ValueError("samples > 1 with temperature 0 gives identical greedy traces; set temperature > 0")
        rng = jax.random.key(0) if rng is None else rng
        rows = [(i, s) for i in range(len(examples)) for s in range(samples)]
        keys = [prefix_key(e, self.inputs) for e in examples]
        if share_prefix is None:
            share_prefix = len(rows) >= 2 * len(set(keys))
        if share_prefix:
            rank = {k: n for n, k in enumerate(dict.fromkeys(keys))}
            rows.sort(key=lambda r: (rank[keys[r[0]]], r[0], r[1]))
        batches = [rows[lo:lo + bs] for lo in range(0, len(rows), bs)]
        num_prefixes = 0
        if share_prefix:
            most = max(len({keys[i] for i, _ in b}) for b in batches)
            num_prefixes = min(1 << (most - 1).bit_length(), bs)
        texts: dict = {}
        for n, batch in enumerate(batches):
            exs = [examples[i] for i, _ in batch]
            key = jax.random.fold_in(rng, n)
            if share_prefix:
                toks = self.generate_tokens_shared(exs, [keys[i] for i, _ in batch], num_prefixes,
                                                   temperature=temperature, rng=key, max_new_tokens=max_new_tokens,
                                                   batch_size=bs)
            else:
                toks = self.generate_tokens(exs, temperature=temperature, rng=key, max_new_tokens=max_new_tokens,
                                            batch_size=bs)
            for (i, s), text in zip(batch, self.decode(toks)):
                texts[(i, s)] = text
        for i, e in enumerate(examples):
            r = aggregate(ids[i], [texts[(i, s)] for s in range(samples)], e["num_principles"])
            out.append(r)
            out.num_traces += samples
            out.num_failed_traces += sum(math.isnan(x) for x in r.sample_scores)
        out.seconds = time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------------------- prefixes

def _edited_image_start(ids: np.ndarray, inputs: RRMInputs) -> int:
    starts = np.flatnonzero(np.asarray(ids) == inputs.token_id(prompts.VISION_START))
    if len(starts) < 2:
        raise ValueError(f"scoring prompt has {len(starts)} images; expected the source and the edited image")
    return int(starts[1])


def split_at_edited_image(ex: dict, inputs: RRMInputs) -> tuple[dict, dict]:
    """A scoring example -> (prefix: tokens before the edited image + the source image's patches,
    suffix: the rest + the edited image's patches)."""
    k = _edited_image_start(ex["input_ids"], inputs)
    grid = np.asarray(ex["image_grid_thw"])
    n_src = int(np.prod(grid[0]))
    return ({"input_ids": ex["input_ids"][:k], "pixel_values": ex["pixel_values"][:n_src],
             "image_grid_thw": grid[:1]},
            {"input_ids": ex["input_ids"][k:], "pixel_values": ex["pixel_values"][n_src:],
             "image_grid_thw": grid[1:]})


def prefix_key(ex: dict, inputs: RRMInputs) -> str:
    """Hash of the shared part of a scoring prompt (tokens before the edited image and the source pixels)."""
    k = _edited_image_start(ex["input_ids"], inputs)
    n_src = int(np.prod(np.asarray(ex["image_grid_thw"])[0]))
    h = hashlib.sha1(np.ascontiguousarray(ex["input_ids"][:k], np.int32).tobytes())
    h.update(np.ascontiguousarray(ex["pixel_values"][:n_src]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- reward hook

class RewardFn(Protocol):
    """What the editing-GRPO loop calls: edited images + their prompt records -> rewards [B] float32.

    ``images``: uint8 HWC arrays (or floats in [0, 1]); ``records``: dicts with at least ``instruction``,
    ``source``, ``principles`` (the editing prompt), in the same order as ``images``.
    """
    def __call__(self, images: Sequence[Any], records: Sequence[dict]) -> np.ndarray: ...


class RRMReward:
    """`RewardFn` backed by a `RewardModel` (greedy generate mode by default, e14). ``self.last`` keeps the
    latest `Scores` (statuses, traces, parse-failure rate) for logging."""

    def __init__(self, model: RewardModel, mode: str = "generate", samples: int = 1,
                 temperature: float | None = None, seed: int = 0, batch_size: int | None = None,
                 share_prefix: bool | None = None):
        self.model, self.mode, self.samples, self.temperature = model, mode, samples, temperature
        self.batch_size, self.share_prefix = batch_size, share_prefix
        self._key = jax.random.key(seed)
        self._calls = 0
        self.last: Scores | None = None

    def __call__(self, images, records) -> np.ndarray:
        if len(images) != len(records):
            raise ValueError(f"RRMReward: {len(images)} images but {len(records)} records")
        recs = [{"id": r.get("id", i), "instruction": r["instruction"], "principles": r["principles"],
                 "source": r["source"], "edited": img} for i, (img, r) in enumerate(zip(images, records))]
        self._calls += 1
        self.last = self.model.score(recs, mode=self.mode, samples=self.samples, temperature=self.temperature,
                                     rng=jax.random.fold_in(self._key, self._calls), batch_size=self.batch_size,
                                     share_prefix=self.share_prefix)
        return self.last.rewards()


class SyntheticGoldReward:
    """Toy `RewardFn` for the synthetic world: the pixel-verified gold score (0-10) of each edited image, read
    with `edit_r1_jax.data.synthetic.gold_score`. Records need ``source_scene`` and ``edit`` (as
    ``make_edit_prompts`` writes them)."""

    def __call__(self, images, records) -> np.ndarray:
        from edit_r1_jax.data import synthetic
        if len(images) != len(records):
            raise ValueError(f"SyntheticGoldReward: {len(images)} images but {len(records)} records")
        out = []
        for img, r in zip(images, records):
            for f in ("source_scene", "edit"):
                if f not in r:
                    raise KeyError(f"SyntheticGoldReward: record {r.get('id', '?')} has no '{f}' field")
            pr = r.get("principles")
            pr = pr if pr and all(isinstance(p, dict) and "check" in p for p in pr) else None
            out.append(synthetic.gold_score(r["source_scene"], r["edit"], _load(img), pr))
        return np.asarray(out, np.float32)
