"""ZeroGPU (Hugging Face Spaces' shared GPUs): a handler runs under ``spaces.GPU`` with a duration computed from its
request, so a visitor with little quota left is not refused for a flat 60 s that a small image never needs.

Outside a ZeroGPU Space (``SPACES_ZERO_GPU`` unset), or without the ``spaces`` package, nothing changes: the handler
is returned as it is. Inside one, the handler runs in a worker process that holds the GPU for the call. The
decorating is the UI's (``sd_demo.ui.generate.on_gpu``: ``spaces`` imports gradio); the durations are here.
"""
from __future__ import annotations

import math
import os

# Seconds per denoising step of one image at the family's native size, fp16, on the H200 slice ZeroGPU lends. An
# assumption with headroom (about 1.5x diffusers' usual A100 throughput: SD 1.x ~20 it/s at 512 px, SD 2.x ~12 it/s at
# 768 px, SDXL ~7 it/s at 1024 px), not measured on a ZeroGPU slice: benchmarks/gpu.py times the same requests on a
# lent GPU and is where these should be checked.
STEP_SECONDS = {"embedded": 0.02, "sd1": 0.075, "sd2": 0.125, "sdxl": 0.22}
NATIVE = {"embedded": 128, "sd1": 512, "sd2": 768, "sdxl": 1024}
OVERHEAD_S = 10  # the worker's start, moving the model to the GPU, text encoding, VAE decode
MIN_S, MAX_S = 15, 300  # ZeroGPU's own floor and its longest slot for a signed-in visitor's call


# A training job trains in slices of one GPU call each (sd_demo.train.jobs.run_slice): the call asks for SLICE_S, of
# which the last SLICE_END_S are kept for the checkpoint after the step in flight (loading the model and caching the
# data fall inside the slice, so a longer slice wastes less of the visitor's quota on them).
SLICE_S, SLICE_END_S = 120, 30
SLICE_MIN_S = SLICE_END_S + 15  # room for one step after the load


def slice_seconds(steps_left: int, sec_per_step: float) -> int:
    """The GPU time a training slice asks for: SLICE_S, or less when the job's measured pace says it ends sooner
    (its last slice, a short job), so a visitor with little quota left is not refused for time it never uses."""
    if not sec_per_step:  # the first slice: no pace yet
        return SLICE_S
    need = SLICE_END_S + 1.5 * max(1, steps_left) * sec_per_step  # headroom: a slice that falls short pauses
    return int(min(SLICE_S, max(SLICE_MIN_S, math.ceil(need))))


def active() -> bool:
    """On a ZeroGPU Space (the variable the ``spaces`` package reads)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def generation_seconds(family: str, steps: int, width: int | None, height: int | None, batch: int) -> int:
    """The GPU time one generation request asks for: steps x images x pixels relative to the family's native
    size (attention grows faster than the pixel count; the headroom in STEP_SECONDS covers 2x the native side)."""
    native = NATIVE.get(family, 512)
    area = ((width or native) * (height or native)) / native**2
    work = STEP_SECONDS.get(family, STEP_SECONDS["sdxl"]) * max(1, steps) * max(1, batch) * max(area, 0.25)
    return int(min(MAX_S, max(MIN_S, math.ceil(OVERHEAD_S + work))))
