"""Hooks on a model's modules for the length of one run, through diffusers' hook registry (``ModelHook``)."""
from __future__ import annotations

import contextlib

from diffusers.hooks import HookRegistry


@contextlib.contextmanager
def hooked(name: str, hooks):
    """Within the block, each ``(module, ModelHook)`` of ``hooks`` is registered under ``name``; after it they are
    removed, those registered before a failed registration too: a hook left behind would act in every later run."""
    done = []
    try:
        for module, hook in hooks:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            done.append(module)
        yield
    finally:
        for module in done:
            module._diffusers_hook.remove_hook(name, recurse=False)
