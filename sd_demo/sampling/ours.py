"""The project's own DDPM, DDIM and DPM-Solver++(2M) schedulers, written from the papers.

Why by hand rather than diffusers' classes (DESIGN rule 8): the project keeps samplers whose every line maps to
an equation of the papers, with the schedule math the three share in one base class. They follow the diffusers
scheduler protocol (ConfigMixin/SchedulerMixin, set_timesteps, scale_model_input, step, add_noise) and take
diffusers' config keys and defaults, so any SD/SDXL pipeline runs them and a model's scheduler_config.json maps
over. They match diffusers to ~1e-6 in fp32 (tests/test_sampling_ours.py), except where diffusers is wrong:
  - DDIM steps to the next grid point; diffusers' DDIM steps to t − T//n, off the grid for "linspace" and for
    "trailing" when n does not divide T (diffusers #12633).
  - "trailing" spacing always gives n timesteps; diffusers' float arange gives n+1, the last t = -1, for some n.
  - DDIM at eta > 0 from t = T-1 at zero SNR: diffusers takes √ of a rounding-negative 0 and NaNs (#5969).
  - Scalar ᾱ arithmetic is fp64: diffusers' fp32 1 − ᾱ_t/ᾱ_{t-1} cancels on a last step to ᾱ_0 (2.4e-5 at eta=1).
  - A "leading" grid that steps_offset pushes to t = T is refused rather than run.

Notation. Timesteps are 0-based, t ∈ [0, T) as in diffusers (the papers' t is ours + 1); T = num_train_timesteps.
  betas          β_t                 forward noise of step t (Ho et al. 2020, eq. 2)
  alphas         α_t = 1 − β_t
  alphas_cumprod ᾱ_t = Π_{s≤t} α_s   (written α_t in the DDIM paper)
  forward        x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                (Ho et al. eq. 4, reparametrised)
  v-prediction   v = √ᾱ_t ε − √(1−ᾱ_t) x0                  (Salimans & Ho 2022, sec. 4)
  DPM-Solver     α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log(α_t/σ_t) (Lu et al. 2022)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass
class OursSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # x_{t-1}: the next model input, (B, C, H, W)
    pred_original_sample: torch.Tensor | None = None  # x̂0 at this step, for previews


def _check(value, allowed, key: str):
    if value not in allowed:
        raise ValueError(f"{key}: '{value}' is not supported; choose one of {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------------------------
# Schedule math shared by the three schedulers
# ---------------------------------------------------------------------------------------------------------------


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> torch.Tensor:
    """β_t for t = 0..T-1, float32 like diffusers so the ᾱ tables agree to the bit."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    _check(beta_schedule, BETA_SCHEDULES, "beta_schedule")
    if beta_schedule == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    # Latent diffusion's schedule: linear in √β.
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T-1} = 0 (SNR 0) and √ᾱ_0 is unchanged."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """n descending int64 timesteps in [0, T) (Lin et al. 2023, Table 2).

    leading:  k·i + steps_offset, k = T // n   (never reaches t = T-1, the noisiest step)
    trailing: round(T − i·T/n) − 1             (starts at t = T-1)
    linspace: round(i·(T−1)/(n−1))             (both ends)
    """
    T = num_train_timesteps
    if spacing == "leading":
        t = (np.arange(n) * (T // n) + steps_offset)[::-1]
    elif spacing == "trailing":
        # The table's arange(T, 0, -T/n). Its float rounding sometimes yields n+1 points (n = 61, 103, ...), the
        # extra one being t = -1; diffusers keeps it, we keep the n that were asked for.
        t = np.round(np.arange(T, 0, -T / n))[:n] - 1
    else:
        _check(spacing, TIMESTEP_SPACINGS, "timestep_spacing")
        t = np.linspace(0, T - 1, n).round()[::-1]
    return t.astype(np.int64)


def predict_x0_eps(model_output, x_t, alpha: float, sigma: float, prediction_type: str):
    """(x̂0, ε̂) from the network output at a noise level with x_t = α x0 + σ ε (α = √ᾱ_t, σ = √(1−ᾱ_t)).

    epsilon:      x̂0 = (x_t − σ ε_θ) / α                    (Ho et al. eq. 15; Song et al. eq. 9)
    v_prediction: x̂0 = α x_t − σ v_θ,  ε̂ = α v_θ + σ x_t    (Salimans & Ho 2022; uses α² + σ² = 1)
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    raise ValueError(f"prediction_type: '{prediction_type}' is not supported; choose one of {PREDICTION_TYPES}")


def _vector(values, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample coefficients -> (B, 1, 1, ...) so they broadcast over the sample's other dims."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class _DiscreteVP(SchedulerMixin, ConfigMixin):
    """What the three schedulers share: ᾱ_t table, timestep grid, forward process, protocol no-ops.

    The grid is a list of training timesteps; a step from grid point t goes to the next grid point ("previous" in
    diffusion time), or past the end. DDPM and DDIM both look that point up in the grid. diffusers' DDIMScheduler
    instead steps to t − T // n, which is the next grid point only for "leading" spacing and for "trailing" when n
    divides T (diffusers issues #9261, #11347, #12633).
    """

    config_name = "scheduler_config.json"
    order = 1  # model evaluations per step(); pipelines use it for progress bookkeeping
    init_noise_sigma = 1.0  # x_T ~ N(0, I) in the variance-preserving parametrisation

    def _init_schedule(self):
        c = self.config
        _check(c.prediction_type, PREDICTION_TYPES, "prediction_type")
        _check(c.timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")
        betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        if c.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t, (T,)
        self.num_inference_steps = None
        self._set_grid(np.arange(c.num_train_timesteps, dtype=np.int64)[::-1])  # until set_timesteps: all of them

    def _set_grid(self, timesteps: np.ndarray, device=None):
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        grid = timesteps.tolist()  # host copy: step() never syncs with the device to find its place
        self._prev = {}
        for i, t in enumerate(grid):
            self._prev.setdefault(t, grid[i + 1] if i + 1 < len(grid) else -1)

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = num_inference_steps
        self._set_grid(self._spaced(num_inference_steps), device)

    def _spaced(self, n: int) -> np.ndarray:
        T = self.config.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps: {n} must be between 1 and num_train_timesteps ({T})")
        t = spaced_timesteps(self.config.timestep_spacing, T, n, self.config.steps_offset)
        if t.max() >= T or t.min() < 0:
            raise ValueError(f"num_inference_steps: {n} with steps_offset={self.config.steps_offset} puts timestep "
                             f"{t.max()} outside [0, {T}); use fewer steps or 'trailing' spacing")
        return t

    def _prev_timestep(self, t: int) -> int:
        """The grid point after t; -1 past the last (the clean end)."""
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not on this scheduler's grid; call set_timesteps first")
        return self._prev[t]

    def _abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # VP models take x_t as it is; only VE-parametrised schedulers rescale here

    def _alpha_sigma(self, timesteps, like: torch.Tensor):
        """(√ᾱ_t, √(1−ᾱ_t)) per sample, shaped to broadcast against `like`."""
        t = torch.as_tensor(timesteps, device=self.alphas_cumprod.device).long().flatten()
        abar = _vector(self.alphas_cumprod[t], like)
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x_t ~ q(x_t | x0): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (Ho et al. eq. 4), one t per sample."""
        alpha, sigma = self._alpha_sigma(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample, noise, timesteps) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022)."""
        alpha, sigma = self._alpha_sigma(timesteps, sample)
        return alpha * noise - sigma * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _work(sample: torch.Tensor) -> torch.dtype:
    # Steps run in at least fp32: with fp16 latents, x̂0 = (x_t − σ ε)/α at high t would lose most of its digits.
    return torch.promote_types(sample.dtype, torch.float32)


def _output(prev, x0, dtype, return_dict: bool):
    prev, x0 = prev.to(dtype), x0.to(dtype)
    return OursSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


# ---------------------------------------------------------------------------------------------------------------
# DDPM: ancestral sampling (Ho et al. 2020, Algorithm 2)
# ---------------------------------------------------------------------------------------------------------------


def ddpm_posterior(x_t, x0, abar_t: float, abar_prev: float):
    """q(x_{t-1} | x_t, x0) = N(μ̃, β̃ I) (Ho et al. eq. 6-7); returns (μ̃, β̃, β_t).

    On a strided grid the step's α_t = ᾱ_t / ᾱ_{t-1} and β_t = 1 − α_t. Then
      μ̃ = √ᾱ_{t-1} β_t / (1−ᾱ_t) · x0 + √α_t (1−ᾱ_{t-1}) / (1−ᾱ_t) · x_t,   β̃ = (1−ᾱ_{t-1}) / (1−ᾱ_t) · β_t.
    With x0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t this μ̃ is eq. 11, 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε): the same mean. The x0
    form is used because it lets x̂0 be clipped and stays finite at zero terminal SNR, where α_T = 0.
    """
    alpha_t = abar_t / abar_prev
    beta_t = 1.0 - alpha_t
    mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (
        math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x_t
    return mean, (1 - abar_prev) / (1 - abar_t) * beta_t, beta_t


def ddpm_std(variance_type: str, beta_tilde: float, beta_t: float) -> float:
    """σ_t of the reverse step: √β̃_t ("fixed_small") or √β_t ("fixed_large"), Ho et al. sec. 3.2."""
    if variance_type == "fixed_large":
        return math.sqrt(beta_t)
    beta_tilde = max(beta_tilde, 1e-20)  # β̃ = 0 on a last step that lands on ᾱ = 1; the log needs it > 0
    if variance_type == "fixed_small_log":  # the same σ, taken through the log-variance
        return math.exp(0.5 * math.log(beta_tilde))
    return math.sqrt(beta_tilde)


class OursDDPMScheduler(_DiscreteVP):
    """DDPM ancestral sampler; on a grid of n < T steps each step is the posterior between two grid points."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,  # clamp x̂0 to ±clip_sample_range (pixel-space models; SD configs turn it off)
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        # None is what non-DDPM configs carry (e.g. DPM-Solver's); it means the default.
        self.variance_type = variance_type or "fixed_small"
        _check(self.variance_type, VARIANCE_TYPES, "variance_type")
        self._init_schedule()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        t = int(timestep)
        t_prev = self._prev_timestep(t)
        abar_t, abar_prev = self._abar(t), (self._abar(t_prev) if t_prev >= 0 else 1.0)
        x_t = sample.to(_work(sample))
        x0, _ = predict_x0_eps(model_output.to(x_t.dtype), x_t, math.sqrt(abar_t), math.sqrt(1 - abar_t),
                               self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean, beta_tilde, beta_t = ddpm_posterior(x_t, x0, abar_t, abar_prev)
        x_prev = mean
        if t > 0:  # Algorithm 2: z = 0 only at the data end (paper's t = 1), not at the grid's last point
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            x_prev = mean + ddpm_std(self.variance_type, beta_tilde, beta_t) * z.to(x_t.dtype)
        return _output(x_prev, x0, sample.dtype, return_dict)


# ---------------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2020)
# ---------------------------------------------------------------------------------------------------------------


def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """σ_t(η) = η √((1−ᾱ_{t-1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t-1}) (Song et al. eq. 16); η = 1 is DDPM's √β̃_t."""
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))


def ddim_update(x0, eps, abar_prev: float, sigma: float, noise=None):
    """x_{t-1} = √ᾱ_{t-1} x̂0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z (Song et al. eq. 12)."""
    # max(): from ᾱ_t = 0 (zero SNR) at η = 1 the root's argument is exactly 0, and rounding below 0 would NaN.
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    return x if noise is None else x + sigma * noise


class OursDDIMScheduler(_DiscreteVP):
    """DDIM: deterministic at eta = 0, DDPM-like at eta = 1 (eta is a step() argument, as in diffusers)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,  # last step lands on ᾱ = 1 (x0); False: on ᾱ_0, as SD 1.x ships
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_schedule()
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._abar(0)

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict=True):
        t = int(timestep)
        t_prev = self._prev_timestep(t)
        abar_t = self._abar(t)
        abar_prev = self._abar(t_prev) if t_prev >= 0 else self.final_alpha_cumprod
        x_t = sample.to(_work(sample))
        x0, eps = predict_x0_eps(model_output.to(x_t.dtype), x_t, math.sqrt(abar_t), math.sqrt(1 - abar_t),
                                 self.config.prediction_type)
        if self.config.clip_sample:  # ε̂ stays the model's (diffusers' use_clipped_model_output=False)
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        sigma = ddim_sigma(abar_t, abar_prev, eta)
        noise = None
        if eta > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype).to(x_t.dtype)
        return _output(ddim_update(x0, eps, abar_prev, sigma, noise), x0, sample.dtype, return_dict)


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)
# ---------------------------------------------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..n−1 (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, sigma_table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each σ: piecewise-linear in log σ over the table (σ grows with t)."""
    # At zero SNR the pin ᾱ_{T-1} = 2^-24 sits above ᾱ of the few steps before it, so σ_{T-1} < σ_{T-2}; the
    # interpolation needs an increasing table, and leaving the pinned entry out is what diffusers' search amounts to.
    keep = len(sigma_table) - 1 if sigma_table[-1] < sigma_table[-2] else len(sigma_table)
    return np.interp(np.log(sigmas), np.log(sigma_table[:keep]), np.arange(keep))


def dpmpp_2m_update(x, x0, x0_prev, alpha_t: float, sigma_s: float, sigma_t: float, h: float, h_prev=None):
    """One step s -> t of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), h = λ_t − λ_s.

    x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D, with D = x̂0_s on a first-order step (= DDIM), else
    D = (1 + 1/(2r)) x̂0_s − 1/(2r) x̂0_prev, r = h_prev / h (the previous step's h).
    """
    d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
    return (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d


class OursDPMSolverPP2MScheduler(_DiscreteVP):
    """DPM-Solver++(2M): multistep second order in the data prediction x̂0, stepping in λ (half log-SNR).

    The grid is kept as VE sigmas σ = √((1−ᾱ)/ᾱ) = σ_t/α_t (so Karras' schedule applies), n of them plus a final
    one: 0 ("zero": end on x0) or σ at t = 0 ("sigma_min").
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        lower_order_final: bool = True,  # first-order last step when n < 15: second order is unstable there
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check(solver_order, (1, 2), "solver_order")
        _check(final_sigmas_type, FINAL_SIGMAS_TYPES, "final_sigmas_type")
        self._init_schedule()
        if rescale_betas_zero_snr:
            # λ_{T-1} = log(α/σ) = −∞ at zero SNR and the solver steps in λ: pin ᾱ_{T-1} to 2^-24 (fp16's smallest
            # subnormal, as diffusers does) so every step has a finite h.
            self.alphas_cumprod[-1] = 2.0**-24
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Img2img pipelines start part-way down the grid; they say where before the first step."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device=None):
        n = num_inference_steps
        if self.config.timestep_spacing != "trailing" and not self.config.use_karras_sigmas and n >= len(self):
            raise ValueError(f"num_inference_steps: {n} must be below num_train_timesteps ({len(self)}) with "
                             f"'{self.config.timestep_spacing}' spacing")
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().numpy()  # σ(t), (T,) ascending
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
            timesteps = np.round(sigma_to_t(sigmas, table)).astype(np.int64)
        else:
            # Except for "trailing", the grid is spaced for n+1 points and drops the last: the final step goes to
            # the final σ below rather than to a model evaluation at t ≈ 0.
            timesteps = self._spaced(n) if self.config.timestep_spacing == "trailing" else self._spaced(n + 1)[:-1]
            sigmas = table[timesteps]
        final = float(table[0]) if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sigmas, final).astype(np.float32))  # (n+1,)
        s = self.sigmas.double().numpy()
        alpha = 1 / np.sqrt(s**2 + 1)  # α_t = √ᾱ_t
        self._vp = np.stack([alpha, s * alpha], axis=1)  # (n+1, 2): (α_t, σ_t) per grid point
        with np.errstate(divide="ignore"):
            self._lambda = np.log(alpha) - np.log(s * alpha)  # λ_t, +inf at a final σ of 0
        self.num_inference_steps = n
        self._set_grid(timesteps, device)
        self._index = {}
        for i, t in enumerate(timesteps.tolist()):
            self._index.setdefault(t, i)
        self._x0_prev = self._h_prev = None
        self._step_index = self._begin_index = None

    def _first_order(self, i: int) -> bool:
        n = self.num_inference_steps
        # Into a final σ of 0, λ = ∞ and r = h_prev/h = 0: only the first-order step is defined there.
        last = i == n - 1 and (self.config.final_sigmas_type == "zero" or (self.config.lower_order_final and n < 15))
        return self.config.solver_order == 1 or self._x0_prev is None or last

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.sigmas is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            if self._begin_index is None and int(timestep) not in self._index:
                raise ValueError(f"timestep {int(timestep)} is not on this scheduler's grid")
            self._step_index = self._index[int(timestep)] if self._begin_index is None else self._begin_index
        i = self._step_index
        x = sample.to(_work(sample))
        alpha_s, sigma_s, alpha_t, sigma_t = (float(v) for v in (*self._vp[i], *self._vp[i + 1]))
        x0, _ = predict_x0_eps(model_output.to(x.dtype), x, alpha_s, sigma_s, self.config.prediction_type)
        h = float(self._lambda[i + 1] - self._lambda[i])
        x0_prev = None if self._first_order(i) else self._x0_prev
        x_next = dpmpp_2m_update(x, x0, x0_prev, alpha_t, sigma_s, sigma_t, h, self._h_prev)
        self._x0_prev, self._h_prev = x0, h
        self._step_index += 1
        return _output(x_next, x0, sample.dtype, return_dict)

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """Forward process; a timestep of the current grid gets that step's (α, σ).

        Under Karras sigmas a grid σ is not σ(ᾱ_t) of its rounded t, and img2img must start on the σ the solver
        assumes. Off the grid (or before set_timesteps) this is √ᾱ_t x0 + √(1−ᾱ_t) ε.
        """
        ts = torch.as_tensor(timesteps).flatten().tolist()
        if self.sigmas is None or not all(int(t) in self._index for t in ts):
            return super().add_noise(original_samples, noise, timesteps)
        idx = [self._index[int(t)] for t in ts]
        alpha, sigma = (_vector(torch.from_numpy(v.copy()), original_samples) for v in self._vp[idx].T)
        return alpha * original_samples + sigma * noise
