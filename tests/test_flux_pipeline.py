"""FLUX.1-Kontext scheduler, latent packing / ids / size logic, and a full tiny FluxKontextPipeline run vs ours.

The pipeline comparison uses the same text prompts (tokenized and encoded on each side), the same reference image,
the same packed initial noise and step count: final latents relative error max|d|/max|ref| <= 1e-4 (fp32, highest
matmul precision), decoded images <= 1e-4. max_area is set to height*width (env-notes G12).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from edit_r1_jax.models.flux import parity, pipeline as pl  # noqa: E402
from edit_r1_jax.models.flux.scheduler import FlowMatchEulerScheduler, model_timestep  # noqa: E402


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _torch_scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def test_scheduler_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
    ours = FlowMatchEulerScheduler.from_config(dict(_torch_scheduler().config))
    for n, seq in ((4, 96), (28, 4096), (10, 1024)):
        ref = _torch_scheduler()
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq))
        sigmas, timesteps = ours.schedule(n, seq)
        np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(model_timestep(ref.timesteps.numpy()), (ref.timesteps / 1000).numpy())
    # models.md 2.6 check value: N=4, mu=1.0
    ref = _torch_scheduler()
    ref.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), mu=1.0)
    np.testing.assert_allclose(ref.timesteps.numpy(), [1000, 890.768, 731.059, 475.367], atol=1e-3)
    # one Euler step
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 6, 8)).astype(np.float32), rng.standard_normal((2, 6, 8)).astype(np.float32)
    ref.set_begin_index(0)
    want = ref.step(torch.from_numpy(v), ref.timesteps[0], torch.from_numpy(x), return_dict=False)[0].numpy()
    got = FlowMatchEulerScheduler.step(jnp.asarray(v), jnp.asarray(x), ref.sigmas[0].item(), ref.sigmas[1].item())
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_packing_and_ids_match_diffusers():
    P = diffusers.FluxKontextPipeline
    lat = np.random.default_rng(1).standard_normal((2, 4, 6, 10)).astype(np.float32)
    packed = pl.pack_latents(lat)
    np.testing.assert_array_equal(packed, P._pack_latents(torch.from_numpy(lat), 2, 4, 6, 10).numpy())
    np.testing.assert_array_equal(pl.unpack_latents(packed, 6, 10), lat)
    np.testing.assert_array_equal(np.asarray(pl.unpack_latents(jnp.asarray(packed), 6, 10)), lat)
    # diffusers' unpack takes pixel sizes and the VAE factor: 6x10 latents = 48x80 pixels at factor 8
    np.testing.assert_array_equal(P._unpack_latents(torch.from_numpy(packed), 48, 80, 8).numpy(), lat)
    ids = P._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(pl.latent_image_ids(3, 5), ids)
    ref_ids = pl.latent_image_ids(3, 5, first=1.0)
    assert np.all(ref_ids[:, 0] == 1) and np.array_equal(ref_ids[:, 1:], ids[:, 1:])


def test_output_size_and_kontext_resolution():
    assert pl.fit_to_max_area(1024, 1024, 1024 ** 2, 16) == (1024, 1024)
    assert pl.fit_to_max_area(32, 48, 32 * 48, 4) == (32, 48)
    h, w = pl.fit_to_max_area(768, 1360, 1024 ** 2, 16)          # aspect kept, area <= max_area, multiple of 16
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 1024 ** 2 and abs(w / h - 1360 / 768) < 0.02
    assert pl.kontext_reference_size(1000, 1000, 16) == (1024, 1024)
    assert pl.kontext_reference_size(40, 56, 16) == (880, 1184)      # aspect 1.4 -> (w=1184, h=880)
    assert pl.kontext_reference_size(1568, 672, 16) == (1568, 672)   # tall
    assert pl.kontext_reference_size(40, 56, 4, auto_resize=False) == (40, 56)
    for w, h in pl.PREFERRED_KONTEXT_RESOLUTIONS:                  # every preferred size maps to itself
        assert pl.kontext_reference_size(h // 2, w // 2, 16) == (h, w)


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    pipe = parity.torch_kontext_pipeline(seed=0)
    d = str(tmp_path_factory.mktemp("kontext"))
    pipe.save_pretrained(d)
    ours = pl.KontextPipeline.from_pretrained(d)
    return pipe, ours, d


@pytest.mark.slow
def test_full_pipeline_matches_diffusers(tiny_pipes, highest_precision):
    pipe, ours, _ = tiny_pipes
    h, w, steps = 32, 48, 3
    img = Image.fromarray((np.random.default_rng(2).random((40, 56, 3)) * 255).astype(np.uint8))
    prompts = ["make it red", "add a hat"]
    noise = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(0))
    latents = pipe._pack_latents(noise, 2, 4, h // 2, w // 2)
    with torch.no_grad():
        ref = pipe(image=img, prompt=prompts, height=h, width=w, max_area=h * w, _auto_resize=False,
                   num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=16, latents=latents,
                   output_type="latent").images
        vc = pipe.vae.config
        ref_img = pipe.vae.decode(pipe._unpack_latents(ref, h, w, pipe.vae_scale_factor) / vc.scaling_factor
                                  + vc.shift_factor, return_dict=False)[0]
        ref_img = pipe.image_processor.postprocess(ref_img, output_type="np")
    out = ours(image=img, prompt=prompts, height=h, width=w, max_area=h * w, auto_resize=False,
               num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=16, latents=latents.numpy(),
               output_type="latent")
    assert out.shape == ref.shape == (2, (h // 4) * (w // 4), 16)
    assert rel_err(out, ref.numpy()) <= 1e-4
    images = np.asarray(ours.decode(out, h // 2, w // 2)).transpose(0, 2, 3, 1)
    assert images.shape == ref_img.shape == (2, h, w, 3)
    assert rel_err(images, ref_img) <= 1e-4
    # the noisy sample really moved (3 steps from pure noise)
    assert rel_err(out, latents.numpy()) > 0.1


def test_pipeline_rejects_bad_inputs(tiny_pipes):
    _, ours, _ = tiny_pipes
    with pytest.raises(ValueError, match="prompt"):
        ours(image=None, prompt=None, height=32, width=48, max_area=32 * 48)
    with pytest.raises(ValueError, match="latents shape"):
        ours(prompt_embeds=np.zeros((1, 4, 32), np.float32), pooled_prompt_embeds=np.zeros((1, 32), np.float32),
             height=32, width=48, max_area=32 * 48, latents=np.zeros((1, 5, 16), np.float32))
