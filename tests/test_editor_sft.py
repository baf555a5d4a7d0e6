"""Editor pieces: pixel codec, edit-prompt JSONL, editor export/load, and flow-matching SFT (through the CLI) whose
loss decreases on the synthetic world."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.models.flux import pixel_codec
from edit_r1_jax.models.flux.pipeline import pack_latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pixel_codec_roundtrip_and_packing():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 8, 12)).astype(np.float32)
    c1 = pixel_codec.PixelCodecConfig(1)
    np.testing.assert_array_equal(np.asarray(pixel_codec.decode(c1, pixel_codec.encode(c1, x))), x)
    c4 = pixel_codec.PixelCodecConfig(4)
    z = np.asarray(pixel_codec.encode(c4, x))
    assert z.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(z[1, 2, 1, 2], x[1, 2, 4:8, 8:12].mean(), rtol=1e-6)
    y = np.asarray(pixel_codec.decode(c4, z))
    assert y.shape == x.shape and np.all(y[:, :, :4, :4] == z[:, :, :1, :1])
    np.testing.assert_allclose(np.asarray(pixel_codec.encode(c4, y)), z, rtol=1e-6)     # encode(decode(z)) == z
    packed = pack_latents(jnp.asarray(np.asarray(pixel_codec.encode(pixel_codec.PixelCodecConfig(2), x))))
    assert packed.shape == (2, 2 * 3, 12)                                               # (h/2)(w/2) tokens x 4C
    with pytest.raises(ValueError, match="divisible"):
        pixel_codec.encode(c4, x[:, :, :6])
    with pytest.raises(ValueError, match="factor"):
        pixel_codec.PixelCodecConfig(0)
    assert pixel_codec.PixelCodecConfig.from_json(c4.to_json()) == c4


def test_read_edit_jsonl(tmp_path):
    from PIL import Image
    from edit_r1_jax.train.editor_setup import read_edit_jsonl
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "a.png")
    lines = [{"prompt": "make it red", "source_image": "a.png", "category": "color", "principles": ["red?"]},
             {"instruction": "x", "source": "a.png", "target": "a.png"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = read_edit_jsonl(str(tmp_path / "r.jsonl"))
    assert recs[0]["instruction"] == "make it red" and recs[0]["source"].shape == (8, 8, 3)
    assert recs[0]["category"] == "color" and recs[1]["category"] == "all" and recs[1]["target"][0, 0, 0] == 7
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: missing required field 'source'"):
        read_edit_jsonl(str(tmp_path / "bad.jsonl"))


def test_tokenizers_and_conditioning():
    from edit_r1_jax.train.editor_setup import bytes_tokenizer
    tok = bytes_tokenizer()
    t5_ids, clip_ids = tok(["ab", "a" * 40], 8, 4)
    assert t5_ids[0].tolist() == [ord("a") + 3, ord("b") + 3, 1, 0, 0, 0, 0, 0]
    assert clip_ids.shape == (2, 4) and clip_ids[1, -1] == 1                            # truncated, EOS kept


def test_cli_registers_editor_commands():
    from edit_r1_jax import cli
    parser = cli.build_parser()
    for cmd in ("editor-sft", "grpo"):
        args = parser.parse_args([cmd, "--config", "configs/tiny.py", "--workdir", "w", "--set", "train.steps=2"])
        assert args.overrides == ["train.steps=2"] and callable(args._run)
    args = parser.parse_args(["eval-edit", "--editor", "e", "--rrm", "gold", "--data", "synthetic:4"])
    assert args.steps == 28 and callable(args._run)


@pytest.mark.slow
def test_editor_sft_loss_decreases_and_export_loads(tmp_path):
    """`editor-sft` (what the CLI runs) on the synthetic world: the rectified-flow loss falls, evaluation writes the
    gold reward and a grid, and the exported editor loads back with exactly the trained weights and encoders."""
    from edit_r1_jax import config as config_lib
    from edit_r1_jax.train import editor_sft
    from edit_r1_jax.train.editor_setup import build_editor, load_editor
    from edit_r1_jax.train.metrics import read_metrics
    w = str(tmp_path / "sft")
    sets = ["editor.tokenizer=bytes", "editor.image_size=32", "train.steps=24", "train.lr=3e-3",
            "train.eval_every=24", "train.checkpoint_every=100", "train.async_checkpoint=false",
            "editor.num_train_prompts=16"]
    cfg = config_lib.get_config(os.path.join(ROOT, "configs", "tiny.py"), sets, num_devices=jax.device_count())
    result = editor_sft.run(cfg, w)
    assert result.stopped == "done" and result.step == 24
    recs = read_metrics(os.path.join(w, "metrics.jsonl"))
    losses = [r["loss"] for r in recs]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:3]), losses
    last = recs[-1]
    assert "eval/loss" in last and 0.0 <= last["eval/gold_reward"] <= 10.0
    assert os.path.isfile(os.path.join(w, "images", "eval_grid_24.png"))
    setup = load_editor(os.path.join(w, "editor"))
    assert setup.is_pixel and setup.codec.factor == 4 and setup.image_size == 32
    assert setup.tokenizer.kind == "bytes" and setup.tcfg.num_layers == 1 and setup.tcfg.guidance_embeds
    loaded = setup.transformer_params()
    final = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), result.state.params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), b)
    fresh = build_editor(cfg, None)
    text = ["Paint the background light grey."]
    for a, b in zip(setup.encode_text(text), fresh.encode_text(text)):                # frozen encoders exported
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
