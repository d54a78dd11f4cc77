"""DPM++ 2S a (ours): the diffusers-protocol scheduler equals the plain sampling loop it implements."""
import math

import numpy as np
import pytest
import torch

from sd_demo.sampling.dpmpp_2s_ancestral import DPMSolverPP2SAncestralScheduler


def model_fn(x, t):
    """A fixed smooth 'UNet': depends on the input and the timestep, like a real ε/v model."""
    return torch.tanh(0.7 * x + 0.001 * t) * 0.9 + 0.1 * torch.sin(x)


def reference_loop(sched, x, steps, generator, prediction_type):
    """The algorithm written as a straight loop in σ-space (what k-diffusion's sampler does)."""
    sigmas = sched.sigmas.double().tolist()

    def denoise(x, sigma):
        t = sched._t_of_sigma(sigma)
        out = model_fn(x / math.sqrt(sigma**2 + 1), torch.tensor(t)).double()
        if prediction_type == "epsilon":
            return x - sigma * out
        return out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)

    x = x.double() * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        down, up = sched._ancestral(s, s_next)
        d = denoise(x, s)
        if down == 0:
            x = d
            continue
        h = math.log(s / down)
        u = (math.sqrt(s * down) / s) * x - math.expm1(-h / 2) * d
        x = (down / s) * x - math.expm1(-h) * denoise(u, math.sqrt(s * down))
        if up > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=torch.float32).double() * up
    return x


def protocol_loop(sched, x, generator):
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_protocol_equals_reference_loop(prediction_type, spacing, karras, beta_schedule):
    steps = 12
    sched = DPMSolverPP2SAncestralScheduler(prediction_type=prediction_type, timestep_spacing=spacing,
                                            use_karras_sigmas=karras, beta_schedule=beta_schedule, steps_offset=1)
    sched.set_timesteps(steps)
    assert len(sched.timesteps) == 2 * steps - 1  # two UNet calls per step, one on the last
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = protocol_loop(sched, x.clone(), torch.Generator().manual_seed(1))
    ref = reference_loop(sched, x.clone(), steps, torch.Generator().manual_seed(1), prediction_type)
    assert (ours.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_deterministic_variant_recovers_x0_with_a_perfect_oracle(steps):
    """η = 0 and a model that knows x₀: DPM-Solver++ is exact for a constant data prediction."""
    sched = DPMSolverPP2SAncestralScheduler(eta=0.0, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    x = x0 + noise * sched.init_noise_sigma
    for t in sched.timesteps:
        sigma = sched._plan[sched._index()][0]
        eps = (x - x0) / sigma  # the true ε for x_σ = x₀ + σ ε
        x = sched.step(eps, t, x).prev_sample
    assert (x - x0).abs().max() < 1e-5


def test_ancestral_noise_split_preserves_the_target_level():
    sched = DPMSolverPP2SAncestralScheduler()
    for s, s_next in [(14.6, 9.0), (1.0, 0.5), (0.2, 0.03)]:
        down, up = sched._ancestral(s, s_next)
        assert math.isclose(down**2 + up**2, s_next**2, rel_tol=1e-9) and 0 < down < s_next


def test_config_round_trip(tmp_path):
    sched = DPMSolverPP2SAncestralScheduler(prediction_type="v_prediction", use_karras_sigmas=True)
    sched.save_config(tmp_path)
    again = DPMSolverPP2SAncestralScheduler.from_pretrained(tmp_path)
    assert again.config.prediction_type == "v_prediction" and again.config.use_karras_sigmas
    again.set_timesteps(5)
    sched.set_timesteps(5)
    assert np.allclose(again.timesteps.numpy(), sched.timesteps.numpy())
