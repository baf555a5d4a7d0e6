"""Grain input pipeline: per-process shard -> seeded shuffle -> repeat -> tokenize -> pad to length buckets -> batch.

    source (random access: list, formats.JsonlSource, tfds_builders.TfdsRecords)
      -> this process's shard: records p, p + P, p + 2P, ... (P = process count; equal sizes on every process)
      -> shuffle(seed) (a new permutation every epoch) -> repeat(num_epochs; None = forever)
      -> tokenize_fn(record) -> dict of numpy arrays
      -> batch of global_batch_size / P rows; keys in ``pad_values`` have the sequence as their first axis and are
         padded with their pad value to one length per batch: the smallest of ``length_buckets`` that fits (or the
         longest row rounded up to ``pad_to_multiple``), so the jitted step sees a few shapes only
      -> grain IterDataset; ``it = iter(ds)``, ``it.get_state()`` / ``it.set_state(s)`` checkpoint the position.

Every process builds the same pipeline with its own ``process_index``; all shards have the same length, so all
processes take the same number of steps and their iterator states are identical (``{"next_index": k}``), which is
why one JSON copy in the checkpoint suffices. Different processes may pick different bucket lengths for the same
step: ``global_batch`` agrees on the longest (one tiny all-gather) before assembling the global ``jax.Array``.

With ``drop_remainder=False`` (evaluation: one pass, nothing dropped) the shards are padded to equal length with
empty rows and every batch carries ``valid`` (bool[B]): False for padding rows, which losses and metrics must mask.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from edit_r1_jax import parallel

VALID_KEY = "valid"


class ProcessShard:
    """Records ``p, p + P, ...`` of ``source``. ``pad=False``: every shard has ``len // P`` records (the tail is
    dropped); ``pad=True``: ``ceil(len / P)``, missing ones are ``None`` (padding rows)."""

    def __init__(self, source: Any, process_index: int, process_count: int, pad: bool):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.source, self.p, self.n_proc = source, process_index, process_count
        n = len(source)
        self.length = math.ceil(n / process_count) if pad else n // process_count
        if self.length == 0:
            raise ValueError(f"data: {n} records cannot feed {process_count} processes (each needs at least one)")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        j = i * self.n_proc + self.p
        return self.source[j] if j < len(self.source) else None


class Tokenize:
    """``tokenize_fn`` with the record's origin in any error; ``None`` (padding) passes through."""

    def __init__(self, tokenize_fn: Callable[[Any], Mapping[str, Any]]):
        self.fn = tokenize_fn

    def __call__(self, record: Any) -> Any:
        if record is None:
            return None
        try:
            out = self.fn(record)
        except Exception as e:  # noqa: BLE001 - re-raised with the record's origin
            origin = record.get("_origin", record.get("id", "?")) if isinstance(record, dict) else "?"
            raise RuntimeError(f"data: tokenize failed for record {origin}: {type(e).__name__}: {e}") from e
        return {k: np.asarray(v) for k, v in out.items()}


def bucket_length(length: int, length_buckets: Sequence[int] | None, pad_to_multiple: int = 1) -> int:
    """Smallest bucket >= length (error if none), or ``length`` rounded up to ``pad_to_multiple``."""
    if length_buckets:
        for b in sorted(length_buckets):
            if b >= length:
                return int(b)
        raise ValueError(f"data: a sequence of length {length} is longer than the largest length bucket "
                         f"{max(length_buckets)}; raise the largest bucket (data.length_buckets) or truncate in "
                         f"the tokenize function")
    m = max(1, int(pad_to_multiple))
    return int(math.ceil(max(length, 1) / m) * m)


def pad_to(x: np.ndarray, length: int, pad_value: Any, axis: int = 0) -> np.ndarray:
    if x.shape[axis] > length:
        raise ValueError(f"pad_to: length {x.shape[axis]} > target {length}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return np.pad(x, widths, constant_values=pad_value)


class PadCollate:
    """Rows (dicts of arrays, or None for padding) -> one batch dict; see the module docstring."""

    def __init__(self, batch_size: int, pad_values: Mapping[str, Any], length_buckets: Sequence[int] | None,
                 pad_to_multiple: int, template: Mapping[str, np.ndarray] | None, with_valid: bool):
        self.batch_size = batch_size
        self.pad_values = dict(pad_values)
        self.length_buckets = tuple(sorted(length_buckets)) if length_buckets else None
        self.pad_to_multiple = pad_to_multiple
        self.template = template
        self.with_valid = with_valid

    def _empty_row(self) -> dict:
        if self.template is None:
            raise ValueError("data: a padding row is needed but no template example is available")
        return {k: (np.zeros((0,) + v.shape[1:], v.dtype) if k in self.pad_values else np.zeros_like(v))
                for k, v in self.template.items()}

    def __call__(self, rows: Sequence[Any]) -> dict:
        valid = [r is not None for r in rows]
        rows = [r if r is not None else self._empty_row() for r in rows]
        rows += [self._empty_row() for _ in range(self.batch_size - len(rows))]
        valid += [False] * (self.batch_size - len(valid))
        keys = list(rows[0].keys())
        for r in rows[1:]:
            if list(r.keys()) != keys:
                raise ValueError(f"data: tokenized examples have different keys: {sorted(keys)} vs {sorted(r)}")
        missing = [k for k in self.pad_values if k not in keys]
        if missing:
            raise KeyError(f"data: pad_values names {missing} but the tokenized examples have keys {sorted(keys)}")
        longest = max((r[k].shape[0] for r in rows for k in self.pad_values), default=0)
        length = bucket_length(longest, self.length_buckets, self.pad_to_multiple)
        out = {}
        for k in keys:
            if k in self.pad_values:
                out[k] = np.stack([pad_to(r[k], length, self.pad_values[k]) for r in rows])
            else:
                shapes = {r[k].shape for r in rows}
                if len(shapes) > 1:
                    raise ValueError(f"data: key '{k}' has different shapes across examples {sorted(shapes)}; add it "
                                     f"to pad_values if its first axis is a sequence, or make it fixed-size")
                out[k] = np.stack([r[k] for r in rows])
        if self.with_valid:
            out[VALID_KEY] = np.asarray(valid, bool)
        return out


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of processes "
                         f"{process_count}")
    return global_batch_size // process_count


def make_pipeline(source: Any, *, tokenize_fn: Callable[[Any], Mapping[str, Any]], global_batch_size: int,
                  seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  pad_values: Mapping[str, Any] | None = None, length_buckets: Sequence[int] | None = None,
                  pad_to_multiple: int = 8, drop_remainder: bool = True, process_index: int | None = None,
                  process_count: int | None = None, num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """Build the pipeline described in the module docstring; returns a grain ``IterDataset`` of batch dicts.

    ``source``: random-access records. ``tokenize_fn(record) -> {key: array}``. ``pad_values``: {key: pad value}
    for keys whose first axis is the sequence (e.g. ``{"tokens": pad_id, "loss_mask": 0}``). ``num_epochs=None``
    repeats forever (training); evaluation uses ``num_epochs=1, shuffle=False, drop_remainder=False``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_bs = per_process_batch_size(global_batch_size, process_count)
    if len(source) == 0:
        raise ValueError("data: the record source is empty")
    shard = ProcessShard(source, process_index, process_count, pad=not drop_remainder)
    ds = grain.MapDataset.source(shard)
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    tok = Tokenize(tokenize_fn)
    ds = ds.map(tok)
    template = None
    if not drop_remainder:
        template = tok(source[0])
    collate = PadCollate(local_bs, pad_values or {}, length_buckets, pad_to_multiple, template,
                         with_valid=not drop_remainder)
    ds = ds.batch(local_bs, drop_remainder=drop_remainder, batch_fn=collate)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def num_batches(num_records: int, global_batch_size: int, drop_remainder: bool, process_count: int | None = None
                ) -> int:
    """Batches per epoch on every process."""
    process_count = jax.process_count() if process_count is None else process_count
    local_bs = per_process_batch_size(global_batch_size, process_count)
    per_proc = math.ceil(num_records / process_count) if not drop_remainder else num_records // process_count
    return per_proc // local_bs if drop_remainder else math.ceil(per_proc / local_bs)


def agree_lengths(local_batch: Mapping[str, np.ndarray], pad_values: Mapping[str, Any]) -> dict:
    """Re-pad the sequence keys to the longest length over all processes (no-op on one process)."""
    if jax.process_count() == 1 or not pad_values:
        return dict(local_batch)
    from jax.experimental import multihost_utils
    mine = max(local_batch[k].shape[1] for k in pad_values)
    longest = int(np.max(multihost_utils.process_allgather(np.asarray([mine], np.int32))))
    out = dict(local_batch)
    for k, v in pad_values.items():
        out[k] = pad_to(local_batch[k], longest, v, axis=1)
    return out


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Any, pad_values: Mapping[str, Any] | None = None
                 ) -> dict:
    """This process's rows -> global ``jax.Array``s sharded over ('data','fsdp') (lengths agreed first)."""
    return parallel.global_batch_from_local(agree_lengths(local_batch, pad_values or {}), mesh)
