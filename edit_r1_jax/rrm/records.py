"""On-disk layouts of the scoring tools: edit-record JSONL + PNGs, result JSONL (append, resume), a tiny checkpoint.

Scoring input (``edit-r1-jax score --data``), one JSON object per line; image paths are relative to the file::

    {"id": "a1",                                  # optional; default "<file>:<line>"
     "instruction": "make the red circle blue",   # required
     "source": "images/a1_source.png",            # required: the original image
     "edited": "images/a1_edited.png",            # required: the edit being judged
     "principles": [{"question": "Is the circle blue?", "category": "Follow"}, ...],   # required, non-empty
     "category": "color"}                         # optional; other fields are carried along

The same aliases as `edit_r1_jax.data.formats` are accepted (``prompt``, ``source_image``/``input_image``,
``edited_image``/``output_image``). Schema checks are `formats.validate_record` under the kind ``"score"``
(registered here: SFT's fields without ``target``); on top, every image must open (``unreadable image`` errors).
Bad lines raise `formats.RecordError` naming file, line and field, or with ``skip_bad`` are counted.

Result output (``--out``): one line per record ``{"id", "score" (null = parse failure), "reward", "status",
"verdicts", "average", "trace"}`` (``digit_probs`` instead of ``trace`` in logit mode), appended and flushed per
batch; `ResultWriter` with ``resume=True`` skips ids already present.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edit_r1_jax.data import formats
from edit_r1_jax.data.formats import RecordError, ReadStats

SCORE = formats.SCORE
# The scoring kind: an SFT record without the target trace.


# ---------------------------------------------------------------------------------------------------- reading

def check_image(ref: Any, where: str, field: str) -> None:
    """Raise `RecordError` unless the image reference opens and decodes as an image."""
    if not isinstance(ref, str):
        return
    try:
        if formats._is_data_uri(ref):
            formats.load_image(ref)
            return
        from PIL import Image
        with Image.open(ref) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise RecordError(f"{where}: image field '{field}': unreadable image {ref} ({type(e).__name__}: {e})") \
            from None


def read_records(path: str, kind: str, *, skip_bad: bool = False, check_images: bool = True,
                 transform: Callable[[dict, str], dict] | None = None,
                 validate: Callable[..., dict] | None = None) -> tuple[list, ReadStats]:
    """All valid records of a JSONL file -> (records, stats).

    Each line: JSON -> ``transform(obj, where)`` (optional: aliases, injected fields) -> ``validate(obj, kind,
    where, base_dir)`` (default `formats.validate_record`) -> every image field of ``kind`` opened
    (``check_images``). A failure raises `RecordError` (``<file>:<line>: ...``) or, with ``skip_bad``, is counted
    in ``stats``.
    """
    validate = formats.validate_record if validate is None else validate
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} records: file not found: {path}")
    base = os.path.dirname(path)
    stats = ReadStats(path=path)
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            stats.num_lines += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RecordError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
                if transform is not None and isinstance(obj, dict):
                    obj = transform(obj, where)
                rec = validate(obj, kind, where, base)
                if check_images:
                    for field in formats.IMAGE_FIELDS.get(kind, ()):
                        check_image(rec[field], where, field)
            except RecordError as e:
                if not skip_bad:
                    raise
                stats.note_bad(str(e))
                continue
            out.append(rec)
    stats.num_ok = len(out)
    return out, stats


def read_score_records(path: str, *, skip_bad: bool = False, check_images: bool = True) -> tuple[list, ReadStats]:
    """Scoring input records (module docstring) -> (records, stats)."""
    return read_records(path, SCORE, skip_bad=skip_bad, check_images=check_images)


# ---------------------------------------------------------------------------------------------------- writing

def _public(rec: dict) -> dict:
    rec = dict(rec)
    if isinstance(rec.get("principles"), list):
        rec["principles"] = [{"question": p["question"], "category": p.get("category")} if isinstance(p, dict)
                             else p for p in rec["principles"]]
    return rec


def write_edit_records(records: Iterable[dict], out_dir: str, name: str = "edits.jsonl",
                       public_principles: bool = True) -> str:
    """Dump records (e.g. synthetic ones with array images) as scoring JSONL + PNGs under ``out_dir/images``.
    ``public_principles`` keeps only question and category of each principle. -> path of the JSONL file."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), name)
    recs = [_public(r) if public_principles else r for r in records]
    formats.write_jsonl(recs, path, SCORE, image_dir=os.path.join(os.path.abspath(out_dir), "images"))
    return path


def write_pair_records(records: Iterable[dict], out_dir: str, name: str = "pairs.jsonl",
                       public_principles: bool = True) -> str:
    """Dump preference pairs (``make_preference_pairs``) as pair JSONL + PNGs. -> path of the JSONL file."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), name)
    recs = [_public(r) if public_principles else r for r in records]
    formats.write_jsonl(recs, path, formats.PAIR, image_dir=os.path.join(os.path.abspath(out_dir), "images"))
    return path


class ResultWriter:
    """Append-only JSONL output, flushed (and fsynced) after every batch.

    An existing non-empty file is an error unless ``resume``: then the ids already in it are in ``self.done``
    (only lines for which ``done_if(line)`` holds, when given) and a trailing partial line (an interrupted write)
    is cut off before appending.
    """

    def __init__(self, path: str, resume: bool = False, done_if: Callable[[dict], bool] | None = None):
        self.path = os.path.abspath(path)
        self.done: set = set()
        self._done_if = done_if
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists and not resume:
            raise FileExistsError(f"output {self.path} already exists; pass --resume to continue it, or remove it")
        if exists:
            with open(self.path, "rb") as f:
                data = f.read()
            keep = data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                with open(self.path, "wb") as f:
                    f.write(keep)
            for line in keep.splitlines():
                try:
                    row = json.loads(line)
                    if done_if is None or done_if(row):
                        self.done.add(str(row["id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.path, "a")

    def is_done(self, rid: Any) -> bool:
        return str(rid) in self.done

    def write(self, rows: Sequence[dict]) -> None:
        for r in rows:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if self._done_if is None or self._done_if(r):
                self.done.add(str(r["id"]))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------- tiny model

@functools.lru_cache(maxsize=2)
def _world_tokenizer(n_records: int):
    from edit_r1_jax.data.world_tokenizer import train_world_tokenizer
    return train_world_tokenizer(None, n_records=n_records)


def random_params(cfg, seed: int = 0, std: float = 0.3, embed_std: float = 1.0) -> dict:
    """Random Qwen2.5-VL params drawn with NumPy (no compile): kernels N(0, std), embeddings N(0, embed_std),
    biases N(0, 0.1 std), norm scales 1 + N(0, 0.1). The defaults are larger than training inits so that a random
    model's greedy output depends on its whole prompt (tests of batching and caching need that)."""
    import jax
    from edit_r1_jax.models import qwen2_5_vl as qwen
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            x = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif name.endswith("['bias']"):
            x = 0.1 * std * rng.standard_normal(s.shape)
        elif "embed_tokens" in name:
            x = embed_std * rng.standard_normal(s.shape)
        else:
            x = std * rng.standard_normal(s.shape)
        return x.astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, qwen.param_shapes(cfg))


def write_tiny_rrm(out_dir: str, image_size: int = 56, seed: int = 0, compact: bool = True,
                   tokenizer_records: int = 40, std: float = 0.3, embed_std: float = 1.0, **sizes) -> str:
    """A random tiny RRM directory (world tokenizer, random Qwen2.5-VL from `train.rrm_setup.tiny_qwen_config`,
    image processor for ``image_size``², ``rrm.json``) loadable by `RewardModel.from_dir`: smoke runs and tests.
    ``sizes``: hidden, layers, heads, ... as ``tiny_qwen_config`` takes them. -> out_dir."""
    from edit_r1_jax.models import qwen2_5_vl as qwen
    from edit_r1_jax.rrm import prompts
    from edit_r1_jax.rrm.inputs import make_image_processor, save_image_processor
    from edit_r1_jax.rrm.reward import RRM_META_FILE
    from edit_r1_jax.train.rrm_setup import tiny_qwen_config

    tok = _world_tokenizer(int(tokenizer_records))
    tid = tok.convert_tokens_to_ids
    ids = {"eos": tid(prompts.IM_END), "pad": tid(prompts.ENDOFTEXT), "image": tid(prompts.IMAGE_PAD),
           "video": tid(prompts.VIDEO_PAD), "vision_start": tid(prompts.VISION_START),
           "vision_end": tid(prompts.VISION_END)}
    cfg = tiny_qwen_config(ids, vocab=len(tok), **sizes)
    os.makedirs(out_dir, exist_ok=True)
    qwen.save_pretrained(cfg, random_params(cfg, seed, std, embed_std), out_dir)
    tok.save_pretrained(out_dir)
    save_image_processor(make_image_processor(image_size=image_size), out_dir)
    with open(os.path.join(out_dir, RRM_META_FILE), "w") as f:
        json.dump({"compact_prompt": bool(compact)}, f)
    return out_dir
