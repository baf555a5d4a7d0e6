"""`edit-r1-jax edit` (sharded over the 8 fake devices) and `edit-r1-jax parity flux` on a tiny random Kontext
pipeline directory."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from edit_r1_jax import cli  # noqa: E402
from edit_r1_jax.models.flux import parity  # noqa: E402
from edit_r1_jax.models.flux.pipeline import KontextPipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kontext_cli")
    parity.torch_kontext_pipeline(seed=1).save_pretrained(str(d / "pipe"))
    img = Image.fromarray((np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8))
    img.save(d / "in.png")
    return d


@pytest.mark.slow
def test_edit_cli_sharded_matches_unsharded(pipe_dir, highest_precision):
    out = pipe_dir / "out.png"
    rc = cli.main(["edit", "--model", str(pipe_dir / "pipe"), "--image", str(pipe_dir / "in.png"),
                   "--prompt", "make it red", "--steps", "2", "--seed", "5", "--out", str(out),
                   "--height", "32", "--width", "48", "--max-area", str(32 * 48), "--no-auto-resize",
                   "--max-sequence-length", "16", "--per-layer"])
    assert rc == 0
    got = np.asarray(Image.open(out)).astype(np.int32)
    assert got.shape == (32, 48, 3)
    ours = KontextPipeline.from_pretrained(str(pipe_dir / "pipe"))       # single device
    want = ours(image=Image.open(pipe_dir / "in.png"), prompt="make it red", height=32, width=48,
                max_area=32 * 48, num_inference_steps=2, guidance_scale=2.5, seed=5, auto_resize=False,
                max_sequence_length=16, output_type="pil")[0]
    assert np.abs(got - np.asarray(want).astype(np.int32)).max() <= 1


@pytest.mark.slow
def test_parity_cli_passes(pipe_dir, capsys):
    rc = cli.main(["parity", "flux", "--dir", str(pipe_dir / "pipe"), "--steps", "2", "--size", "32x48"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for row in ("double[1] image", "single[0] text", "velocity (whole model)", "vae decoder",
                "t5 last hidden state", "clip pooled output", "final latents (2 steps, 32x48)", "PASS"):
        assert row in text


@pytest.mark.slow
def test_edit_cli_with_bfl_transformer_and_diffusers_lora(pipe_dir, highest_precision):
    """`edit --transformer FILE.safetensors` (BFL single file) `--lora DIR` (diffusers' LoRA file) gives the image
    of our pipeline with the folder's transformer and the same adapters."""
    import jax

    from edit_r1_jax.models import flux, lora as lora_lib
    from edit_r1_jax.models.flux import lora_diffusers
    ours = KontextPipeline.from_pretrained(str(pipe_dir / "pipe"))
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    rng = np.random.default_rng(4)
    lora = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.3,
                        lora_lib.init_lora(ours.tparams, lcfg, 0))
    lora_diffusers.save_diffusers_lora(ours.tcfg, lora, lcfg, str(pipe_dir / "dlora"))
    flux.save_transformer_bfl(ours.tcfg, ours.tparams, str(pipe_dir / "bfl.safetensors"))
    out = pipe_dir / "out_bfl_lora.png"
    kw = dict(height=32, width=48, max_area=32 * 48, num_inference_steps=2, guidance_scale=2.5, seed=5,
              auto_resize=False, max_sequence_length=16)
    rc = cli.main(["edit", "--model", str(pipe_dir / "pipe"), "--image", str(pipe_dir / "in.png"), "--prompt",
                   "make it red", "--steps", "2", "--seed", "5", "--out", str(out), "--height", "32", "--width",
                   "48", "--max-area", str(32 * 48), "--no-auto-resize", "--max-sequence-length", "16",
                   "--transformer", str(pipe_dir / "bfl.safetensors"), "--lora", str(pipe_dir / "dlora")])
    assert rc == 0
    got = np.asarray(Image.open(out)).astype(np.int32)
    image = Image.open(pipe_dir / "in.png")
    want = ours(image=image, prompt="make it red", output_type="pil", lora=lora, lora_scale=lcfg.scale, **kw)[0]
    plain = ours(image=image, prompt="make it red", output_type="pil", **kw)[0]
    assert np.abs(got - np.asarray(want).astype(np.int32)).max() <= 1
    assert np.abs(got - np.asarray(plain).astype(np.int32)).max() > 1          # the adapters did something
