"""DeepCache-style feature caching for a diffusers UNet (Ma et al., "DeepCache: Accelerating Diffusion Models for
Free", CVPR 2024): the deep blocks' features change slowly from one step to the next, so only every ``interval``-th
UNet call runs the whole network; the calls in between run the shallowest skip branch (conv_in, the first down
block, the last up block, conv_out) and take the deep path's output from the last full call (the paper's uniform
schedule, branch 0).

Built on diffusers' model hooks (``diffusers.hooks.ModelHook``): the UNet's code is untouched, and the hooks are
removed when the run ends. No library does this for UNets: diffusers' caches (FasterCache, FirstBlockCache, ...)
hook transformer blocks, and the DeepCache package (2023) patches an older diffusers' forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from .hooks import hooked

HOOK = "sd_demo_deepcache"


@dataclass
class _State:
    interval: int
    calls: int = 0
    reuse: bool = False


def _halved(value, batch: int):
    """A cached output (a tensor or nested tuples of them) cut to ``batch``: after CFG ends early
    (``cfg_cutoff``), the pass runs the prompt's half alone, the second half of the cached CFG batch."""
    if isinstance(value, torch.Tensor):
        return value[-batch:] if value.shape[0] != batch else value
    return type(value)(_halved(v, batch) for v in value)


def _batch(value) -> int:
    return value.shape[0] if isinstance(value, torch.Tensor) else _batch(value[0])


class _Count(ModelHook):
    """On the UNet: decides, per call, whether the deep blocks run or reuse their last output."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    @torch.compiler.disable  # (see _Reuse.new_forward)
    def pre_forward(self, module, *args, **kwargs):
        self.state.reuse = self.state.calls % self.state.interval != 0
        self.state.calls += 1
        return args, kwargs


class _Reuse(ModelHook):
    """On a deep block: its output from the last full call, while the state says reuse."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state
        self.out = None

    # Outside any compiled graph (--compile torch): traced, the call count and the kept outputs became guards, and
    # every step compiled again until torch gave up. The deep blocks then run uncompiled, and the UNet's hooked forward
    # still reaches torch's recompile limit: Fast gains nothing from --compile torch (2.22x against 2.25x, BENCHMARKS
    # session 21); --compile openvino converts the blocks themselves and keeps its gain.
    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.state.reuse and self.out is not None:
            kept = _batch(self.out)
            if kept == hidden.shape[0] or kept == 2 * hidden.shape[0]:
                return _halved(self.out, hidden.shape[0])
        self.out = self.fn_ref.original_forward(*args, **kwargs)
        return self.out


def deep_blocks(unet) -> list[torch.nn.Module]:
    """The blocks a cached call skips: every down block but the first, the middle block, every up block but the
    last (the first skip connection's branch stays live)."""
    return [*unet.down_blocks[1:], *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks[:-1]]


@contextlib.contextmanager
def feature_cache(unet, interval: int):
    """Within the block, ``unet`` runs its deep blocks on every ``interval``-th call only (1 = every call: off).
    The count starts at the block's entry, so every run's first call is a full one."""
    if interval <= 1:
        yield
        return
    state = _State(interval)
    with hooked(HOOK, [(unet, _Count(state)), *((block, _Reuse(state)) for block in deep_blocks(unet))]):
        yield
