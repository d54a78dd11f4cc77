"""sd_demo.sampling.ours against diffusers' own schedulers, a perfect noise oracle, and real SD pipelines.

The "model" in the sampling loops is a fixed smooth function that is consistent with a schedule: it guesses a
bounded x0 from x_t and returns the ε (or v) that guess implies, as a trained network would. An arbitrary function
would drive ε-prediction x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ to hundreds at high t, where fp32 rounding alone exceeds 1e-5.
"""
import itertools
import math

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sd_demo.sampling.ours import (
    OursDDIMScheduler,
    OursDDPMScheduler,
    OursDPMSolverPP2MScheduler,
    spaced_timesteps,
)

TOL = 1e-5
T = 1000
PREDICTIONS = ["epsilon", "v_prediction"]
BETAS = ["scaled_linear", "linear"]
# (timestep_spacing, steps_offset): SD ships "leading" with steps_offset=1; the offset only moves "leading".
SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
ZERO_SNR = [False, True]
X_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, H, W) initial noise

SKIP_EPS_ZERO_SNR = ("ε-prediction at zero terminal SNR: x̂0 = (x_T − ε)/√ᾱ_T divides by 0 at t = T-1, inf/NaN in "
                     "any implementation (diffusers #3851); Lin et al. pair zero SNR with v-prediction")

SKIP_DPM_EPS_ZERO_SNR = ("ε-prediction at zero terminal SNR: DPM-Solver pins ᾱ_{T-1} to 2^-24, so x̂0 = (x − σε)/α "
                         "is finite but multiplies fp32 rounding by 1/α = 4096 (implementations differ by ~1.4e-5); "
                         "Lin et al. pair zero SNR with v-prediction")


def base_config(prediction_type, beta_schedule, spacing, zero_snr) -> dict:
    timestep_spacing, steps_offset = spacing
    config = dict(prediction_type=prediction_type, beta_schedule=beta_schedule, timestep_spacing=timestep_spacing,
                  steps_offset=steps_offset, rescale_betas_zero_snr=zero_snr)
    if beta_schedule == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)  # SD's values; "linear" keeps DDPM's defaults
    return config


def make_model(alphas_cumprod, prediction_type):
    """A deterministic stand-in for a network trained on this ᾱ table."""
    abar = alphas_cumprod.double().tolist()

    def model(x, t):
        a = abar[int(t)]
        x0 = torch.tanh(0.7 * x.roll(1, dims=1) + 0.2 * torch.sin(3 * x) + int(t) / 2000)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return eps if prediction_type == "epsilon" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0

    return model


def sample(scheduler, model, n, seed=0, **step_kwargs):
    """The pipelines' denoising loop; returns x after the last step."""
    scheduler.set_timesteps(n)
    generator = torch.Generator().manual_seed(seed)
    x = X_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def fp64_coefficients(reference):
    """Let a diffusers DDPM/DDIM do its scalar ᾱ arithmetic in fp64, as ours does (same ᾱ values, fp32 samples).

    In fp32, 1 − ᾱ_t/ᾱ_{t-1} cancels on a last step that lands on ᾱ_0 (set_alpha_to_one=False): diffusers' DDIM at
    eta=1 is then 2.4e-5 off the exact step while ours is exact, which would hide real differences behind 1e-5.
    """
    reference.alphas_cumprod = reference.alphas_cumprod.double()
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(reference, name):
            setattr(reference, name, getattr(reference, name).double())
    return reference


def assert_close(ours, reference):
    assert torch.isfinite(ours).all()
    delta = (ours - reference).abs().max().item()
    assert delta <= TOL, f"max |Δ| = {delta:.3g}"


def starts_at_zero_snr(scheduler, n) -> bool:
    """Whether the first step is at ᾱ = 0 (DPM-Solver: at its pin ᾱ = 2^-24, which Karras' σ_max also hits)."""
    scheduler.set_timesteps(n)
    if isinstance(scheduler, OursDPMSolverPP2MScheduler):
        return 1 / (1 + scheduler.sigmas[0].item() ** 2) <= 2.0**-23
    return scheduler.alphas_cumprod[scheduler.timesteps[0]].item() == 0


# ---------------------------------------------------------------------------------------------------------------
# 1. Full sampling loops against diffusers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("zero_snr", ZERO_SNR)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_matches_diffusers(prediction_type, beta_schedule, spacing, zero_snr, variance_type, clip_sample, n):
    config = dict(base_config(prediction_type, beta_schedule, spacing, zero_snr), variance_type=variance_type,
                  clip_sample=clip_sample)
    ours = OursDDPMScheduler(**config)
    if zero_snr and prediction_type == "epsilon" and starts_at_zero_snr(ours, n):
        pytest.skip(SKIP_EPS_ZERO_SNR)
    reference = fp64_coefficients(diffusers.DDPMScheduler(**config))
    model = make_model(ours.alphas_cumprod, prediction_type)
    assert_close(sample(ours, model, n), sample(reference, model, n))


def ddim_reference(config, eta, n):
    """The diffusers scheduler whose loop must equal our DDIM's, or a reason why there is none.

    diffusers' DDIMScheduler steps from t to t − T//n, which is the next grid point only for "leading" spacing and
    for "trailing" with n dividing T (#9261, #11347, #12633), and NaNs at eta > 0 from t = T-1 at zero SNR, where
    √(1 − ᾱ_{t-1} − σ_t²) takes the root of a rounding-negative 0 (#5969). Elsewhere two exact diffusers equivalents
    on our grid stand in, both without x̂0 clipping (with it, DDIM keeps the unclipped ε̂ and they differ):
      eta = 0: DPM-Solver++ first order (= DDIM, Lu et al. 2022) with a final σ of 0 or σ(ᾱ_0);
      eta = 1: DDPM with the same custom timesteps (eq. 16 at η = 1 is DDPM's posterior), ending on ᾱ = 1.
    """
    ours = OursDDIMScheduler(**config)
    ours.set_timesteps(n)
    grid = ours.timesteps.tolist()
    uniform = config["timestep_spacing"] == "leading" or (config["timestep_spacing"] == "trailing" and T % n == 0)
    nan = eta > 0 and config["rescale_betas_zero_snr"] and T - 1 in grid
    if uniform and not nan:
        return fp64_coefficients(diffusers.DDIMScheduler(**config)), None
    broken = "diffusers' DDIM " + ("NaNs at zero SNR with eta > 0 (#5969)" if uniform else "is off-grid (#12633)")
    shared = {k: v for k, v in config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    if config["clip_sample"]:
        return None, broken + " and no diffusers equivalent clips x̂0 the same way"
    if eta == 0 and not config["rescale_betas_zero_snr"]:
        final = "zero" if config["set_alpha_to_one"] else "sigma_min"
        return diffusers.DPMSolverMultistepScheduler(**shared, solver_order=1, final_sigmas_type=final), grid
    if eta == 1 and config["set_alpha_to_one"]:
        return fp64_coefficients(diffusers.DDPMScheduler(**shared, clip_sample=False)), grid
    # DPM-Solver pins ᾱ_{T-1} to 2^-24 (no exact zero SNR); DDPM ends on ᾱ = 1, not ᾱ_0.
    return None, broken + " and no exact diffusers equivalent exists"


@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("zero_snr", ZERO_SNR)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_matches_diffusers(prediction_type, beta_schedule, spacing, zero_snr, eta, set_alpha_to_one,
                                clip_sample, n):
    config = dict(base_config(prediction_type, beta_schedule, spacing, zero_snr), clip_sample=clip_sample,
                  set_alpha_to_one=set_alpha_to_one)
    ours = OursDDIMScheduler(**config)
    if zero_snr and prediction_type == "epsilon" and starts_at_zero_snr(ours, n):
        pytest.skip(SKIP_EPS_ZERO_SNR)
    reference, grid = ddim_reference(config, eta, n)
    if reference is None:
        pytest.skip(grid + "; the oracle property test covers this grid")
    model = make_model(ours.alphas_cumprod, prediction_type)
    expected = _sample_on_grid(reference, model, n, grid, eta)
    assert_close(sample(ours, model, n, eta=eta), expected)


def _sample_on_grid(reference, model, n, grid, eta):
    if grid is None:
        return sample(reference, model, n, eta=eta)
    reference.set_timesteps(timesteps=grid)  # the equivalents take our grid as custom timesteps
    reference.set_timesteps = lambda n: None  # ...and keep it through sample()
    return sample(reference, model, n)


@pytest.mark.parametrize("n", [7, 20])  # below and above lower_order_final's 15-step threshold
@pytest.mark.parametrize("final_sigmas_type,lower_order_final", [("zero", True), ("sigma_min", True),
                                                                 ("sigma_min", False)])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("zero_snr", ZERO_SNR)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_dpmpp_2m_matches_diffusers(prediction_type, beta_schedule, spacing, zero_snr, karras, final_sigmas_type,
                                    lower_order_final, n):
    config = dict(base_config(prediction_type, beta_schedule, spacing, zero_snr), use_karras_sigmas=karras,
                  final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final)
    ours = OursDPMSolverPP2MScheduler(**config)
    if zero_snr and prediction_type == "epsilon" and starts_at_zero_snr(ours, n):
        pytest.skip(SKIP_DPM_EPS_ZERO_SNR)
    reference = diffusers.DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    model = make_model(ours.alphas_cumprod, prediction_type)
    assert_close(sample(ours, model, n), sample(reference, model, n))


@pytest.mark.parametrize("cls,ref_cls,dpm", [
    (OursDDPMScheduler, diffusers.DDPMScheduler, False),
    (OursDDIMScheduler, diffusers.DDIMScheduler, False),
    (OursDPMSolverPP2MScheduler, diffusers.DPMSolverMultistepScheduler, True),
])
def test_timestep_grids_match_diffusers(cls, ref_cls, dpm):
    for (spacing, offset), n in itertools.product(SPACINGS, [*range(1, 40), 61, 97, 250, 333, 500, 999]):
        config = dict(timestep_spacing=spacing, steps_offset=offset)
        ours, reference = cls(**config), ref_cls(**config)
        reference.set_timesteps(n)
        if reference.timesteps.max() >= T:  # "leading" + steps_offset at large n: diffusers' grid reaches t = T
            with pytest.raises(ValueError, match="steps_offset"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert len(ours.timesteps) == n
        if len(reference.timesteps) == n:  # diffusers' "trailing" gives n+1 points ending at t = -1 for n = 61, ...
            assert ours.timesteps.tolist() == reference.timesteps.tolist(), (spacing, offset, n)
            assert not dpm or torch.equal(ours.sigmas, reference.sigmas)
    for n in (1, 2, 5, 25, 100) if dpm else ():  # Karras σ's and the timesteps they round to
        ours, reference = cls(use_karras_sigmas=True), ref_cls(use_karras_sigmas=True)
        ours.set_timesteps(n)
        reference.set_timesteps(n)
        assert ours.timesteps.tolist() == reference.timesteps.tolist()
        assert torch.allclose(ours.sigmas, reference.sigmas, rtol=1e-6, atol=0)


def test_alphas_cumprod_match_diffusers_to_the_bit():
    for beta_schedule, zero_snr in itertools.product(BETAS, ZERO_SNR):
        config = base_config("epsilon", beta_schedule, ("leading", 0), zero_snr)
        assert torch.equal(OursDDPMScheduler(**config).alphas_cumprod, diffusers.DDPMScheduler(**config).alphas_cumprod)
        # zero SNR: ᾱ_{T-1} = 0 exactly; DPM-Solver pins it to 2^-24 (as diffusers does) to keep λ finite
        ours, reference = OursDPMSolverPP2MScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
        assert torch.equal(ours.alphas_cumprod, reference.alphas_cumprod)
        assert (ours.alphas_cumprod[-1].item() == 2.0**-24) == zero_snr


def test_ddpm_step_mean_is_eq_11():
    """The x0-form posterior mean (eq. 7) equals eq. 11's ε form on a strided grid."""
    scheduler = OursDDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False)
    scheduler.set_timesteps(10)
    eps = torch.randn(X_T.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_t = X_T.double()
    for t, t_prev in zip(scheduler.timesteps.tolist(), scheduler.timesteps.tolist()[1:] + [-1]):
        abar_t = scheduler.alphas_cumprod[t].item()
        abar_prev = scheduler.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        alpha_t = abar_t / abar_prev
        eq11 = (x_t - (1 - alpha_t) / math.sqrt(1 - abar_t) * eps) / math.sqrt(alpha_t)
        x_prev = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)  # eq. 7
        z = torch.randn(X_T.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        noise = math.sqrt(max(beta_tilde, 1e-20)) * z if t > 0 else 0
        assert (x_prev - noise - eq11).abs().max().item() < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# 2. A perfect noise oracle: deterministic samplers must land on x0
# ---------------------------------------------------------------------------------------------------------------

# fp64: with ε-prediction, x̂0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t divides by √ᾱ_{999} = 0.0064 ("linear"), so fp32
# rounding alone reaches ~1e-5; the property is about the schedule arithmetic, not fp32's conditioning.
ORACLE_X0 = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
ORACLE_EPS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


def oracle_output(prediction_type, alpha, sigma):
    """The exact ε, or v = α ε − σ x0, for x_t = α x0 + σ ε."""
    return ORACLE_EPS if prediction_type == "epsilon" else alpha * ORACLE_EPS - sigma * ORACLE_X0


configs = st.fixed_dictionaries(dict(
    prediction_type=st.sampled_from(PREDICTIONS),
    beta_schedule=st.sampled_from(BETAS),
    spacing=st.sampled_from(SPACINGS),
    zero_snr=st.booleans(),
))


@settings(max_examples=100, deadline=None)
@given(config=configs, set_alpha_to_one=st.booleans(), n=st.integers(2, 50))
def test_ddim_with_a_noise_oracle_recovers_x0(config, set_alpha_to_one, n):
    scheduler = OursDDIMScheduler(**base_config(**config), clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(n)
    assume(not (config["zero_snr"] and config["prediction_type"] == "epsilon" and T - 1 in scheduler.timesteps))
    abar = scheduler.alphas_cumprod.double()
    x = scheduler.add_noise(ORACLE_X0, ORACLE_EPS, scheduler.timesteps[:1])
    for t in scheduler.timesteps:
        out = scheduler.step(oracle_output(config["prediction_type"], abar[t].sqrt(), (1 - abar[t]).sqrt()), t, x)
        assert (out.pred_original_sample - ORACLE_X0).abs().max().item() <= TOL
        x = out.prev_sample
    # The last step lands on ᾱ = 1 (x0 itself) or on ᾱ_0 (x0 with the least noise of training).
    expected = ORACLE_X0 if set_alpha_to_one else scheduler.add_noise(ORACLE_X0, ORACLE_EPS, torch.tensor([0]))
    assert (x - expected).abs().max().item() <= TOL


def test_the_oracle_catches_diffusers_ddim_off_grid_step():
    """Why linspace DDIM is not compared with diffusers: its t − T//n step misses the next grid point (#12633).

    If this fails, diffusers has fixed it, and the DDIM skips above can compare with it directly.
    """
    config = dict(timestep_spacing="linspace", clip_sample=False, beta_schedule="scaled_linear",
                  beta_start=0.00085, beta_end=0.012)
    errors = []
    for scheduler in (OursDDIMScheduler(**config), diffusers.DDIMScheduler(**config)):
        scheduler.set_timesteps(10)
        x = scheduler.add_noise(ORACLE_X0, ORACLE_EPS, scheduler.timesteps[:1])
        for t in scheduler.timesteps:
            x = scheduler.step(ORACLE_EPS, t, x).prev_sample
        errors.append((x - ORACLE_X0).abs().max().item())
    assert errors[0] <= TOL < 1e-2 < errors[1]


@settings(max_examples=60, deadline=None)
@given(config=configs, karras=st.booleans(), n=st.integers(2, 50))
def test_dpmpp_2m_with_a_noise_oracle_recovers_x0(config, karras, n):
    """With x̂0 exact at every step the second-order correction vanishes and each step is exact."""
    scheduler = OursDPMSolverPP2MScheduler(**base_config(**config), use_karras_sigmas=karras)
    scheduler.set_timesteps(n)
    alphas = 1 / (scheduler.sigmas.double() ** 2 + 1).sqrt()  # the grid's own α_t, σ_t (Karras: off the table)
    sigmas = scheduler.sigmas.double() * alphas
    x = scheduler.add_noise(ORACLE_X0, ORACLE_EPS, scheduler.timesteps[:1])
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(oracle_output(config["prediction_type"], alphas[i], sigmas[i]), t, x).prev_sample
    assert (x - ORACLE_X0).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------------------------
# 3. Forward process, config, pipelines
# ---------------------------------------------------------------------------------------------------------------

CLASSES = [OursDDPMScheduler, OursDDIMScheduler, OursDPMSolverPP2MScheduler]
REFERENCE = {OursDDPMScheduler: diffusers.DDPMScheduler, OursDDIMScheduler: diffusers.DDIMScheduler,
             OursDPMSolverPP2MScheduler: diffusers.DPMSolverMultistepScheduler}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("zero_snr", ZERO_SNR)
def test_add_noise_is_the_forward_process(cls, zero_snr):
    config = base_config("v_prediction", "scaled_linear", ("leading", 1), zero_snr)
    scheduler = cls(**config)
    betas = diffusers.DDPMScheduler(**config).betas  # an independent ᾱ table (fp32 products, as trained)
    abar = torch.cumprod(1 - betas, dim=0).double()
    if cls is OursDPMSolverPP2MScheduler and zero_snr:
        abar[-1] = 2.0**-24
    timesteps = torch.tensor([0, 999])
    x0, eps = X_T, torch.randn(X_T.shape, generator=torch.Generator().manual_seed(2))
    expected = abar[timesteps].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[timesteps]).sqrt().view(-1, 1, 1, 1) * eps
    assert (scheduler.add_noise(x0, eps, timesteps) - expected).abs().max().item() <= 1e-6
    v = scheduler.get_velocity(x0, eps, timesteps)
    assert (v - (abar[timesteps].sqrt().view(-1, 1, 1, 1) * eps
                 - (1 - abar[timesteps]).sqrt().view(-1, 1, 1, 1) * x0)).abs().max().item() <= 1e-6
    scheduler.set_timesteps(10)  # on a non-Karras grid the grid's noise level is the table's
    assert (scheduler.add_noise(x0, eps, timesteps) - expected).abs().max().item() <= 1e-6


def test_dpmpp_add_noise_on_a_karras_grid_uses_the_grid_sigma():
    """img2img noises to timesteps[i]; the solver then assumes σ_i, which Karras puts off the ᾱ table."""
    ours, reference = OursDPMSolverPP2MScheduler(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler(
        use_karras_sigmas=True)
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    eps = torch.randn(X_T.shape, generator=torch.Generator().manual_seed(2))
    t = ours.timesteps[3:4]
    assert (ours.add_noise(X_T, eps, t) - reference.add_noise(X_T, eps, t)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("cls", CLASSES)
def test_config_defaults_are_diffusers_defaults(cls):
    ours, reference = cls().config, REFERENCE[cls]().config
    shared = [k for k in ours if not k.startswith("_")]
    assert all(k in reference for k in shared), [k for k in shared if k not in reference]
    assert {k: ours[k] for k in shared} == {k: reference[k] for k in shared}


@pytest.mark.parametrize("cls", CLASSES)
def test_config_round_trip(cls, tmp_path):
    extra = {OursDDPMScheduler: dict(variance_type="fixed_large", clip_sample=False),
             OursDDIMScheduler: dict(set_alpha_to_one=False, clip_sample=False),
             OursDPMSolverPP2MScheduler: dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")}[cls]
    config = dict(base_config("v_prediction", "scaled_linear", ("trailing", 0), True), **extra)
    scheduler = cls(**config)
    scheduler.save_config(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = cls.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config) and public(scheduler.config).items() >= config.items()
    # A diffusers config maps over (unknown keys ignored), and ours maps back onto diffusers' class.
    assert public(cls.from_config(REFERENCE[cls](**config).config).config) == public(scheduler.config)
    assert public(REFERENCE[cls].from_config(scheduler.config).config).items() >= public(scheduler.config).items()
    for s in (scheduler, loaded):
        s.set_timesteps(8)
    assert torch.equal(scheduler.timesteps, loaded.timesteps) and len(loaded) == T


@pytest.mark.parametrize("cls,key,value", [
    (OursDDPMScheduler, "beta_schedule", "squaredcos_cap_v2"),
    (OursDDPMScheduler, "variance_type", "learned"),
    (OursDDIMScheduler, "prediction_type", "sample"),
    (OursDDIMScheduler, "timestep_spacing", "karras"),
    (OursDPMSolverPP2MScheduler, "solver_order", 3),
    (OursDPMSolverPP2MScheduler, "final_sigmas_type", "denoised"),
])
def test_unsupported_config_is_a_clear_error(cls, key, value):
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


def test_grid_outside_training_range_is_a_clear_error():
    with pytest.raises(ValueError, match="steps_offset"):
        OursDDIMScheduler(steps_offset=1).set_timesteps(T)  # leading: 1..1000, and t = 1000 does not exist
    assert spaced_timesteps("trailing", T, 61).tolist()[-1] == 15  # not diffusers' extra t = -1


# Tiny SD pipelines: (kind, our class, config overrides, pipeline kwargs).
PIPELINE_CASES = [
    ("sd15", OursDDPMScheduler, {}, {}),
    ("sd15", OursDDIMScheduler, {}, {}),
    ("sd15", OursDDIMScheduler, {}, {"eta": 1.0}),
    ("sd15", OursDPMSolverPP2MScheduler, {}, {}),
    ("sd15", OursDPMSolverPP2MScheduler, {"use_karras_sigmas": True}, {}),
    ("sd2v", OursDDPMScheduler, {}, {}),
    ("sd2v", OursDDIMScheduler, {}, {}),
    ("sd2v", OursDPMSolverPP2MScheduler, {}, {}),
    ("sd2v", OursDPMSolverPP2MScheduler, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
]


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("sampling_ours")
    pipes = {}
    for kind in ("sd15", "sd2v"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(build_tiny_sd(kind, root / kind))
        pipe.set_progress_bar_config(disable=True)
        pipes[kind] = (pipe, pipe.scheduler.config)  # the model's own (PNDM / Euler) scheduler config
    return pipes


def run_pipe(pipe, scheduler, **kw):
    pipe.scheduler = scheduler
    threads = torch.get_num_threads()
    # 64-px tiny models gain nothing from threads, and on a busy 2-core box OpenMP's spinning makes a 0.05 s
    # call take 13 s.
    torch.set_num_threads(1)
    try:
        return pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind,cls,overrides,call_kwargs", PIPELINE_CASES)
def test_stable_diffusion_pipeline_runs_ours_like_diffusers(tiny_pipes, kind, cls, overrides, call_kwargs):
    pipe, model_config = tiny_pipes[kind]
    ours = cls.from_config(model_config, **overrides)
    reference = REFERENCE[cls].from_config(model_config, **overrides)
    if cls is OursDPMSolverPP2MScheduler:
        assert reference.config.algorithm_type == "dpmsolver++" and reference.config.solver_order == 2
    else:
        fp64_coefficients(reference)
    images = run_pipe(pipe, ours, **call_kwargs)
    expected = run_pipe(pipe, reference, **call_kwargs)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert np.abs(images - expected).max() <= TOL
