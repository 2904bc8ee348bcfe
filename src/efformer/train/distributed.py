"""torch.distributed glue: process-group setup from torchrun's environment, DDP or FSDP2 wrapping,
sum-reductions, and full (unsharded) state dicts so that rank 0 writes and every rank can resume."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from efformer.errors import ConfigError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only rank that writes checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``train.device`` ('auto', 'cpu', 'cuda', 'cuda:1', ...)."""
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", pref, "CUDA is not available here; use 'cpu' or 'auto'")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ConfigError("train.device", pref, "a torch device such as 'auto', 'cpu' or 'cuda'") from None
    return torch.device(f"cuda:{local_rank}") if pref == "cuda" else dev


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """The model for training: unchanged for one process, else DDP or FSDP2 ``fully_shard``."""
    if not info.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in unwrap(model).backbone.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over ranks (returned as a new tensor; identity for one process)."""
    out = values.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Unsharded model weights on CPU keyed by the user's parameter names."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter names (the same on every layout)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, Tensor],
                    optim_state: dict[str, Any] | None) -> None:
    """Load unsharded weights (and optimizer state) into a plain, DDP or FSDP2 model on every rank."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
