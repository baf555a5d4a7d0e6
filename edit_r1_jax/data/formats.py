"""JSONL record formats for RRM SFT records and preference pairs: schemas, validation, readers, writer, images.

Records are plain dicts with the same keys as the synthetic world's records (``edit_r1_jax.data.synthetic``), so one
tokenize function serves in-memory synthetic data, JSONL files and TFDS datasets alike.

SFT record (one JSON object per line)::

    {"id": "a1",                                   # optional; default "<file>:<line>"
     "instruction": "make the red circle blue",    # required, non-empty string
     "source": "images/a1_src.png",                # required image: the original (reference) image
     "edited": "images/a1_edit.png",               # required image: the candidate edit being judged
     "principles": [{"question": "Is the circle blue?", "category": "Follow"}, ...],  # or a list of strings
     "target": "... <score>7.5</score>",           # required: the assistant text (reasoning, verdicts, score)
     "category": "color",                          # optional edit category
     "gold_score": 7.5}                            # optional float in [0, 10]

Preference pair::

    {"id": ..., "instruction": ..., "source": ..., "principles": [...], "category": ...,
     "preferred": "images/w.png",                  # required image: the human-preferred edit (x^w)
     "rejected": "images/l.png",                   # required image: the other edit (x^l)
     "preferred_score": 8.0, "rejected_score": 3.0} # optional floats

An image field is a path (relative paths are relative to the JSONL file's directory) or a
``data:image/png;base64,...`` URI; in memory it may also be a uint8 HWC array, PNG/JPEG bytes or a PIL image.
Accepted aliases (common in public editing datasets) are renamed on read: ``source_image``/``input_image`` ->
``source``; ``edited_image``/``output_image`` -> ``edited``; ``chosen``/``image_w`` -> ``preferred``;
``image_l`` -> ``rejected``; ``prompt`` -> ``instruction``. Other fields are kept as they are.

Each returned record also carries ``"_origin": "<file>:<line>"`` for error messages. A bad record (invalid JSON,
missing or mistyped field, missing image file) raises ``RecordError`` naming the file, line and field; with
``skip_bad=True`` it is skipped and counted in ``ReadStats`` instead.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

SFT = "sft"
PAIR = "pair"
SCORE = "score"    # an edit to score: an SFT record without the target trace

IMAGE_FIELDS = {SFT: ("source", "edited"), PAIR: ("source", "preferred", "rejected"), SCORE: ("source", "edited")}
TEXT_FIELDS = {SFT: ("instruction", "target"), PAIR: ("instruction",), SCORE: ("instruction",)}
OPTIONAL_FLOATS = {SFT: ("gold_score",), PAIR: ("preferred_score", "rejected_score"), SCORE: ("gold_score",)}
ALIASES = {"source_image": "source", "input_image": "source", "edited_image": "edited", "output_image": "edited",
           "chosen": "preferred", "image_w": "preferred", "image_l": "rejected", "prompt": "instruction"}


class RecordError(ValueError):
    """A record that does not follow the schema; the message starts with ``<file>:<line>``."""


@dataclasses.dataclass
class ReadStats:
    path: str = ""
    num_lines: int = 0
    num_ok: int = 0
    num_bad: int = 0
    errors: list = dataclasses.field(default_factory=list)   # first 20 messages

    def note_bad(self, msg: str) -> None:
        self.num_bad += 1
        if len(self.errors) < 20:
            self.errors.append(msg)


# ----------------------------------------------------------------------------------------------------------------
# images

def _is_data_uri(x: Any) -> bool:
    return isinstance(x, str) and x.startswith("data:image/")


def load_image(ref: Any, base_dir: str | None = None) -> np.ndarray:
    """Any image reference -> uint8 RGB array (H, W, 3): path, data URI, bytes, PIL image or array."""
    from PIL import Image
    if isinstance(ref, np.ndarray):
        arr = ref
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) if np.issubdtype(arr.dtype, np.floating) \
                else arr.astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"load_image: expected an (H, W, 3) image array, got shape {arr.shape}")
        return np.ascontiguousarray(arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, -1))
    if isinstance(ref, Image.Image):
        return np.asarray(ref.convert("RGB"))
    if isinstance(ref, (bytes, bytearray)):
        with Image.open(io.BytesIO(ref)) as im:
            return np.asarray(im.convert("RGB"))
    if _is_data_uri(ref):
        head, _, data = ref.partition(",")
        if ";base64" not in head:
            raise ValueError(f"load_image: only base64 data URIs are supported, got '{head}'")
        return load_image(base64.b64decode(data))
    if isinstance(ref, str):
        path = ref if os.path.isabs(ref) or base_dir is None else os.path.join(base_dir, ref)
        if not os.path.exists(path):
            raise FileNotFoundError(f"load_image: image file not found: {path}")
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    raise TypeError(f"load_image: unsupported image reference of type {type(ref).__name__}")


def encode_png(img: Any) -> bytes:
    """Image (any ``load_image`` input) -> PNG bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(load_image(img)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(img: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(img)).decode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# validation

def _normalize_principles(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: field 'principles' must be a non-empty list of strings or "
                          f"{{'question', 'category'}} objects, got {type(value).__name__}"
                          + (" (empty)" if isinstance(value, list) else ""))
    out = []
    for k, p in enumerate(value):
        if isinstance(p, str) and p.strip():
            out.append({"question": p})
        elif isinstance(p, dict) and isinstance(p.get("question"), str) and p["question"].strip():
            out.append(dict(p))
        else:
            raise RecordError(f"{where}: principles[{k}] must be a non-empty string or an object with a "
                              f"'question' string, got {json.dumps(p)[:80]}")
    return out


def validate_record(obj: Any, kind: str, where: str = "<record>", base_dir: str | None = None,
                    check_files: bool = True) -> dict:
    """Schema check + normalisation (aliases, principles as dicts, image paths resolved against ``base_dir``).
    Raises ``RecordError`` whose message starts with ``where``."""
    if kind not in IMAGE_FIELDS:
        raise ValueError(f"kind={kind!r}: expected one of {tuple(IMAGE_FIELDS)}")
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rec = {}
    for k, v in obj.items():
        key = ALIASES.get(k, k)
        if key in rec and key != k:
            continue   # the canonical name wins over an alias
        rec[key] = v
    for f in TEXT_FIELDS[kind]:
        if f not in rec:
            raise RecordError(f"{where}: missing required field '{f}' (a {kind} record needs "
                              f"{', '.join(TEXT_FIELDS[kind] + IMAGE_FIELDS[kind] + ('principles',))})")
        if not isinstance(rec[f], str) or not rec[f].strip():
            raise RecordError(f"{where}: field '{f}' must be a non-empty string, got {json.dumps(rec[f])[:80]}")
    for f in IMAGE_FIELDS[kind]:
        if f not in rec:
            raise RecordError(f"{where}: missing required image field '{f}'")
        v = rec[f]
        if isinstance(v, str):
            if not v:
                raise RecordError(f"{where}: image field '{f}' is empty")
            if not _is_data_uri(v):
                path = v if os.path.isabs(v) or base_dir is None else os.path.join(base_dir, v)
                if check_files and not os.path.exists(path):
                    raise RecordError(f"{where}: image field '{f}': file not found: {path}")
                rec[f] = path
        elif not isinstance(v, (np.ndarray, bytes, bytearray)) and type(v).__module__.split(".")[0] != "PIL":
            raise RecordError(f"{where}: image field '{f}' must be a path or data URI string, got "
                              f"{type(v).__name__}")
    if "principles" not in rec:
        raise RecordError(f"{where}: missing required field 'principles'")
    rec["principles"] = _normalize_principles(rec["principles"], where)
    for f in OPTIONAL_FLOATS[kind]:
        if rec.get(f) is not None:
            v = rec[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecordError(f"{where}: field '{f}' must be a number, got {json.dumps(v)[:80]}")
            rec[f] = float(v)
    if "id" not in rec or rec["id"] is None:
        rec["id"] = where
    rec["_origin"] = where
    return rec


# ----------------------------------------------------------------------------------------------------------------
# readers

class JsonlSource:
    """Random-access records of a JSONL file (a Grain data source: ``len`` and ``[i]``).

    The file is scanned once at construction (every line validated; bad lines raise or, with ``skip_bad``, are
    skipped and counted in ``self.stats``); only byte offsets are kept, and ``[i]`` re-reads and re-normalises line
    ``i``, so memory does not grow with the dataset.
    """

    def __init__(self, path: str, kind: str, *, skip_bad: bool = False, check_files: bool = True):
        self.path = os.path.abspath(path)
        self.kind = kind
        self.base_dir = os.path.dirname(self.path)
        self.check_files = check_files
        self.stats = ReadStats(path=self.path)
        self._offsets: list[tuple[int, int]] = []   # (byte offset, line number)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{kind} records: file not found: {self.path}")
        with open(self.path, "rb") as f:
            lineno = 0
            while True:
                off = f.tell()
                raw = f.readline()
                if not raw:
                    break
                lineno += 1
                if not raw.strip():
                    continue
                self.stats.num_lines += 1
                try:
                    self._parse(raw, lineno)
                except RecordError as e:
                    if not skip_bad:
                        raise
                    self.stats.note_bad(str(e))
                    continue
                self._offsets.append((off, lineno))
        self.stats.num_ok = len(self._offsets)

    def _parse(self, raw: bytes, lineno: int) -> dict:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"{where}: invalid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        return validate_record(obj, self.kind, where, self.base_dir, self.check_files)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> dict:
        off, lineno = self._offsets[i]
        with open(self.path, "rb") as f:
            f.seek(off)
            return self._parse(f.readline(), lineno)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, kind={self.kind!r}, records={len(self)}, bad={self.stats.num_bad})"


def read_sft_jsonl(path: str, *, skip_bad: bool = False) -> list:
    """All SFT records of ``path`` as normalised dicts (see the module docstring for the schema)."""
    return list(JsonlSource(path, SFT, skip_bad=skip_bad))


def read_pairs_jsonl(path: str, *, skip_bad: bool = False) -> list:
    """All preference pairs of ``path`` as normalised dicts."""
    return list(JsonlSource(path, PAIR, skip_bad=skip_bad))


# ----------------------------------------------------------------------------------------------------------------
# writer

def write_jsonl(records: Iterable[dict], path: str, kind: str, *, image_dir: str | None = None,
                extra_fields: Sequence[str] | None = None) -> int:
    """Write records (e.g. synthetic ones with array images) as JSONL; images go to PNG files under ``image_dir``
    (default ``<path without .jsonl>_images/``) referenced by relative paths. Fields that are not JSON-able
    (scene objects, arrays) are dropped unless they are images; ``extra_fields`` limits the kept extras.
    Returns the number of records written."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    image_dir = image_dir or (os.path.splitext(path)[0] + "_images")
    os.makedirs(image_dir, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for i, rec in enumerate(records):
            rec = validate_record(rec, kind, f"record {i}", base_dir=base, check_files=False)
            out = {}
            rid = str(rec.get("id", i))
            for k, v in rec.items():
                if k.startswith("_"):
                    continue
                if k in IMAGE_FIELDS[kind]:
                    if isinstance(v, str):
                        out[k] = os.path.relpath(v, base) if not _is_data_uri(v) else v
                        continue
                    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rid)
                    p = os.path.join(image_dir, f"{safe}_{k}.png")
                    with open(p, "wb") as g:
                        g.write(encode_png(v))
                    out[k] = os.path.relpath(p, base)
                    continue
                if extra_fields is not None and k not in extra_fields and k not in TEXT_FIELDS[kind] and \
                        k not in ("id", "principles", "category") + OPTIONAL_FLOATS[kind]:
                    continue
                try:
                    json.dumps(v)
                except (TypeError, ValueError):
                    continue
                out[k] = v
            f.write(json.dumps(out) + "\n")
            n += 1
    return n
