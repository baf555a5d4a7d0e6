"""A small byte-level BPE tokenizer for the synthetic world, saved like a Qwen2.5-VL checkpoint's tokenizer.

Trained offline with `tokenizers` on the world's text (instructions, principles, decomposition and scoring prompts,
full and compact traces; `synthetic.world_texts`), with Qwen2's pipeline: NFC normaliser, Qwen2's split regex
(digits one by one, so the digits 0-9 are single tokens as the logit-mode scorer needs), byte-level alphabet. It is
then wrapped in transformers' `Qwen2TokenizerFast` (the same construction a real Qwen2 tokenizer goes through), with
the Qwen2.5-VL special tokens appended after the BPE vocabulary in Qwen's order
(``<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>``), eos
``<|im_end|>``, pad ``<|endoftext|>``, and a chat template of our own that renders exactly like
`edit_r1_jax.rrm.prompts.render_chat`. ``save_pretrained`` writes the HF layout (tokenizer.json,
tokenizer_config.json, chat_template.jinja); ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Iterable

from edit_r1_jax.rrm.prompts import DEFAULT_SYSTEM, SPECIAL_TOKENS

DEFAULT_VOCAB_SIZE = 1024

# Our Jinja template: same layout as the Qwen2.5-VL template for text and image parts (see rrm.prompts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def training_corpus(n_records: int = 400, seed: int = 0) -> list:
    """The world's text with special-token strings cut out (they are added tokens, not learned merges)."""
    from edit_r1_jax.data.synthetic import world_texts
    numbers = [" ".join(f"{a}.{b}" for a in range(11) for b in range(10)), "0 1 2 3 4 5 6 7 8 9 10"]
    out = []
    for text in world_texts(n_records, seed) + numbers:
        out.extend(p for p in _SPECIAL_RE.split(text) if p)
    return out


def train_bpe(texts: Iterable[str], bpe_vocab_size: int):
    """A `tokenizers.Tokenizer` (byte-level BPE, Qwen2 pre-tokenization) trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(texts), trainer)
    return tk


def train_world_tokenizer(out_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, n_records: int = 400,
                          seed: int = 0):
    """Train the world tokenizer (``vocab_size`` includes the 7 special tokens) and save it to ``out_dir``."""
    from transformers import Qwen2TokenizerFast

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be >= {256 + n_special} (byte alphabet + special tokens), got {vocab_size}")
    bpe = train_bpe(training_corpus(n_records, seed), vocab_size - n_special)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for i, tok in enumerate(SPECIAL_TOKENS):   # after the BPE vocabulary, in Qwen's order
        vocab[tok] = len(model["vocab"]) + i
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, extra_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_world_tokenizer(path: str):
    """Load a saved tokenizer directory through transformers, as a real checkpoint's would be."""
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path!r} (train it with train_world_tokenizer)")
    return AutoTokenizer.from_pretrained(path)


def ensure_world_tokenizer(path: str, vocab_size: int = DEFAULT_VOCAB_SIZE, n_records: int = 400, seed: int = 0):
    """Load the tokenizer cached at ``path``, training and saving it first if it is not there.

    Safe when several processes (multi-host runs on a shared disk) call it at once: each trains into its own temporary
    directory and renames it to ``path`` (atomic); a reader never sees a half-written tokenizer.json."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = path.rstrip("/")
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        train_world_tokenizer(tmp, vocab_size, n_records, seed)
        try:
            os.rename(tmp, path)     # fails if another process's rename won (path is then a non-empty directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isfile(os.path.join(path, "tokenizer.json")):   # a directory with other files in it
                train_world_tokenizer(path, vocab_size, n_records, seed)
    return load_world_tokenizer(path)


def special_token_ids(tokenizer) -> dict:
    """Ids a Qwen2.5-VL config needs: ``vocab_size`` (= len(tokenizer)), bos/eos/pad and the vision token ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"vocab_size": len(tokenizer), "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "im_start_token_id": ids["<|im_start|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"]}
