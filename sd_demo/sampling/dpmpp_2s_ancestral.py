"""DPM++ 2S a: A1111's "DPM++ 2S a" sampler as a diffusers scheduler (diffusers has no ancestral DPM++ 2S).

Written from DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 1, the single-step second-order solver in
data-prediction form) with the ancestral noise split of Karras et al. 2022 (EDM), as k-diffusion's
``sample_dpmpp_2s_ancestral`` runs it. Variables, in σ-space (x_σ = x₀ + σ·ε, σ = √((1 − ᾱ_t)/ᾱ_t)):

    σ_i, σ_{i+1}      consecutive noise levels of the schedule
    σ_↓, σ_↑          the deterministic target and the re-injected noise, σ_↓² + σ_↑² = σ_{i+1}² (η scales σ_↑)
    λ = −log σ        half-log-SNR; h = λ(σ_↓) − λ(σ_i); the midpoint s has λ_s = λ_i + h/2, i.e. σ_s = √(σ_i σ_↓)
    D(x, σ)           the denoised estimate x̂₀ from the UNet output (ε or v)

One step = two UNet calls: at σ_i, then at the midpoint σ_s (the last step, σ_↓ = 0, is a single Euler call):

    u   = (σ_s/σ_i) x_i − (e^{−h/2} − 1) D(x_i, σ_i)
    x'  = (σ_↓/σ_i) x_i − (e^{−h} − 1) D(u, σ_s)
    x_{i+1} = x' + σ_↑ z,  z ~ N(0, I)

The diffusers pipeline drives it like Heun: ``timesteps`` interleaves [t(σ_0), t(σ_s0), t(σ_1), t(σ_s1), ...].
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

from .ours import karras_sigmas, make_betas, sigma_to_t


@dataclass
class AncestralStepOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DPMSolverPP2SAncestralScheduler(SchedulerMixin, ConfigMixin):
    """DPM++ 2S ancestral (ours); ε- and v-prediction, leading/trailing/linspace spacing, optional Karras σ."""

    order = 2
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        eta: float = 1.0,  # scale of the re-injected noise σ_↑; 0 gives the deterministic DPM++ 2S
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type '{prediction_type}' is not supported (use epsilon or v_prediction)")
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas).double().numpy()
        acp = np.cumprod(1.0 - betas)  # ᾱ_t = Π_{s≤t} (1 − β_s)
        self.train_sigmas = np.sqrt((1 - acp) / acp)  # σ(t) for t = 0 … T−1, increasing
        self.log_train_sigmas = np.log(self.train_sigmas)
        self.alphas_cumprod = torch.from_numpy(acp).float()
        self.num_inference_steps = None
        self.init_noise_sigma = float(self.train_sigmas[-1])
        self._plan: list[tuple[float, float, int]] = []  # per model call: (σ for scale_model_input, timestep, i)
        self._step_index = None

    # -------------------------------------------------------------------------------------------------- schedule
    def _spaced_timesteps(self, n: int) -> np.ndarray:
        # Not ours.spaced_timesteps: σ-space samplers (Euler family, k-diffusion) keep "linspace" unrounded.
        cfg, T = self.config, self.config.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n)[::-1].copy()
        if cfg.timestep_spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + cfg.steps_offset
        if cfg.timestep_spacing == "trailing":
            return np.round(np.arange(T, 0, -T / n)) - 1.0
        raise ValueError(f"timestep_spacing '{cfg.timestep_spacing}' is not supported")

    def _sigma_of_t(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, np.arange(len(self.train_sigmas)), self.train_sigmas)

    def _t_of_sigma(self, sigma: float) -> float:
        return float(sigma_to_t(np.array([sigma]), self.train_sigmas)[0])  # log-σ interpolation, shared with ours

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = num_inference_steps
        sigmas = self._sigma_of_t(self._spaced_timesteps(num_inference_steps))
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
        sigmas = np.append(sigmas, 0.0)  # (n + 1,)
        self.sigmas = torch.from_numpy(sigmas).float()
        self._sigmas = sigmas.tolist()
        self._plan = []
        for i in range(num_inference_steps):
            s = self._sigmas[i]
            self._plan.append((s, self._t_of_sigma(s), i))
            down, _ = self._ancestral(s, self._sigmas[i + 1])
            if down > 0:  # the midpoint call; the final step (σ_↓ = 0) has none
                mid = math.sqrt(s * down)
                self._plan.append((mid, self._t_of_sigma(mid), i))
        self.timesteps = torch.tensor([t for _, t, _ in self._plan], dtype=torch.float32, device=device)
        self.init_noise_sigma = float(sigmas[0])
        self._step_index = None
        self._first = None  # (x_i, σ_i, σ_↓, σ_↑, h) kept between the two calls of one step

    def _ancestral(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        """(σ_↓, σ_↑): split σ_{i+1} into a deterministic part and fresh noise (EDM's ancestral step)."""
        if sigma_next == 0:
            return 0.0, 0.0
        eta = self.config.eta
        up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        return math.sqrt(sigma_next**2 - up**2), up

    # -------------------------------------------------------------------------------------------------- protocol
    def _index(self) -> int:
        return 0 if self._step_index is None else self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        sigma = self._plan[self._index()][0]
        return sample / math.sqrt(sigma**2 + 1)  # the UNet sees the variance-preserving x_t = x_σ / √(σ² + 1)

    def _denoised(self, model_output, sample, sigma: float) -> torch.Tensor:
        """D(x, σ): x̂₀ from ε (x − σε) or from v (VP-space v, rescaled to σ-space)."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        i = self._index()
        sigma, _, k = self._plan[i]
        denoised = self._denoised(model_output.float(), sample.float(), sigma)
        if self._first is None:  # first call of step k, at σ_k
            down, up = self._ancestral(sigma, self._sigmas[k + 1])
            if down == 0:  # last step: Euler to σ = 0 lands on x̂₀
                prev = denoised
            else:
                h = math.log(sigma / down)
                self._first = (sample.float(), denoised, sigma, down, up, h)
                mid = math.sqrt(sigma * down)
                prev = (mid / sigma) * sample.float() - math.expm1(-h / 2) * denoised  # u
        else:  # second call, at the midpoint σ_s
            x, _, s_i, down, up, h = self._first
            self._first = None
            prev = (down / s_i) * x - math.expm1(-h) * denoised
            if up > 0:
                noise = randn_tensor(prev.shape, generator=generator, device=prev.device, dtype=prev.dtype)
                prev = prev + noise * up
        self._step_index = i + 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev, denoised)
        return AncestralStepOutput(prev_sample=prev, pred_original_sample=denoised)

    def add_noise(self, original_samples, noise, timesteps):
        sigma = torch.from_numpy(self._sigma_of_t(np.asarray(timesteps.cpu(), dtype=np.float64))).float()
        return original_samples + noise * sigma.to(original_samples.device).view(-1, *[1] * (noise.ndim - 1))

    def __len__(self):
        return self.config.num_train_timesteps
