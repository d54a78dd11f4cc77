"""The UNet's and the VAE decoder's blocks run by OpenVINO on a CPU (``--compile openvino``): the same pixels
(float32, within 1e-5 of PyTorch's) and 1.4-1.7x the speed of PyTorch's own kernels on this project's 2-core Xeon
(BENCHMARKS.md).

Each down, middle and up block is converted (``openvino.convert_model``) the first time it runs, from that call's
inputs, and compiled for the CPU; the UNet's and decoder's own forwards, the text encoder, the VAE's encoder and
the samplers stay PyTorch.
Per block rather than the whole UNet (which was 1.67x instead of 1.44x on its own) so that the Fast path's hooks
(``deepcache``) still skip the deep blocks between full steps. A LoRA change converts again (the adapters' weights
are folded into the graph). Training, and any call with gradients, a non-float32 tensor or an argument the
converted graph did not see, runs the block in PyTorch.

Not optimum-intel's OVStableDiffusionPipeline: it replaces the whole pipeline, so our samplers, LoRA stacking and
Fast switches would not apply, and it pulls in optimum and transformers pins on top of the runtime.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import time
import warnings

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

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

    def __init__(self, block: torch.nn.Module, forward, names: list[str], constants: dict):
        super().__init__()
        self.block, self.forward_fn, self.names, self.constants = block, forward, names, constants

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors), **self.constants)
        if len(tensors) > len(self.names):
            kwargs["res_hidden_states_tuple"] = tuple(tensors[len(self.names):])
        return self.forward_fn(**kwargs)


class _Converted(ModelHook):
    """On a block: its call run by an OpenVINO model converted from the first call of each kind (its argument
    names, constants and the model's LoRA set); anything else runs the block itself."""

    def __init__(self, version):
        super().__init__()
        self.version = version  # () -> what invalidates the conversions (the model's LoRAs)
        self.models: dict = {}  # key -> (compiled model, output tree spec)
        self.seen = None
        self.signature = None
        self.runs = 0  # calls OpenVINO ran

    def new_forward(self, module, *args, **kwargs):
        original = self.fn_ref.original_forward
        self.signature = self.signature or inspect.signature(original)
        bound = self.signature.bind(*args, **kwargs).arguments
        skips = bound.pop("res_hidden_states_tuple", None) or ()
        names = [k for k, v in bound.items() if isinstance(v, torch.Tensor)]
        constants = {k: v for k, v in bound.items() if v is not None and k not in names}
        tensors = [bound[k] for k in names] + list(skips)
        try:
            key = (self.version(), tuple(names), len(skips), tuple(sorted(constants.items())))
            hash(key)
        except TypeError:  # a dict argument (cross_attention_kwargs): not a constant the graph can hold
            key = None
        if key is None or torch.is_grad_enabled() or any(t.dtype != torch.float32 or t.device.type != "cpu"
                                                          for t in tensors):
            return original(*args, **kwargs)
        if self.version() != self.seen:  # the LoRAs changed: the old conversions hold the old weights
            self.models.clear()
            self.seen = self.version()
        if key not in self.models:
            self.models[key] = self._convert(module, original, names, constants, tensors)
        compiled, spec = self.models[key]
        self.runs += 1
        outs = compiled([t.detach().contiguous().numpy() for t in tensors]).to_tuple()
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outs], spec)

    @staticmethod
    def _convert(module, original, names, constants, tensors):
        import openvino as ov

        t0 = time.perf_counter()
        flat = _Flat(module, original, names, constants)
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns of each shape check it fixes ("assert hidden_states.shape[1] == self.channels"):
            # they hold for every input a block gets, and the batch and size stay free (tested)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, which OpenVINO uses
            _, spec = pytree.tree_flatten(flat(*tensors))
            graph = ov.convert_model(flat, example_input=tuple(tensors))
        compiled = _core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        log.info("OpenVINO: %s converted in %.1f s", type(module).__name__, time.perf_counter() - t0)
        return compiled, spec


def _core():
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def runs(block) -> int:
    """How many calls of ``block`` OpenVINO ran."""
    return block._diffusers_hook.get_hook(HOOK).runs


def accelerate(net, version=tuple) -> None:
    """Run the blocks of ``net`` (a UNet or a VAE decoder) through OpenVINO from now on, each converted on first
    use; ``version()`` names the weights' state (its change converts again)."""
    for block in blocks(net):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_Converted(version), HOOK)
