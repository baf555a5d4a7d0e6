"""Sigma schedules vs diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps (float32; rtol 1e-6, atol 0).

The FLUX case reproduces how FluxKontextPipeline calls it: sigmas = np.linspace(1, 1/n, n), mu from the
pipeline's own `calculate_shift(image_seq_len, ...)` with the scheduler config values.
"""
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as diffusers_calculate_shift

from edit_r1_jax import rl

FLUX_CFG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
QWEN_EDIT_CFG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                     base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                     time_shift_type="exponential")


def _diffusers(cfg, n, image_seq_len=None):
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sigmas = np.linspace(1.0, 1 / n, n)
    mu = None
    if cfg["use_dynamic_shifting"]:
        c = sched.config
        mu = diffusers_calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                       c.max_shift)
    sched.set_timesteps(n, device="cpu", sigmas=sigmas, mu=mu)
    return mu, sched.sigmas.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("n", [1, 2, 6, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 1369, 4096, 6000])
def test_flux_sigmas_match_diffusers(n, image_seq_len):
    mu, ref_sigmas, ref_t = _diffusers(FLUX_CFG, n, image_seq_len)
    assert rl.calculate_shift(image_seq_len) == pytest.approx(mu, rel=1e-12)
    sigmas, timesteps = rl.flux_sigmas(n, image_seq_len)
    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    assert sigmas.shape == (n + 1,) and timesteps.shape == (n,)
    assert ref_sigmas.dtype == np.float32 and ref_sigmas.shape == sigmas.shape and ref_t.shape == timesteps.shape
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(timesteps, ref_t, rtol=1e-6, atol=0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("n", [4, 10, 50])
def test_qwen_edit_config_with_shift_terminal_matches_diffusers(n):
    mu, ref_sigmas, ref_t = _diffusers(QWEN_EDIT_CFG, n, 1024)
    sigmas, timesteps = rl.flux_sigmas(n, 1024, max_seq_len=8192, max_shift=0.9, shift_terminal=0.02)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(timesteps, ref_t, rtol=1e-6, atol=0)
    assert sigmas[-2] == pytest.approx(0.02, abs=1e-6)  # 1 - (1 - s) loses float32 digits


@pytest.mark.parametrize("n", [1, 16, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_sigmas_match_diffusers_static_shift(n, shift):
    cfg = dict(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    _, ref_sigmas, ref_t = _diffusers(cfg, n)
    sigmas, timesteps = rl.sd3_sigmas(n, shift)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(timesteps, ref_t, rtol=1e-6, atol=0)
    # DanceGRPO form: shift * s / (1 + (shift - 1) s) on linspace(1, 0, n + 1), in float64
    s = np.linspace(1, 0, n + 1)
    np.testing.assert_allclose(sigmas, shift * s / (1 + (shift - 1) * s), rtol=1e-6, atol=1e-7)


def test_models_md_anchor_values():
    # models.md: N=4, mu=1.0 gives timesteps [1000, 890.768, 731.059, 475.367]
    t = rl.time_shift_exponential(1.0, np.linspace(1, 1 / 4, 4)) * 1000
    np.testing.assert_allclose(t, [1000.0, 890.768, 731.059, 475.367], atol=1e-3)


def test_hand_computed_shift():
    # mu at 4096 tokens is 1.15 and at 256 tokens 0.5; sigma'(0.5) = e^mu / (e^mu + 1)
    assert rl.calculate_shift(4096) == pytest.approx(1.15)
    assert rl.calculate_shift(256) == pytest.approx(0.5)
    e = np.exp(1.15)
    assert rl.time_shift_exponential(1.15, [0.5])[0] == pytest.approx(e / (e + 1), rel=1e-6)
    assert rl.static_shift([0.5], 3.0)[0] == pytest.approx(0.75, rel=1e-7)


def test_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        rl.flux_sigmas(0, 1024)
    with pytest.raises(ValueError, match="num_steps"):
        rl.sd3_sigmas(2.5)

