"""A1111 sampler names -> diffusers scheduler configs, derived from the loaded model's own scheduler config.

Deriving from the model's config keeps what the model was trained with (prediction_type, beta schedule,
timestep_spacing, steps_offset); the sampler only chooses the solver. "Schedule type" is A1111's separate choice
of noise schedule (Karras, Exponential, ...), applied where the scheduler class supports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import diffusers

from .dpmpp_2s_ancestral import DPMSolverPP2SAncestralScheduler
from .ours import OursDDIMScheduler, OursDDPMScheduler, OursDPMSolverPP2MScheduler

# Scheduler classes written in this project (diffusers has no equivalent, or we offer our own from the math).
OUR_CLASSES = {
    c.__name__: c
    for c in [DPMSolverPP2SAncestralScheduler, OursDDPMScheduler, OursDDIMScheduler, OursDPMSolverPP2MScheduler]
}


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111 spelling, written to infotext
    cls: str  # diffusers class name
    overrides: dict = field(default_factory=dict)
    default_schedule: str = "Automatic"  # what A1111's "Automatic" means for this sampler
    ours: bool = False  # implemented in sd_demo.sampling rather than diffusers


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras"),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "Karras"),
        Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "Karras"),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras"),
        Sampler("DPM++ 2S a", "DPMSolverPP2SAncestralScheduler", {}, "Karras", ours=True),
        Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("Euler", "EulerDiscreteScheduler"),
        Sampler("Heun", "HeunDiscreteScheduler"),
        Sampler("LMS", "LMSDiscreteScheduler"),
        Sampler("DPM2", "KDPM2DiscreteScheduler", {}, "Karras"),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras"),
        Sampler("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}),
        Sampler("DDPM", "DDPMScheduler"),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        Sampler("UniPC", "UniPCMultistepScheduler"),
        Sampler("LCM", "LCMScheduler"),
        Sampler("TCD", "TCDScheduler"),
        Sampler("DPM++ 2M (ours)", "OursDPMSolverPP2MScheduler", {"solver_order": 2}, "Karras", ours=True),
        Sampler("DDIM (ours)", "OursDDIMScheduler", {"set_alpha_to_one": False}, ours=True),
        Sampler("DDPM (ours)", "OursDDPMScheduler", {}, ours=True),
    ]
}
DEFAULT_SAMPLER = "DPM++ 2M"

# A1111 "Schedule type" -> scheduler config keys (Automatic: the sampler's own default).
SCHEDULES: dict[str, dict] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
# Keys that select a sigma schedule; a derived config starts with all of them off.
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def resolve_schedule(sampler: str, schedule: str) -> str:
    """The concrete schedule name written to infotext ('Automatic' -> the sampler's default)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: unknown '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    return SAMPLERS[sampler].default_schedule if schedule == "Automatic" else schedule


def _init_keys(cls) -> set[str]:
    return set(cls._get_init_keys(cls)) if hasattr(cls, "_get_init_keys") else set()


def make_scheduler(sampler: str, schedule: str, base_config: dict):
    """Build the scheduler for (sampler, schedule) from the model's scheduler config; refuse unsupported pairs."""
    resolved = resolve_schedule(sampler, schedule)
    spec = SAMPLERS[sampler]
    cls = OUR_CLASSES.get(spec.cls) or getattr(diffusers, spec.cls)
    keys = _init_keys(cls)
    wanted = SCHEDULES[resolved]
    unsupported = [k for k in wanted if k not in keys]
    if unsupported:
        raise ValueError(f"schedule: '{resolved}' is not available for sampler '{sampler}'; choose Automatic or Uniform")
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update({k: False for k in _SIGMA_KEYS if k in keys})
    if "clip_sample" in keys and "clip_sample" not in config:
        # DDIM/DDPM default to clipping x0 to [-1, 1], which is for pixels: latents often exceed it, and a model
        # whose scheduler config never names the key (an Euler or DPM++ config) would get grey smudges.
        config["clip_sample"] = False
    config.update(spec.overrides)
    config.update(wanted)
    return cls.from_config(config)
