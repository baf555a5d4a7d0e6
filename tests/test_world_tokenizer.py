"""World tokenizer: trained offline, saved in the HF layout, loaded through transformers, round-trips the world."""
import json
import os

import pytest
from transformers import AutoTokenizer, Qwen2TokenizerFast

from edit_r1_jax.data import synthetic as S
from edit_r1_jax.data import world_tokenizer as W
from edit_r1_jax.rrm import prompts

VOCAB = 640


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world_tok"))
    W.train_world_tokenizer(d, vocab_size=VOCAB, n_records=40, seed=0)
    return d


def test_hf_layout_and_loading(tok_dir):
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tok_dir))
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["eos_token"] == "<|im_end|>"
    for tok in (AutoTokenizer.from_pretrained(tok_dir), Qwen2TokenizerFast.from_pretrained(tok_dir),
                W.load_world_tokenizer(tok_dir)):
        assert len(tok) == VOCAB
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        ids = [tok.convert_tokens_to_ids(t) for t in prompts.SPECIAL_TOKENS]
        assert ids == list(range(VOCAB - 7, VOCAB))           # Qwen's order, after the BPE vocabulary
    ids = W.special_token_ids(AutoTokenizer.from_pretrained(tok_dir))
    assert ids["image_token_id"] == VOCAB - 2 and ids["eos_token_id"] == VOCAB - 5 and ids["vocab_size"] == VOCAB


def test_round_trip_of_world_text(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = S.world_texts(12, seed=99)                       # a seed the tokenizer was not trained on
    recs = S.make_sft_records(6, seed=98, size=32)
    for r in recs:
        msgs = prompts.build_scoring_messages(r["instruction"], S.public_principles(r["principles"]))
        p, c = prompts.render_sft_example(msgs, r["target"])
        texts += [p + c, r["instruction"]]
    texts += ["naïve café — 7½ ✓ \U0001f600", "  leading and trailing  \n\n\t"]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
    lengths = [len(tok(r["target"])["input_ids"]) for r in recs]
    assert max(lengths) < max(len(r["target"]) for r in recs) / 2      # the BPE really merges the world's words


def test_special_tokens_and_digits_are_single_tokens(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1
    for d in range(10):
        assert len(tok(str(d), add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("<score>10</score>", add_special_tokens=False)["input_ids"]) >= 4   # digits split one by one


def test_chat_template_matches_render_chat(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    r = S.make_sft_records(1, seed=3, size=32)[0]
    cases = [prompts.build_scoring_messages(r["instruction"], r["principles"], r["source"], r["edited"]),
             prompts.build_principle_messages(r["instruction"], r["source"]),
             [{"role": "user", "content": "plain text turn"}, {"role": "assistant", "content": r["target"]}]]
    for msgs in cases:
        for gen in (False, True):
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                prompts.render_chat(msgs, add_generation_prompt=gen)


def test_training_is_deterministic_and_cached(tmp_path):
    a = W.train_world_tokenizer(None, vocab_size=400, n_records=10, seed=1)
    b = W.train_world_tokenizer(None, vocab_size=400, n_records=10, seed=1)
    assert a.get_vocab() == b.get_vocab()
    d = str(tmp_path / "tok")
    W.ensure_world_tokenizer(d, vocab_size=400, n_records=10)
    stamp = os.path.getmtime(os.path.join(d, "tokenizer.json"))
    tok = W.ensure_world_tokenizer(d, vocab_size=400, n_records=10)      # second call loads, does not retrain
    assert os.path.getmtime(os.path.join(d, "tokenizer.json")) == stamp and len(tok) == 400
    with pytest.raises(ValueError, match="vocab_size"):
        W.train_world_tokenizer(None, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        W.load_world_tokenizer(str(tmp_path / "missing"))
