"""The seam between the training loop and whatever runs it.

Why a seam: the loop must run in one plain process (unit tests, ``mzsane train --no-ray``) and inside
Ray Train workers (local Ray, KubeRay) without an ``if ray`` anywhere in it. Everything the loop needs
from its runner is here: its identity (``world_rank``, ``local_rank``, ``world_size``, ``device``), how to
wrap the model for data parallelism, collective helpers, where the last checkpoint is, and how to
report metrics plus a checkpoint directory. Modelled on Ray's own benchmark ``train_context.py``.

``LocalContext`` needs no Ray; when a ``torch.distributed`` process group is already initialised (the
unit test that runs two gloo ranks in two processes) it uses it, so the same loop does DDP without Ray.
``RayContext`` is only used inside a Ray Train worker; ``launch.py`` builds it there.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mzsane import storage
from mzsane.train import checkpoint as ckpt


class TrainContext(Protocol):
    world_rank: int
    local_rank: int
    world_size: int
    device: torch.device
    show_progress: bool  # draw a tqdm bar in the loop (the Ray driver draws its own instead)
    node: str  # where this rank runs (node IP under Ray, host name otherwise), for logs and tests

    def wrap_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor: ...


class _Collectives:
    """Collectives over the default torch.distributed group, or identities with one rank."""

    world_size: int

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._distributed():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._distributed():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0 with this rank's slice differentiable."""
        if not self._distributed():
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        parts[dist.get_rank()] = tensor
        return torch.cat(parts, dim=0)


class LocalContext(_Collectives):
    """One process without Ray; checkpoints are copied to ``{run_url}/checkpoint_*`` by rank 0."""

    def __init__(self, run_url: str, num_to_keep: int = 2, device: str | torch.device | None = None,
                 show_progress: bool = False):
        self.run_url = run_url
        self.num_to_keep = num_to_keep
        initialised = dist.is_available() and dist.is_initialized()
        self.world_rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.world_rank))
        self.device = torch.device(device) if device else torch.device(
            f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.show_progress = show_progress and self.world_rank == 0
        self.node = socket.gethostname()
        self._scratch: list[str] = []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self._distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is None or self.world_rank != 0:
            return
        name = os.path.basename(checkpoint_dir.rstrip("/"))
        ckpt.upload(checkpoint_dir, storage.join(self.run_url, name))
        if self.num_to_keep > 0:
            for _, url in ckpt.list_checkpoints(self.run_url)[:-self.num_to_keep]:
                storage.remove(url, recursive=True)

    def latest_checkpoint(self) -> str | None:
        url = ckpt.latest_checkpoint_url(self.run_url)
        if url is None:
            return None
        return self._fetch(url)

    def _fetch(self, url: str) -> str:
        local = storage.local_path(url)
        if local:
            return local
        scratch = tempfile.mkdtemp(prefix="mzsane-ckpt-")
        self._scratch.append(scratch)
        return ckpt.fetch(url, scratch)

    def close(self) -> None:
        for path in self._scratch:
            shutil.rmtree(path, ignore_errors=True)


class RayContext(LocalContext):
    """Inside a Ray Train worker: identity from ``ray.train.get_context()``, DDP via ``prepare_model``,
    checkpoints through ``ray.train.report`` (Ray uploads them to ``{run_url}/checkpoint_*`` and keeps
    ``num_to_keep``); after a worker failure ``ray.train.get_checkpoint()`` is the one to resume from."""

    def __init__(self, run_url: str):
        import ray.train
        import ray.train.torch
        import ray.util

        context = ray.train.get_context()
        self.run_url = run_url
        self.num_to_keep = 0  # Ray's CheckpointConfig prunes
        self.world_rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.show_progress = False
        self.node = ray.util.get_node_ip_address()
        self._scratch = []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        name = os.path.basename(checkpoint_dir.rstrip("/"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name)

    def latest_checkpoint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        newest = ckpt.latest_checkpoint_url(self.run_url)
        # None: a fresh Ray run over an existing run folder (``--resume``). Ray's snapshot can also be older
        # than the newest complete checkpoint in the folder (its bookkeeping lags a report): take the newest
        if checkpoint is None or (newest is not None and ckpt.step_of(newest) > ckpt.step_of(checkpoint.path)):
            return super().latest_checkpoint()
        scratch = tempfile.mkdtemp(prefix="mzsane-ckpt-")
        self._scratch.append(scratch)
        return checkpoint.to_directory(scratch)
