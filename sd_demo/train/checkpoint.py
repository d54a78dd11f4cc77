"""Resumable checkpoints: trainable weights, optimizer and LR-schedule state, data position. Safetensors + JSON only.

A checkpoint is a folder written under a temporary name and renamed into place when complete, so a crash or a full
disk mid-write leaves the previous checkpoint valid. Optimizer state is flattened to tensors (safetensors) plus its
hyper-parameters (JSON) instead of torch.save, so loading a checkpoint never unpickles anything.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
log = logging.getLogger(__name__)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    extra: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then delete all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        meta = {"step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), **extra}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # only ever our own folder of the same step
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves the previous checkpoint as it was
        raise
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def set_aside_earlier_run(folder: Path) -> Path | None:
    """A fresh run into an --overwrite folder: move an earlier run's checkpoints to checkpoints-earlier-N. Left in
    place they would outnumber this run's (keep-last-K sorts by step, so the new ones would be deleted first) and
    --resume latest would pick the earlier run. Moved, not deleted: they may be all that is left of that run."""
    if not list_checkpoints(folder):
        return None
    n = 1
    while (aside := folder.with_name(f"{folder.name}-earlier-{n}")).exists():
        n += 1
    os.replace(folder, aside)
    log.warning("%s held checkpoints of an earlier run: moved to %s", folder, aside)
    return aside


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(spec: str, out: Path) -> Path:
    if spec == "latest":
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ValueError(f"resume: no checkpoint in {out / 'checkpoints'}; run without --resume first")
        return found[-1]
    path = Path(spec)
    if not (path / "state.json").exists():
        raise ValueError(f"resume: '{spec}' is not a checkpoint folder (no state.json); use 'latest' or a step-* folder")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, optimizer state_dict, meta) of a checkpoint folder."""
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    opt_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    return weights, opt_state, meta
