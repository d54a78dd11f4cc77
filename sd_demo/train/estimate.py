"""Before a run: will it fit in memory? After its first steps: how long will it take, and what did it peak at?

The memory estimate is a model of the run calibrated on measured peaks (BENCHMARKS.md, H200: SD 1.5 LoRA at
512 px, batch 2: 6.2 GiB in fp16, 9.0 GiB in fp32, 4.5 GiB with gradient checkpointing); it only needs to tell a
run that fits from one that does not, and to name the option that makes it fit. The time estimate is measured.
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import replace

import torch

from .config import TrainConfig

GIB = 2**30
# Activation memory of one 512 px image through SD 1.5's UNet (320 base channels), forward + backward:
# (9.0 GiB fp32 peak - 4.3 GiB weights) / batch 2; half precision stores them in about 0.85 of that.
ACT_512_FP32 = 2.35 * GIB
FAMILY_ACT = {"sd1": 1.0, "sd2": 1.0, "sdxl": 1.9, "embedded": 1.0}  # SDXL's deeper transformer stacks
CHECKPOINTING = 0.6  # measured 4.5 vs 6.2 GiB at batch 2
RUNTIME = 0.4 * GIB  # the Python / torch process itself (CPU runs, where RSS is what counts)
WARMUP_STEPS = 3  # steps measured before the time estimate


def model_bytes(pipe) -> int:
    mods = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    return sum(p.numel() * p.element_size() for m in mods if m is not None for p in m.parameters())


def peak_bytes(cfg: TrainConfig, family: str, pipe, n_trainable: int) -> int:
    """Estimated peak: frozen weights + trained weights with their gradients and AdamW moments + activations."""
    channels = pipe.unet.config.block_out_channels[0] / 320
    act = ACT_512_FP32 * FAMILY_ACT.get(family, 1.0) * channels * (cfg.resolution / 512) ** 2 * cfg.batch
    if cfg.mixed_precision in ("fp16", "bf16") and pipe.device.type != "cpu":
        act *= 0.85
    if cfg.gradient_checkpointing:
        act *= CHECKPOINTING
    streams = 2 if (cfg.num_class_images or cfg.class_data) else 1  # prior preservation doubles the batch
    runtime = RUNTIME if pipe.device.type == "cpu" else 0
    return int(model_bytes(pipe) + 16 * n_trainable + act * streams + runtime)


def available_bytes(device: str) -> int | None:
    """Memory a run may use: the GPU's total, or the CPU's available RAM; None where unknown."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    if device == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    return None


def _fixes(cfg: TrainConfig, device: str) -> list[tuple[str, TrainConfig]]:
    """Options that lower the peak, cheapest first (quality-wise), with the config each gives."""
    out = []
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing", replace(cfg, gradient_checkpointing=True)))
    if device == "cuda" and cfg.mixed_precision == "no":
        out.append(("--mixed-precision bf16", replace(cfg, mixed_precision="bf16")))
    if cfg.batch > 1:
        out.append((f"--batch 1 --grad-accum {cfg.batch * cfg.grad_accum}", replace(cfg, batch=1)))
    low = max(64, (cfg.resolution * 3 // 4) // 64 * 64)
    if low < cfg.resolution:
        out.append((f"--resolution {low}", replace(cfg, resolution=low)))
    return out


def check_fits(cfg: TrainConfig, family: str, pipe, n_trainable: int, device: str) -> str:
    """One line with the estimate; a ValueError naming the option(s) that make it fit when it would not."""
    need = peak_bytes(cfg, family, pipe, n_trainable)
    have = available_bytes(device)
    line = f"memory: about {need / GIB:.1f} GiB estimated" + (f" of {have / GIB:.1f} GiB {device}" if have else "")
    if have is None or need <= 0.9 * have:
        return line
    trial, flags = cfg, []
    while peak_bytes(trial, family, pipe, n_trainable) > 0.9 * have:
        fixes = _fixes(trial, device)
        if not fixes:
            raise ValueError(f"this run needs about {need / GIB:.1f} GiB but {device} has {have / GIB:.1f} GiB, and "
                             "no option makes it fit; use a device with more memory")
        flag, trial = fixes[0]
        flags.append(flag)
    raise ValueError(f"this run needs about {need / GIB:.1f} GiB but {device} has {have / GIB:.1f} GiB; add "
                     f"{' '.join(flags)}")


def measured_peak(device: str) -> int:
    """The peak so far: CUDA's allocator peak, or the process's peak RSS on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def time_line(sec_per_step: float, remaining: int, total: int, device: str) -> str:
    minutes = sec_per_step * remaining / 60
    return (f"estimate: {minutes:.1f} min for the {remaining} remaining of {total} steps ({sec_per_step:.2f} s/step "
            f"over the first {WARMUP_STEPS}); peak memory {measured_peak(device) / GIB:.2f} GiB")
