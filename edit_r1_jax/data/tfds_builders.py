"""TFDS builders (ArrayRecord files, no TensorFlow) for RRM SFT records and preference pairs, and their reader.

Writing: ``build_tfds(kind, {"train": "train.jsonl", "eval": records}, data_dir)`` runs a ``GeneratorBasedBuilder``
with ``file_format="array_record"`` (env-notes G5: TFRecord needs TensorFlow). A split's input is a JSONL path
(read with ``formats.JsonlSource``, same schema, ``skip_bad`` honoured) or an iterable of record dicts (e.g. the
synthetic world's). Images are handed to TFDS as PIL images (G6: TFDS encodes numpy arrays with TF) and stored as PNG.

Reading: ``open_tfds(version_dir, split)`` (``tfds.builder_from_directory(...).as_data_source``, G5/G7) returns a
random-access source of records in the ``formats`` schema: strings decoded, images as uint8 (H, W, 3) arrays, and
the record's other JSON-able fields restored from ``meta_json``. Feed it to ``data.pipeline.make_pipeline``.

Stored features (SFT): id, instruction, category, target (Text); source, edited (Image, PNG); principles,
principle_categories (Sequence(Text), '' = no category); gold_score (float32, NaN = absent); meta_json (Text).
Pairs: id, instruction, category (Text); source, preferred, rejected (Image); principles, principle_categories;
preferred_score, rejected_score (float32, NaN = absent); meta_json.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
from etils import epath
import tensorflow_datasets as tfds  # ~1.5 s import; prints a harmless "no TensorFlow" banner (G6)

from edit_r1_jax.data import formats

log = logging.getLogger(__name__)

_KNOWN = {"id", "instruction", "category", "target", "principles", "_origin", "source", "edited", "preferred",
          "rejected", "gold_score", "preferred_score", "rejected_score"}


def _features(kind: str):
    f = tfds.features
    common = {"id": f.Text(), "instruction": f.Text(), "category": f.Text(), "meta_json": f.Text(),
              "principles": f.Sequence(f.Text()), "principle_categories": f.Sequence(f.Text()),
              "source": f.Image(shape=(None, None, 3), encoding_format="png")}
    if kind == formats.SFT:
        common.update({"edited": f.Image(shape=(None, None, 3), encoding_format="png"), "target": f.Text(),
                       "gold_score": f.Scalar(dtype=np.float32)})
    else:
        common.update({"preferred": f.Image(shape=(None, None, 3), encoding_format="png"),
                       "rejected": f.Image(shape=(None, None, 3), encoding_format="png"),
                       "preferred_score": f.Scalar(dtype=np.float32), "rejected_score": f.Scalar(dtype=np.float32)})
    return f.FeaturesDict(common)


def _records_of(split_input: Any, kind: str, skip_bad: bool) -> Iterable[dict]:
    if isinstance(split_input, (str, os.PathLike)):
        return formats.JsonlSource(str(split_input), kind, skip_bad=skip_bad)
    return (formats.validate_record(r, kind, f"record {i}", check_files=True) for i, r in enumerate(split_input))


def _to_example(rec: dict, kind: str) -> dict:
    from PIL import Image
    ex = {"id": str(rec["id"]), "instruction": rec["instruction"], "category": str(rec.get("category") or ""),
          "principles": [p["question"] for p in rec["principles"]],
          "principle_categories": [str(p.get("category") or "") for p in rec["principles"]]}
    for f in formats.IMAGE_FIELDS[kind]:
        ex[f] = Image.fromarray(formats.load_image(rec[f]))
    for f in formats.OPTIONAL_FLOATS[kind]:
        ex[f] = float("nan") if rec.get(f) is None else float(rec[f])
    if kind == formats.SFT:
        ex["target"] = rec["target"]
    meta = {}
    for k, v in rec.items():
        if k in _KNOWN:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        meta[k] = v
    # principle objects may carry more than question/category (e.g. the synthetic world's machine checks)
    extra_p = [{k: v for k, v in p.items() if k not in ("question", "category")} for p in rec["principles"]]
    if any(extra_p):
        meta["_principle_extras"] = extra_p
    ex["meta_json"] = json.dumps(meta)
    return ex


class _EditR1Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic; subclasses fix ``KIND``. ``splits``: {split name: JSONL path or iterable of record dicts}."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial schema."}
    KIND = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup goes through importlib_resources (not installed) for editable installs; the module
        # file is what it would find anyway (used only to look for an absent checksums file).
        return epath.Path(__file__)

    def __init__(self, *, splits: Mapping[str, Any] | None = None, skip_bad: bool = False, **kwargs):
        self._splits = dict(splits or {})
        self._skip_bad = skip_bad
        self.skipped: dict[str, int] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_features(self.KIND),
                                     description=f"Edit-R1 {self.KIND} records (see edit_r1_jax.data.formats)")

    def _split_generators(self, dl_manager):
        if not self._splits:
            raise ValueError(f"{type(self).__name__}: pass splits={{'train': 'file.jsonl' or records, ...}}")
        return {name: self._generate_examples(name, inp) for name, inp in self._splits.items()}

    def _generate_examples(self, split_name, split_input):
        src = _records_of(split_input, self.KIND, self._skip_bad)
        for i, rec in enumerate(src):
            yield i, _to_example(rec, self.KIND)
        stats = getattr(src, "stats", None)
        self.skipped[split_name] = stats.num_bad if stats is not None else 0


class EditR1SftRecords(_EditR1Builder):
    """TFDS name ``edit_r1_sft_records``."""
    KIND = formats.SFT


class EditR1PreferencePairs(_EditR1Builder):
    """TFDS name ``edit_r1_preference_pairs``."""
    KIND = formats.PAIR


def builder_class(kind: str):
    """The builder class for ``kind`` ('sft' or 'pair')."""
    if kind == formats.SFT:
        return EditR1SftRecords
    if kind == formats.PAIR:
        return EditR1PreferencePairs
    raise ValueError(f"kind={kind!r}: expected {formats.SFT!r} or {formats.PAIR!r}")


class Built(NamedTuple):
    version_dir: str            # <data_dir>/<name>/1.0.0, what open_tfds takes
    skipped: dict               # split -> number of bad records skipped (skip_bad=True)


def build_tfds(kind: str, splits: Mapping[str, Any], data_dir: str, *, skip_bad: bool = False) -> Built:
    """Prepare an ArrayRecord TFDS dataset from JSONL files or record iterables (see the module docstring)."""
    builder = builder_class(kind)(splits=splits, skip_bad=skip_bad, data_dir=data_dir)
    builder.download_and_prepare()
    for split, n in builder.skipped.items():
        if n:
            log.warning("build_tfds: skipped %d bad %s records in split '%s'", n, kind, split)
    return Built(str(builder.data_dir), dict(builder.skipped))


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


class TfdsRecords:
    """Random-access records (``formats`` schema) of one split of a prepared dataset. Picklable (reopens lazily)."""

    def __init__(self, version_dir: str, split: str):
        self.version_dir = str(version_dir)
        self.split = split
        name = os.path.basename(os.path.dirname(os.path.normpath(self.version_dir)))
        if "sft" in name:
            self.kind = formats.SFT
        elif "pair" in name:
            self.kind = formats.PAIR
        else:
            raise ValueError(f"open_tfds: {self.version_dir} is not an edit_r1 dataset directory "
                             f"(expected .../edit_r1_sft_records/1.0.0 or .../edit_r1_preference_pairs/1.0.0)")
        self._src = None
        self._len = len(self._source())

    def _source(self):
        if self._src is None:
            builder = tfds.builder_from_directory(self.version_dir)
            if self.split not in builder.info.splits:
                raise KeyError(f"open_tfds: split '{self.split}' not in {self.version_dir} "
                               f"(has {sorted(builder.info.splits)})")
            self._src = builder.as_data_source(split=self.split)
        return self._src

    def __getstate__(self):
        return {"version_dir": self.version_dir, "split": self.split, "kind": self.kind, "_len": self._len,
                "_src": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        ex = self._source()[i]
        meta = json.loads(_text(ex["meta_json"]) or "{}")
        extras = meta.pop("_principle_extras", None)
        cats = [_text(c) for c in ex["principle_categories"]]
        principles = []
        for k, q in enumerate(ex["principles"]):
            p = {"question": _text(q)}
            if cats[k]:
                p["category"] = cats[k]
            if extras:
                p.update(extras[k])
            principles.append(p)
        rec = dict(meta)
        rec.update({"id": _text(ex["id"]), "instruction": _text(ex["instruction"]), "principles": principles,
                    "_origin": f"{self.version_dir}[{self.split}][{i}]"})
        cat = _text(ex["category"])
        if cat:
            rec["category"] = cat
        for f in formats.IMAGE_FIELDS[self.kind]:
            rec[f] = np.asarray(ex[f], np.uint8)
        for f in formats.OPTIONAL_FLOATS[self.kind]:
            v = float(ex[f])
            if not math.isnan(v):
                rec[f] = v
        if self.kind == formats.SFT:
            rec["target"] = _text(ex["target"])
        return rec


def open_tfds(version_dir: str, split: str) -> TfdsRecords:
    return TfdsRecords(version_dir, split)
