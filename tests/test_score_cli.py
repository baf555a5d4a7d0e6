"""`edit-r1-jax score` and `principles` CLIs: bad records (line numbers, --skip-bad counts), output layout,
--resume after an interrupted write, principle retries. In-process CLI calls with a tiny random RRM."""
import json
import os

import numpy as np
import pytest

from edit_r1_jax.cli import main
from edit_r1_jax.data import synthetic
from edit_r1_jax.rrm import records as rec_lib

SIZE, N = 56, 5
COMMON = ["--batch-size", "4", "--bucket", "512", "--max-new-tokens", "10", "--mesh", "none"]


@pytest.fixture(scope="module")
def rrm_dir(tmp_path_factory):
    return rec_lib.write_tiny_rrm(str(tmp_path_factory.mktemp("tiny_rrm")), image_size=SIZE, seed=0)


@pytest.fixture
def data(tmp_path):
    path = rec_lib.write_edit_records(synthetic.make_sft_records(N, seed=0, size=SIZE), str(tmp_path / "data"))
    lines = open(path).read().splitlines()
    return path, lines


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _bad_lines(lines, tmp_path):
    """Lines 2-5 broken in the four documented ways; lines 1 and 6 stay good."""
    objs = [json.loads(x) for x in lines]
    broken = open(tmp_path / "data" / "broken.png", "wb")
    broken.write(b"\x89PNG\r\n\x1a\n not really a png")
    broken.close()
    objs[1]["source"] = "images/does_not_exist.png"          # missing file
    objs[2]["edited"] = "broken.png"                         # unreadable image
    del objs[3]["instruction"]                               # missing field
    objs[4]["principles"] = []                               # empty principles
    good = dict(objs[0], id="extra-good")
    return [json.dumps(o) for o in objs] + [json.dumps(good)]


@pytest.mark.parametrize("line,pattern", [(2, "file not found"), (3, "unreadable image"),
                                          (4, "missing required field 'instruction'"), (5, "principles")])
def test_bad_record_is_an_error_with_line_number(tmp_path, data, capsys, line, pattern):
    path, lines = data
    bad = _bad_lines(lines, tmp_path)
    keep = [bad[0], bad[line - 1]]                           # the bad record sits on line 2 of this file
    _write(path, keep)
    rc = main(["score", "--rrm", "/nonexistent", "--data", path, "--out", str(tmp_path / "o.jsonl")] + COMMON)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:2:" in err and pattern in err
    assert not os.path.exists(tmp_path / "o.jsonl") or os.path.getsize(tmp_path / "o.jsonl") == 0


def test_missing_data_file(tmp_path, capsys):
    rc = main(["score", "--rrm", "/nonexistent", "--data", str(tmp_path / "nope.jsonl"), "--out",
               str(tmp_path / "o.jsonl")] + COMMON)
    assert rc == 2 and "file not found" in capsys.readouterr().err


def test_skip_bad_skips_and_counts(tmp_path, data, rrm_dir, capsys, highest_precision):
    path, lines = data
    _write(path, _bad_lines(lines, tmp_path))
    out = tmp_path / "scores.jsonl"
    rc = main(["score", "--rrm", rrm_dir, "--data", path, "--out", str(out), "--skip-bad", "--mode", "logits"]
              + COMMON)
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_bad"] == 4 and summary["scored"] == 2
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == [json.loads(lines[0])["id"], "extra-good"]
    assert all(0 <= r["score"] <= 10 and r["status"] == "ok" and len(r["digit_probs"]) == 10 for r in rows)


@pytest.mark.slow
def test_generate_output_and_resume(tmp_path, data, rrm_dir, capsys, highest_precision):
    path, lines = data
    out = tmp_path / "scores.jsonl"
    args = ["score", "--rrm", rrm_dir, "--data", path, "--out", str(out), "--share-prefix", "off"] + COMMON
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["scored"] == N and first["already_done"] == 0 and 0 <= first["parse_failure_rate"] <= 1
    rows = [json.loads(x) for x in open(out)]
    ids = [json.loads(x)["id"] for x in lines]
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert set(r) >= {"id", "score", "reward", "status", "verdicts", "average", "trace", "mode", "category"}
        assert isinstance(r["trace"], str) and r["mode"] == "generate"
        assert (r["score"] is None) == (r["status"] == "failed")
        assert r["reward"] == (0.0 if r["score"] is None else r["score"])
    # without --resume an existing output is never overwritten
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # interrupted run: two complete lines and half of the third
    text = open(out).read().splitlines(keepends=True)
    with open(out, "w") as f:
        f.write("".join(text[:2]) + text[2][:25])
    assert main(args + ["--resume"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["already_done"] == 2 and second["scored"] == N - 2
    again = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in again] == ids
    assert [r["trace"] for r in again] == [r["trace"] for r in rows]      # greedy: same traces after resuming


def test_principles_cli_retries_then_reports(tmp_path, data, rrm_dir, capsys, monkeypatch):
    """Model output is canned (random tiny models write no JSON): record 0 parses at once, record 1 on the
    first retry, record 2 never -> failed after 1 + retries attempts, and --resume retries only that one."""
    from edit_r1_jax.rrm import reward
    path, lines = data
    reqs = [{k: json.loads(x)[k] for k in ("id", "instruction", "source", "category")} for x in lines[:3]]
    req_path = tmp_path / "data" / "requests.jsonl"
    _write(req_path, [json.dumps(r) for r in reqs])
    good = json.dumps([{"question": "Is the circle blue?", "category": "Follow"},
                       {"question": "Is the square unchanged?", "category": "Keep"}])
    calls = []

    def fake_generate(self, examples, temperature=0.0, rng=None, max_new_tokens=None, batch_size=None):
        assert all(e["image_grid_thw"].shape == (1, 3) for e in examples)
        prompts_ = [self.inputs.tokenizer.decode(e["input_ids"]) for e in examples]
        rids = [next(r["id"] for r in reqs if r["instruction"] in p) for p in prompts_]
        calls.append((rids, temperature))
        return np.arange(len(examples), dtype=np.int32)[:, None]

    def fake_decode(self, tokens):
        rids, _ = calls[-1]
        attempt = len(calls)
        return [good if rids[int(t[0])] == reqs[0]["id"] or (rids[int(t[0])] == reqs[1]["id"] and attempt >= 2)
                else "Sure! Here are the points: none" for t in tokens]
    monkeypatch.setattr(reward.RewardModel, "generate_tokens", fake_generate)
    monkeypatch.setattr(reward.RewardModel, "decode", fake_decode)
    out = tmp_path / "data" / "principles.jsonl"
    rc = main(["principles", "--model", rrm_dir, "--data", str(req_path), "--out", str(out), "--retries", "2"]
              + COMMON)
    assert rc == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["failed_ids"] == [reqs[2]["id"]]
    assert "failed after 3 attempts" in cap.err
    ids = [r["id"] for r in reqs]
    assert calls == [(ids, 0.0), (ids[1:], 0.7), (ids[2:], 0.7)]
    rows = {r["id"]: r for r in map(json.loads, open(out))}
    assert rows[reqs[0]["id"]]["attempts"] == 1 and rows[reqs[1]["id"]]["attempts"] == 2
    assert rows[reqs[2]["id"]]["status"] == "failed" and rows[reqs[2]["id"]]["principles"] is None
    ok_row = rows[reqs[0]["id"]]
    assert ok_row["principles"][0] == {"question": "Is the circle blue?", "category": "Follow"}
    assert os.path.exists(os.path.join(os.path.dirname(out), ok_row["source"]))   # relative to the output
    calls.clear()
    assert main(["principles", "--model", rrm_dir, "--data", str(req_path), "--out", str(out), "--retries", "0",
                 "--resume"] + COMMON) == 0
    assert calls == [(ids[2:], 0.0)]                          # only the failed record is tried again
