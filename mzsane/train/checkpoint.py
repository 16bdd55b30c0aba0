"""A training checkpoint is a directory holding everything needed to resume exactly or to sample.

``{run}/checkpoint_{step:08d}/``:
  - ``model.safetensors``: the SANE weights of the *unwrapped* module (no ``module.`` from DDP, no
    ``_orig_mod.`` from ``torch.compile``), so a checkpoint loads whatever the compile setting.
  - ``state.pt``: optimizer, scheduler, step, every rank's data position and RNG state, optional
    GradScaler; plain tensors/containers only so ``torch.load(weights_only=True)`` reads it (user
    checkpoints are untrusted).
  - ``config.json``: the resolved config (``model.max_positions`` filled in), written last so its
    presence marks a complete checkpoint on a local disk.

A checkpoint whose model/token shape settings differ from the current config cannot be loaded into it;
that is a ``CheckpointError`` naming the differing keys rather than a state_dict size-mismatch trace.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any

import torch
from torch import nn

from mzsane import config as config_mod
from mzsane import storage
from mzsane.config import Config
from mzsane.errors import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_NAME = re.compile(r"^checkpoint_(\d{8})$")
# what must match for weights to load: the model's shapes and the token width
SHAPE_KEYS = ("model.d_model", "model.num_heads", "model.num_layers", "model.latent_dim", "model.mlp_ratio",
              "model.projection_dim", "model.max_positions", "tokens.tokensize")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def is_checkpoint_url(url: str) -> bool:
    return bool(_NAME.match(os.path.basename(url.rstrip("/"))))


def step_of(url: str) -> int:
    """The step in a ``checkpoint_*`` URL's name; -1 for anything else."""
    match = _NAME.match(os.path.basename(str(url).rstrip("/")))
    return int(match.group(1)) if match else -1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save(directory: str, model: nn.Module, state: dict[str, Any], cfg: Config) -> None:
    """Write one checkpoint into a local directory (the caller uploads or reports it)."""
    from safetensors.torch import save_file

    try:
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}
        save_file(tensors, os.path.join(directory, MODEL_FILE))
        torch.save(state, os.path.join(directory, STATE_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
            fh.write(config_mod.dumps(cfg))
    except Exception as err:  # torch.save re-raises ENOSPC as RuntimeError, safetensors as SafetensorError
        if not storage.is_disk_full(err):
            raise
        shutil.rmtree(directory, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) if "tensors" in locals() else 0
        raise storage.disk_full(directory, needed=needed) from None


def upload(directory: str, url: str) -> None:
    """Copy a saved checkpoint to ``url`` with config.json last (its presence marks completeness there too);
    on failure the partial copy is removed, so a full disk is not kept full by it."""
    names = sorted(os.listdir(directory), key=lambda n: (n == CONFIG_FILE, n))
    try:
        for name in names:
            with open(os.path.join(directory, name), "rb") as fh:
                storage.write_bytes(storage.join(url, name), fh.read())
    except BaseException:
        with contextlib.suppress(Exception):
            storage.remove(url, recursive=True)
        raise


def _flat(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_compatible(saved: Config, current: Config, where: str) -> None:
    diffs = [f"{k}={_flat(saved, k)!r} (now {_flat(current, k)!r})" for k in SHAPE_KEYS
             if _flat(saved, k) != _flat(current, k)]
    if diffs:
        raise CheckpointError(f"checkpoint '{where}' was written by an incompatible config: {', '.join(diffs)}; "
                              f"train a new run or use the checkpoint's settings")


def read_config(directory: str) -> Config:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"'{directory}' is not a complete checkpoint (no {CONFIG_FILE}); "
                              f"pass a run folder or a checkpoint_* folder")
    try:
        with open(path, encoding="utf-8") as fh:
            return config_mod.loads(fh.read())
    except (json.JSONDecodeError, config_mod.ConfigError) as err:
        raise CheckpointError(f"'{path}' is not a valid mzsane config ({err}); the checkpoint is corrupt") from None


def load(directory: str, cfg: Config | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], Config]:
    """(model state_dict, training state, saved config); checks compatibility with ``cfg`` when given."""
    from safetensors.torch import load_file

    saved = read_config(directory)
    if cfg is not None:
        check_compatible(saved, cfg, directory)
    try:
        weights = load_file(os.path.join(directory, MODEL_FILE))
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint '{directory}' lacks {os.path.basename(str(err.filename))}; "
                              f"it is incomplete, use an earlier one") from None
    except Exception as err:  # safetensors / unpickler refusing the content
        raise CheckpointError(f"checkpoint '{directory}' cannot be read safely ({type(err).__name__}); "
                              f"it is corrupt or not an mzsane checkpoint") from None
    return weights, state, saved


def list_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every ``checkpoint_*`` folder of a run, oldest first."""
    out = []
    for name in storage.listdir(run_url):
        match = _NAME.match(name)
        if match:
            out.append((int(match.group(1)), storage.join(run_url, name)))
    return sorted(out)


def _complete(url: str) -> bool:
    names = set(storage.listdir(url))
    return {MODEL_FILE, STATE_FILE, CONFIG_FILE} <= names


def latest_checkpoint_url(run_or_checkpoint_url: str) -> str | None:
    """The newest complete checkpoint of a run (or the URL itself when it is a checkpoint folder)."""
    if _NAME.match(os.path.basename(run_or_checkpoint_url.rstrip("/"))):
        return run_or_checkpoint_url if _complete(run_or_checkpoint_url) else None
    for _, url in reversed(list_checkpoints(run_or_checkpoint_url)):
        if _complete(url):
            return url
    return None


def fetch(url: str, scratch: str) -> str:
    """A local directory with the checkpoint's files (the URL itself when it is on local disk).

    Exactly the three files a checkpoint consists of, read by name: no listing of the object store, and
    nothing else Ray may have put beside them (e.g. directory-marker objects) is copied."""
    local = storage.local_path(url)
    if local:
        return local
    os.makedirs(scratch, exist_ok=True)
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        with open(os.path.join(scratch, name), "wb") as fh:
            fh.write(storage.read_bytes(storage.join(url, name)))
    return scratch

