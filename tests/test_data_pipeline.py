"""Grain pipeline (process shards, seeded shuffle, epochs, length buckets, checkpointable state, eval padding) and
the TFDS ArrayRecord builders built and read back in the test."""
import json

import numpy as np
import pytest

import train_toy as T
from edit_r1_jax import parallel
from edit_r1_jax.data import formats as F
from edit_r1_jax.data import pipeline as PL

PAD = {"tokens": -1, "mask": 0}


def _ids(batches):
    return [int(i) for b in batches for i in b["id"]]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _pipe(recs, p=0, n=1, **kw):
    args = dict(tokenize_fn=T.tokenize, global_batch_size=8, seed=7, pad_values=PAD, length_buckets=(16,),
                process_index=p, process_count=n)
    args.update(kw)
    return iter(PL.make_pipeline(recs, **args))


def test_global_batches_do_not_depend_on_the_process_count():
    """Each process reads its block of rows of every global batch: concatenated in process order, 2 or 4 processes
    give exactly the 1-process batches (so multi-host runs match single-host runs and resume across counts)."""
    recs = T.make_records(32)
    one = _take(_pipe(recs), 9)                                      # crosses the epoch boundary (4 per epoch)
    for n in (2, 4):
        parts = [_take(_pipe(recs, p, n), 9) for p in range(n)]
        for step, b in enumerate(one):
            for k in b:
                np.testing.assert_array_equal(np.concatenate([parts[p][step][k] for p in range(n)]), b[k])
        for p in range(n):
            assert parts[p][0]["tokens"].shape[0] == 8 // n
    epoch1, epoch2 = _ids(one[:4]), _ids(one[4:8])
    assert len(set(epoch1)) == 32 and len(set(epoch2)) == 32         # no repeats inside an epoch
    assert epoch1 != epoch2                                            # new order every epoch
    assert _ids(_take(_pipe(recs), 4)) == epoch1                       # same seed, same order
    assert _ids(_take(_pipe(recs, seed=8), 4)) != epoch1               # other seed, other order


def test_padding_to_length_buckets_keeps_content():
    recs = T.make_records(40, min_len=2, max_len=12)
    by_id = {r["id"]: r["tokens"] for r in recs}
    ds = PL.make_pipeline(recs, tokenize_fn=T.tokenize, global_batch_size=4, seed=0, pad_values=PAD,
                          length_buckets=(4, 8, 16), process_count=1, process_index=0)
    seen = set()
    for b in _take(iter(ds), 10):
        L = b["tokens"].shape[1]
        assert L in (4, 8, 16) and b["mask"].shape == (4, L) and b["id"].shape == (4,)
        longest = max(len(by_id[int(i)]) for i in b["id"])
        assert L == min(x for x in (4, 8, 16) if x >= longest)    # the smallest bucket that fits
        for row, i in enumerate(b["id"]):
            t = by_id[int(i)]
            np.testing.assert_array_equal(b["tokens"][row, :len(t)], t)
            assert (b["tokens"][row, len(t):] == -1).all() and b["mask"][row].sum() == len(t)
        seen.add(L)
    assert len(seen) > 1
    # no buckets: round the longest row up to a multiple
    b = next(iter(PL.make_pipeline(recs, tokenize_fn=T.tokenize, global_batch_size=4, pad_values=PAD,
                                   pad_to_multiple=5, process_count=1, process_index=0)))
    assert b["tokens"].shape[1] % 5 == 0
    with pytest.raises(ValueError, match="largest length bucket 4"):
        next(iter(PL.make_pipeline(recs, tokenize_fn=T.tokenize, global_batch_size=4, pad_values=PAD,
                                   length_buckets=(4,), process_count=1, process_index=0)))


def test_iterator_state_checkpoint_resumes_exactly():
    recs = T.make_records(30)
    kw = dict(tokenize_fn=T.tokenize, global_batch_size=4, seed=3, pad_values=PAD, length_buckets=(8, 16),
              process_count=1, process_index=0)
    it = iter(PL.make_pipeline(recs, **kw))
    _take(it, 11)                                          # crosses an epoch boundary (7 batches per epoch)
    state = json.loads(json.dumps(it.get_state()))        # JSON round trip, as in the checkpoint
    expected = _take(it, 6)
    it2 = iter(PL.make_pipeline(recs, **kw))
    it2.set_state(state)
    for a, b in zip(_take(it2, 6), expected):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_mode_sees_every_record_once_with_valid_mask():
    recs = T.make_records(11)
    seen = []
    n_batches = PL.num_batches(11, 4, drop_remainder=False)
    for p in range(2):
        batches = list(PL.make_pipeline(recs, tokenize_fn=T.tokenize, global_batch_size=4, shuffle=False,
                                        num_epochs=1, drop_remainder=False, pad_values=PAD, process_index=p,
                                        process_count=2))
        assert len(batches) == n_batches == 3                    # equal step counts on every process
        for b in batches:
            assert b["valid"].dtype == bool and b["tokens"].shape[0] == 2
            seen += [int(i) for i, v in zip(b["id"], b["valid"]) if v]
            assert (b["mask"][~b["valid"]] == 0).all()           # padding rows are empty
    assert sorted(seen) == list(range(11))


def test_tokenize_errors_name_the_record():
    recs = [{"id": 0, "tokens": [1, 2], "_origin": "file.jsonl:1"}, {"id": 1, "tokens": "oops", "_origin":
                                                                     "file.jsonl:2"}]

    def tok(r):
        return {"tokens": np.asarray([int(x) for x in r["tokens"]], np.int32)}
    with pytest.raises(RuntimeError, match="file.jsonl:2"):
        list(PL.make_pipeline(recs, tokenize_fn=tok, global_batch_size=2, shuffle=False, num_epochs=1,
                              pad_values={"tokens": 0}, process_count=1, process_index=0))
    with pytest.raises(ValueError, match="not divisible"):
        PL.make_pipeline(recs, tokenize_fn=tok, global_batch_size=3, process_count=2, process_index=0)


def test_global_batch_is_sharded_over_data_axes():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    b = next(iter(PL.make_pipeline(T.make_records(16), tokenize_fn=T.tokenize, global_batch_size=8,
                                   pad_values=PAD, process_count=1, process_index=0)))
    g = PL.global_batch(b, mesh, PAD)
    assert g["tokens"].shape == b["tokens"].shape
    assert g["tokens"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(g["tokens"]), b["tokens"])


# ---------------------------------------------------------------------------------------------------------------
# TFDS ArrayRecord

def _sft(i):
    rng = np.random.default_rng(i)
    return {"id": f"s{i}", "instruction": f"paint {i}", "source": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
            "edited": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
            "principles": [{"question": "red?", "category": "Follow", "check": {"k": i}}, {"question": "same?"}],
            "target": f"ok <score>{i}</score>", "gold_score": float(i), "verdicts": [1, i % 2]}


def test_tfds_array_record_builders_round_trip(tmp_path):
    from edit_r1_jax.data import tfds_builders as TB
    recs = [_sft(i) for i in range(5)]
    jsonl = tmp_path / "eval.jsonl"
    F.write_jsonl(recs[3:], str(jsonl), F.SFT)
    with open(jsonl, "a") as f:
        f.write('{"instruction": "broken"}\n')
    built = TB.build_tfds(F.SFT, {"train": recs[:3], "eval": str(jsonl)}, str(tmp_path / "tfds"), skip_bad=True)
    assert built.skipped == {"train": 0, "eval": 1}
    assert list((tmp_path / "tfds").rglob("*.array_record*")), "ArrayRecord files were written"
    for split, want in (("train", recs[:3]), ("eval", recs[3:])):
        src = TB.open_tfds(built.version_dir, split)
        assert len(src) == len(want)
        got = {r["id"]: r for r in (src[i] for i in range(len(src)))}
        for w in want:
            g = got[w["id"]]
            for k in ("instruction", "target", "gold_score", "principles", "verdicts"):
                assert g[k] == w[k], k
            np.testing.assert_array_equal(g["source"], w["source"])
            np.testing.assert_array_equal(g["edited"], w["edited"])
    # preference pairs, then straight into the Grain pipeline
    pairs = [{"id": f"p{i}", "instruction": "x", "source": _sft(i)["source"], "preferred": _sft(i + 10)["source"],
              "rejected": _sft(i + 20)["source"], "principles": ["q1", "q2"], "preferred_score": 5.0}
             for i in range(4)]
    pbuilt = TB.build_tfds(F.PAIR, {"train": pairs}, str(tmp_path / "tfds"))
    psrc = TB.open_tfds(pbuilt.version_dir, "train")
    p0 = {psrc[i]["id"]: psrc[i] for i in range(len(psrc))}["p0"]
    assert p0["preferred_score"] == 5.0 and "rejected_score" not in p0
    assert p0["principles"] == [{"question": "q1"}, {"question": "q2"}]
    np.testing.assert_array_equal(p0["rejected"], pairs[0]["rejected"])

    def tok(r):
        return {"img": r["preferred"].astype(np.float32) / 255.0, "n": np.int32(len(r["principles"]))}
    b = next(iter(PL.make_pipeline(psrc, tokenize_fn=tok, global_batch_size=2, seed=0, process_count=1,
                                   process_index=0)))
    assert b["img"].shape == (2, 8, 6, 3) and b["n"].tolist() == [2, 2]
    with pytest.raises(KeyError, match="split 'test'"):
        TB.open_tfds(pbuilt.version_dir, "test")
