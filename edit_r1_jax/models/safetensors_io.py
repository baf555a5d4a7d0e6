"""Safetensors read/write without pickle and without materialising whole checkpoints.

The reader parses the safetensors header itself (8-byte little-endian length + JSON) and memory-maps each tensor as a
NumPy array, so bf16 works (as ``ml_dtypes.bfloat16``; env-notes G15: ``safetensors.numpy`` rejects bf16) and a
loader can place tensors one at a time onto their target shardings. Sharded checkpoints are read through their
``*.safetensors.index.json``. The writer produces Hub-style shards plus an index, written to a temporary directory
and renamed into place so a failure never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint does not match what the model expects (names every offending tensor)."""


def read_header(path: str) -> tuple[dict, int]:
    """(the JSON header of one safetensors file, the byte offset of its data section); raises CheckpointError."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsReader:
    """Lazy reader over one safetensors file or a directory of them (with or without an index)."""

    def __init__(self, path: str, prefix: str | None = None):
        self.path = path
        files: list[str]
        if os.path.isdir(path):
            index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
            if prefix is not None:
                index = [f for f in index if f.startswith(prefix)]
            if index:
                with open(os.path.join(path, sorted(index)[0])) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({os.path.join(path, v) for v in weight_map.values()})
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
                               and (prefix is None or f.startswith(prefix)))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files found (pickled .bin checkpoints are not read)")
        else:
            files = [path]
        self._entries: dict[str, tuple[str, int, dict]] = {}
        self.metadata: dict[str, str] = {}      # the files' "__metadata__" (string -> string), merged
        for fpath in files:
            if not os.path.exists(fpath):
                raise CheckpointError(f"{fpath}: listed in the index but missing")
            header, base = read_header(fpath)
            for name, info in header.items():
                if name == "__metadata__":
                    self.metadata.update(info)
                    continue
                self._entries[name] = (fpath, base, info)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name][2]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """Memory-mapped, read-only array in the file's dtype."""
        fpath, base, info = self._entries[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{fpath}: tensor '{name}' byte length {end - start} does not match shape {shape} "
                                  f"of {info['dtype']}")
        mm = np.memmap(fpath, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return mm.view(dtype).reshape(shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._entries}


def check_tensors(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]],
                  source: str, ignore: Iterable[str] = ()) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    ignore = set(ignore)
    missing = sorted(k for k in expected if k not in actual)
    extra = sorted(k for k in actual if k not in expected and k not in ignore)
    bad = sorted(k for k in expected if k in actual and tuple(actual[k]) != tuple(expected[k]))
    if not (missing or extra or bad):
        return
    lines = [f"checkpoint {source} does not match the model config:"]
    for k in missing:
        lines.append(f"  missing tensor: {k} (expected shape {tuple(expected[k])})")
    for k in extra:
        lines.append(f"  unexpected tensor: {k} (shape {tuple(actual[k])})")
    for k in bad:
        lines.append(f"  wrong shape: {k}: expected {tuple(expected[k])}, got {tuple(actual[k])}")
    raise CheckpointError("\n".join(lines))


def _write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"tensor '{name}': dtype {arr.dtype} cannot be written to safetensors")
        nbytes = arr.nbytes
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for arr in arrays:
            f.write(arr.tobytes())


def write_safetensors(tensors: Mapping[str, np.ndarray], out_dir: str, basename: str = "model",
                      max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None,
                      extra_files: Mapping[str, str] | None = None) -> list[str]:
    """Write ``basename.safetensors`` (or ``basename-0000k-of-0000n.safetensors`` + index) into ``out_dir``.

    ``extra_files``: {filename: text} written alongside (e.g. config.json). Everything is written to a temporary
    sibling directory first and moved into ``out_dir`` only when complete (existing files with the same names are
    replaced; other files in ``out_dir`` are kept).
    """
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        names = []
        if len(shards) == 1:
            names.append(f"{basename}.safetensors")
            _write_file(os.path.join(tmp, names[0]), shards[0], metadata)
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards):
                fname = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                names.append(fname)
                _write_file(os.path.join(tmp, fname), shard, metadata)
                for k, v in shard.items():
                    weight_map[k] = fname
                    total += np.asarray(v).nbytes
            with open(os.path.join(tmp, f"{basename}.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            names.append(f"{basename}.safetensors.index.json")
        for fname, text in (extra_files or {}).items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
            names.append(fname)
        os.makedirs(out_dir, exist_ok=True)
        for fname in names:
            os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
        return [os.path.join(out_dir, n) for n in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
