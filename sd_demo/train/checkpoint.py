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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "step-"
REQUIRED = {"step", "optimizer", "lr_scheduler"}  # what save_checkpoint always writes into state.json
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


def _resume_candidates(spec: str, out: Path) -> list[Path]:
    """The checkpoint folders --resume may use, best first (``latest``: newest complete one first)."""
    if spec == "latest":
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ValueError(f"resume: no checkpoint in {out / 'checkpoints'}; run without --resume first")
        return found[::-1]
    path = Path(spec)
    if not (path / "state.json").exists():
        raise ValueError(f"resume: '{spec}' is not a checkpoint folder (no state.json); use 'latest' or a step-* folder")
    return [path]


class DamagedCheckpoint(ValueError):
    pass


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, optimizer state_dict, meta) of a checkpoint folder; DamagedCheckpoint names the file that cannot be
    read (a disk that filled or a copy that was cut short after the atomic rename, or a hand-edited state.json)."""
    def read(name: str, how):
        try:
            return how(path / name)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise DamagedCheckpoint(f"{path / name} is damaged ({str(exc).splitlines()[0][:120] or type(exc).__name__})"
                                    ) from None

    meta = read("state.json", lambda f: json.loads(f.read_text()))
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not REQUIRED <= meta.keys():
        raise DamagedCheckpoint(f"{path / 'state.json'} is damaged (not a checkpoint's state: step, optimizer, "
                                "lr_scheduler)")
    weights = read("weights.safetensors", lambda f: load_file(str(f)))
    opt_state = read("optimizer.safetensors", lambda f: _unflatten_optimizer(load_file(str(f)), meta["optimizer"]))
    return weights, opt_state, meta


def load_resume(spec: str, out: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The checkpoint --resume names, loaded. With ``latest`` a damaged newest checkpoint is reported and the newest
    intact one before it is used (the run loses the steps since then, not itself); a named one must be intact."""
    candidates = _resume_candidates(spec, out)
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path)
        except DamagedCheckpoint as exc:
            if i + 1 == len(candidates):
                raise ValueError(f"resume: {exc}; no intact checkpoint is left, start again without --resume"
                                 if spec == "latest" else f"resume: {exc}; name another checkpoint or 'latest'"
                                 ) from None
            log.warning("resume: %s; resuming from %s instead", exc, candidates[i + 1].name)
