"""JSONL record formats: round trip through write_jsonl, aliases, image references, bad-record errors and skipping."""
import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from edit_r1_jax.data import formats as F


def _img(seed, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sft(i):
    return {"id": f"s{i}", "instruction": f"make object {i} red", "source": _img(2 * i), "edited": _img(2 * i + 1),
            "principles": [{"question": "Is it red?", "category": "Follow", "check": {"op": "colour", "v": i}},
                           {"question": "Is the rest unchanged?", "category": "Keep"}],
            "target": f"It is red.\n<score>{i}</score>", "category": "color", "gold_score": float(i),
            "verdicts": [1, 0], "scene_object": object()}


def _pair(i):
    return {"id": f"p{i}", "instruction": "remove the square", "source": _img(10 + i), "preferred": _img(20 + i),
            "rejected": _img(30 + i), "principles": ["Is the square gone?"], "preferred_score": 9.0,
            "rejected_score": 2}


def test_sft_round_trip_through_jsonl(tmp_path):
    recs = [_sft(i) for i in range(3)]
    (tmp_path / "a").mkdir()
    assert F.write_jsonl(recs, str(tmp_path / "a" / "sft.jsonl"), F.SFT) == 3
    # image paths are relative to the JSONL file: the directory can move
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    path = str(tmp_path / "b" / "sft.jsonl")
    back = F.read_sft_jsonl(path)
    assert len(back) == 3
    for r, b in zip(recs, back):
        assert b["id"] == r["id"] and b["instruction"] == r["instruction"] and b["target"] == r["target"]
        assert b["principles"] == r["principles"]       # extra principle fields (machine checks) survive
        assert b["gold_score"] == r["gold_score"] and b["verdicts"] == [1, 0] and b["category"] == "color"
        assert "scene_object" not in b                   # not JSON-able: dropped by the writer
        np.testing.assert_array_equal(F.load_image(b["source"]), r["source"])   # PNG: lossless
        np.testing.assert_array_equal(F.load_image(b["edited"]), r["edited"])
        assert b["_origin"].startswith(path + ":")
    first = json.loads(open(path).readline())
    assert not os.path.isabs(first["source"])
    src = F.JsonlSource(path, F.SFT)
    assert len(src) == 3 and src[1]["id"] == "s1" and src.stats.num_bad == 0


def test_pairs_aliases_string_principles_and_data_uris(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_img(5)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    Image.fromarray(_img(6)).save(tmp_path / "w.png")
    line = {"prompt": "add a hat", "source_image": uri, "chosen": "w.png", "image_l": uri,
            "principles": ["Is there a hat?", {"question": "Same face?", "category": "Keep"}], "preferred_score": 7}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps(_pair_json(tmp_path)) + "\n")
    recs = F.read_pairs_jsonl(str(path))
    assert len(recs) == 2
    r = recs[0]
    assert r["instruction"] == "add a hat" and r["id"] == f"{path}:1"
    assert r["principles"] == [{"question": "Is there a hat?"}, {"question": "Same face?", "category": "Keep"}]
    assert r["preferred_score"] == 7.0 and isinstance(r["preferred_score"], float)
    np.testing.assert_array_equal(F.load_image(r["source"]), _img(5))
    np.testing.assert_array_equal(F.load_image(r["preferred"]), _img(6))
    assert recs[1]["id"] == "p-json"


def _pair_json(tmp_path):
    Image.fromarray(_img(7)).save(tmp_path / "s.png")
    return {"id": "p-json", "instruction": "x", "source": "s.png", "preferred": "s.png", "rejected": "s.png",
            "principles": ["q"]}


def test_load_image_variants(tmp_path):
    a = _img(1)
    Image.fromarray(a).save(tmp_path / "a.png")
    for ref in (a, Image.fromarray(a), F.encode_png(a), F.png_data_uri(a), str(tmp_path / "a.png")):
        np.testing.assert_array_equal(F.load_image(ref), a)
    np.testing.assert_array_equal(F.load_image("a.png", base_dir=str(tmp_path)), a)
    np.testing.assert_array_equal(F.load_image(a.astype(np.float32) / 255.0), a)
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], -1)
    np.testing.assert_array_equal(F.load_image(rgba), a)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        F.load_image(str(tmp_path / "nope.png"))
    with pytest.raises(TypeError):
        F.load_image(3)


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('{"instruction": "x", "source": "ok.png", "edited": "ok.png", "principles": ["q"]}', "missing required field 'target'"),
    ('{"instruction": "x", "source": "ok.png", "edited": "missing.png", "principles": ["q"], "target": "t"}',
     "'edited': file not found"),
    ('{"instruction": "x", "source": "ok.png", "edited": "ok.png", "principles": [], "target": "t"}',
     "'principles' must be a non-empty list"),
    ('{"instruction": 5, "source": "ok.png", "edited": "ok.png", "principles": ["q"], "target": "t"}',
     "'instruction' must be a non-empty string"),
    ('{"instruction": "x", "source": "ok.png", "edited": "ok.png", "principles": ["q"], "target": "t", '
     '"gold_score": "high"}', "'gold_score' must be a number"),
    ('[1, 2]', "expected a JSON object"),
]
GOOD = '{"instruction": "x", "source": "ok.png", "edited": "ok.png", "principles": ["q"], "target": "t"}'


@pytest.mark.parametrize("bad,msg", BAD_LINES)
def test_bad_record_error_names_file_line_and_field(tmp_path, bad, msg):
    Image.fromarray(_img(0)).save(tmp_path / "ok.png")
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + bad + "\n" + GOOD + "\n")
    with pytest.raises(F.RecordError) as e:
        F.read_sft_jsonl(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and msg in str(e.value), str(e.value)


def test_skip_bad_counts_and_keeps_the_good(tmp_path):
    Image.fromarray(_img(0)).save(tmp_path / "ok.png")
    path = tmp_path / "data.jsonl"
    lines = [GOOD]
    for bad, _ in BAD_LINES:
        lines += [bad, GOOD]
    path.write_text("\n".join(lines) + "\n")
    src = F.JsonlSource(str(path), F.SFT, skip_bad=True)
    assert len(src) == len(BAD_LINES) + 1
    assert src.stats.num_bad == len(BAD_LINES) and src.stats.num_lines == 2 * len(BAD_LINES) + 1
    assert all(e.startswith(f"{path}:") for e in src.stats.errors)
    assert [r["_origin"] for r in src] == [f"{path}:{n}" for n in range(1, 2 * len(BAD_LINES) + 2, 2)]
    assert len(F.read_sft_jsonl(str(path), skip_bad=True)) == len(BAD_LINES) + 1
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        F.JsonlSource(str(tmp_path / "nothere.jsonl"), F.SFT)
