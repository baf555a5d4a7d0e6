"""RRM scoring throughput (edits/s) of one editing-GRPO group (G edits of one source + instruction) on CPU, fp32: shared-prefix KV cache
(source image encoded and its prompt prefix prefilled once per group) vs the plain path (every row prefilled in
full). Tiny random RRM (world tokenizer), 224-px images (64 merged tokens each), greedy, 32 new tokens.

Also the single-forward logit mode (expected score over the digit tokens). Goal: ratio = plain seconds /
shared-prefix seconds > 1 (prefill saving; grows with image size and group size).
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402

G, NEW, SIZE = 8, 32, 224


def main():
    from edit_r1_jax.data import synthetic
    from edit_r1_jax.rrm import records
    from edit_r1_jax.rrm.reward import RewardModel, prefix_key, split_at_edited_image
    with tempfile.TemporaryDirectory() as d:
        records.write_tiny_rrm(d, image_size=SIZE, hidden=128, intermediate=256, vision_hidden=64, layers=2)
        model = RewardModel.from_dir(d, batch_size=G, bucket=64, max_new_tokens=NEW)
    pair = synthetic.make_preference_pairs(1, seed=0, size=SIZE)[0]
    edits = [pair["preferred"], pair["rejected"], pair["source"]] * G
    recs = [{"instruction": pair["instruction"], "principles": pair["principles"], "source": pair["source"],
             "edited": e} for e in edits[:G]]
    exs = [model.example(r) for r in recs]
    keys = [prefix_key(e, model.inputs) for e in exs]
    assert len(set(keys)) == 1
    plain = timing.time_fn(lambda: model.generate_tokens(exs), sync=lambda x: x, warmup=1, repeat=3)
    shared = timing.time_fn(lambda: model.generate_tokens_shared(exs, keys, 1), sync=lambda x: x, warmup=1,
                            repeat=3)
    logit = timing.time_fn(lambda: model.last_logits(exs), sync=lambda x: x, warmup=1, repeat=3)
    same = (model.generate_tokens(exs) == model.generate_tokens_shared(exs, keys, 1)).all()
    prompt_len = len(exs[0]["input_ids"])
    prefix_len = len(split_at_edited_image(exs[0], model.inputs)[0]["input_ids"])
    timing.report("reward_throughput", "plain / shared-prefix time > 1", plain["median_s"] / shared["median_s"],
                  edits_per_s={"plain": G / plain["median_s"], "shared_prefix": G / shared["median_s"],
                               "logits": G / logit["median_s"]},
                  compile_est_s={"plain": plain["compile_est_s"], "shared_prefix": shared["compile_est_s"],
                                 "logits": logit["compile_est_s"]},
                  plain=plain, shared=shared, group=G, new_tokens=NEW, image_size=SIZE, prompt_tokens=prompt_len,
                  prefix_tokens=prefix_len,
                  same_tokens=bool(same))


if __name__ == "__main__":
    main()
