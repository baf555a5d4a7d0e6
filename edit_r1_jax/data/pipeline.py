"""Grain input pipeline: seeded global shuffle -> repeat -> this process's rows -> tokenize -> pad to buckets -> batch.

    source (random access: list, formats.JsonlSource, tfds_builders.TfdsRecords)
      -> shuffle(seed) over the whole source (a new permutation every epoch) -> repeat(num_epochs; None = forever)
      -> the stream is cut into global batches of ``global_batch_size`` rows; process p of P reads only rows
         [p*B/P, (p+1)*B/P) of each global batch (B/P = the per-process batch)
      -> tokenize_fn(record) -> dict of numpy arrays (only this process's rows are loaded and tokenized)
      -> batch; keys in ``pad_values`` have the sequence as their first axis and are padded with their pad value
         to one length per batch: the smallest of ``length_buckets`` that fits (or the longest row rounded up to
         ``pad_to_multiple``), so the jitted step sees a few shapes only
      -> grain IterDataset; ``it = iter(ds)``, ``it.get_state()`` / ``it.set_state(s)`` checkpoint the position.

Because every process walks the same global stream, the global batch (the local slices in process order, which is
how ``jax.make_array_from_process_local_data`` lays them out on the ('data','fsdp') axes) is the same for any
number of processes: a 2-process run sees exactly the batches of a 1-process run, and a checkpoint written with
P processes resumes the same data order with any other count. All processes take the same number of steps and
their iterator states are identical (``{"next_index": k}``), so one JSON copy in the checkpoint suffices.
Different processes may pick different bucket lengths for the same step: ``global_batch`` agrees on the longest
(one tiny all-gather) before assembling the global ``jax.Array``.

With ``drop_remainder=False`` (evaluation: one pass, nothing dropped) the last global batch is filled with empty
rows and every batch carries ``valid`` (bool[B]): False for padding rows, which losses and metrics must mask.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from edit_r1_jax import parallel

VALID_KEY = "valid"


class LocalRows:
    """Process ``p``'s rows of every global batch of ``stream`` (random access). Row ``i`` of this view is row
    ``i % L`` of this process's slice of global batch ``i // L`` (L = per-process batch). ``pad=True``: the last
    global batch is completed with ``None`` rows (padding); ``pad=False``: an incomplete last batch is dropped."""

    def __init__(self, stream: Any, global_batch_size: int, process_index: int, process_count: int, pad: bool):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.stream, self.g, self.p = stream, int(global_batch_size), int(process_index)
        self.local = per_process_batch_size(global_batch_size, process_count)
        n = len(stream)
        n_batches = -(-n // self.g) if pad else n // self.g
        if n_batches == 0:
            raise ValueError(f"data: {n} records are fewer than one global batch of {self.g} "
                             f"(use fewer rows per batch or drop_remainder=False)")
        self.length = n_batches * self.local

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        j = (i // self.local) * self.g + self.p * self.local + i % self.local
        return self.stream[j] if j < len(self.stream) else None


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
    """Build the pipeline described in the module docstring; returns a grain ``IterDataset`` of batch dicts with
    ``global_batch_size / process_count`` rows (this process's slice of the global batch).

    ``source``: random-access records. ``tokenize_fn(record) -> {key: array}``. ``pad_values``: {key: pad value}
    for keys whose first axis is the sequence (e.g. ``{"tokens": pad_id, "loss_mask": 0}``). ``num_epochs=None``
    repeats forever (training); evaluation uses ``num_epochs=1, shuffle=False, drop_remainder=False``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_bs = per_process_batch_size(global_batch_size, process_count)
    if len(source) == 0:
        raise ValueError("data: the record source is empty")
    stream = grain.MapDataset.source(source)
    if shuffle:
        stream = stream.shuffle(seed=int(seed) % 2**32)
    if num_epochs != 1:
        stream = stream.repeat(num_epochs)
    rows = LocalRows(stream, global_batch_size, process_index, process_count, pad=not drop_remainder)
    tok = Tokenize(tokenize_fn)
    ds = grain.MapDataset.source(rows).map(tok)
    template = tok(source[0]) if not drop_remainder else None
    collate = PadCollate(local_bs, pad_values or {}, length_buckets, pad_to_multiple, template,
                         with_valid=not drop_remainder)
    ds = ds.batch(local_bs, drop_remainder=True, batch_fn=collate)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def num_batches(num_records: int, global_batch_size: int, drop_remainder: bool) -> int:
    """Batches per epoch (the same on every process, for any process count)."""
    return -(-num_records // global_batch_size) if not drop_remainder else num_records // global_batch_size


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
