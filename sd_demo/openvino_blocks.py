"""The UNet's and the VAE decoder's blocks run by OpenVINO on a CPU (``--compile openvino``): the same pixels
(float32, within 1e-5 of PyTorch's), 1.45x stock diffusers' speed at SD 1.5's 256 px and 1.14x at 512 px on this
project's 2-core Xeon, for a second copy of the weights (BENCHMARKS.md, session 21).

Each down, middle and up block is converted (``openvino.convert_model``) the first time it runs, from that call's
inputs, and compiled for the CPU; the UNet's and decoder's own forwards, the text encoder, the VAE's encoder and
the samplers stay PyTorch.
Per block rather than the whole UNet (which was 1.67x instead of 1.44x on its own) so that the Fast path's hooks
(``deepcache``) still skip the deep blocks between full steps. A LoRA change converts again (the adapters' weights
are folded into the graph). An up block converts once more for the sizes off the UNet's 64 px grid (its target size
comes as a tensor's shape). Training, and any call with gradients, a non-float32 tensor or another non-tensor
argument, runs the block in PyTorch, as does a block that OpenVINO failed to convert.

Not optimum-intel's OVStableDiffusionPipeline: it replaces the whole pipeline, so our samplers, LoRA stacking and
Fast switches would not apply, and it pulls in optimum and transformers pins on top of the runtime.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import time
import warnings

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from .hub import first_line

log = logging.getLogger(__name__)
HOOK = "sd_demo_openvino"
INSTALL = "pip install -r requirements-openvino.txt"
_CORE = None  # one runtime for every block's compiled model


def check_available(device: str, dtype: torch.dtype) -> None:
    """ValueError (one line, what to change) where OpenVINO cannot run this model."""
    if importlib.util.find_spec("openvino") is None:
        raise ValueError(f"--compile openvino: OpenVINO is not installed; run `{INSTALL}`, or use --compile torch")
    if device != "cpu":
        raise ValueError(f"--compile openvino: runs on the CPU, not {device}; add --device cpu, or use --compile torch")
    if dtype != torch.float32:
        raise ValueError("--compile openvino: runs float32 models; use --dtype fp32 (auto on a CPU)")


def blocks(net) -> list[torch.nn.Module]:
    """The blocks converted of a UNet, or of a VAE's decoder (which has no down blocks)."""
    return [*getattr(net, "down_blocks", ()), *([net.mid_block] if net.mid_block is not None else []),
            *net.up_blocks]


class _Flat(torch.nn.Module):
    """A block as a function of tensors only, the tracer's input: the named tensor arguments, then the skip
    connections an up block takes as a tuple."""

    def __init__(self, block: torch.nn.Module, forward, names: list[str], sized: bool):
        super().__init__()
        self.block, self.forward_fn, self.names, self.sized = block, forward, names, sized

    def forward(self, *tensors):
        kwargs = {}
        if self.sized:  # the last tensor's shape is the up-sampling's target size: traced as a size, not a number
            kwargs["upsample_size"], tensors = tensors[-1].shape[2:], tensors[:-1]
        kwargs.update(zip(self.names, tensors))
        if len(tensors) > len(self.names):
            kwargs["res_hidden_states_tuple"] = tuple(tensors[len(self.names):])
        return self.forward_fn(**kwargs)


class _Converted(ModelHook):
    """On a block: its call run by an OpenVINO model converted from its first call (again after a LoRA change);
    a call with gradients or another argument runs the block itself."""

    def __init__(self, version):
        super().__init__()
        self.version = version  # () -> what invalidates the conversions (the model's LoRAs)
        self.models: dict = {}  # argument kinds -> (compiled model, output tree spec), or None: PyTorch runs it
        self.seen = None
        self.signature = None
        self.runs = 0  # calls OpenVINO ran

    def new_forward(self, module, *args, **kwargs):
        original = self.fn_ref.original_forward
        self.signature = self.signature or inspect.signature(original)
        bound = self.signature.bind(*args, **kwargs).arguments
        skips = bound.pop("res_hidden_states_tuple", None) or ()
        # an up block's target size at a size off the UNet's 64 px grid: given as a tensor of that shape, so that
        # one more graph serves every such size
        size = bound.pop("upsample_size", None)
        names = [k for k, v in bound.items() if isinstance(v, torch.Tensor)]
        tensors = [bound[k] for k in names] + list(skips) + ([] if size is None else [torch.empty(1, 1, *size)])
        # Any other argument (cross_attention_kwargs) would be traced as a constant: one more conversion, and one
        # more copy of the weights, per value.
        if (any(v is not None and v != {} for k, v in bound.items() if k not in names) or torch.is_grad_enabled()
                or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)):
            return original(*args, **kwargs)
        if self.version() != self.seen:  # the LoRAs changed: the old conversions hold the old weights
            self.models.clear()
            self.seen = self.version()
        key = (tuple(names), len(skips), size is not None)
        if key not in self.models:
            try:
                self.models[key] = self._convert(module, original, names, tensors, size is not None)
            except Exception as exc:  # an op OpenVINO cannot take, or no memory left: PyTorch runs it from now on
                log.warning("OpenVINO: %s stays in PyTorch: %s", type(module).__name__, first_line(exc))
                self.models[key] = None
        if self.models[key] is None:
            return original(*args, **kwargs)
        compiled, spec = self.models[key]
        self.runs += 1
        # copies of the outputs (share_outputs=False): Deep cache keeps a block's output across calls, which the
        # next inference would otherwise overwrite
        outs = compiled([t.detach().contiguous().numpy() for t in tensors], share_outputs=False).to_tuple()
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outs], spec)

    @staticmethod
    def _convert(module, original, names, tensors, sized):
        ov = _openvino()
        t0 = time.perf_counter()
        flat = _Flat(module, original, names, sized)
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns of each shape check it fixes ("assert hidden_states.shape[1] == self.channels"):
            # they hold for every input a block gets; the batch and size stay free (tests/test_models.py)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, which OpenVINO uses
            _, spec = pytree.tree_flatten(flat(*tensors))
            graph = ov.convert_model(flat, example_input=tuple(tensors))
        compiled = _core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        log.info("OpenVINO: %s converted in %.1f s", type(module).__name__, time.perf_counter() - t0)
        return compiled, spec


def _openvino():
    """The openvino module, with its converter's telemetry off: ``convert_model`` sends usage events to Google
    Analytics unless a consent file in the user's home says no (openvino_telemetry, opt-out). A self-hosted app does
    not phone home, so the converter gets its own no-op stand-in (it imports the package under ImportError)."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


def _core():
    global _CORE
    if _CORE is None:
        _CORE = _openvino().Core()
    return _CORE


def runs(block) -> int:
    """How many calls of ``block`` OpenVINO ran."""
    return block._diffusers_hook.get_hook(HOOK).runs


def conversions(block) -> int:
    """How many graphs of ``block`` OpenVINO holds now."""
    return sum(m is not None for m in block._diffusers_hook.get_hook(HOOK).models.values())


def accelerate(net, version=tuple) -> None:
    """Run the blocks of ``net`` (a UNet or a VAE decoder) through OpenVINO from now on, each converted on first
    use; ``version()`` names the weights' state (its change converts again)."""
    for block in blocks(net):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_Converted(version), HOOK)
