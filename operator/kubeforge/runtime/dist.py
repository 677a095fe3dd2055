"""Process group, device, strategy and precision: one code path for CPU (gloo, DDP, fp32) and GPU
(NCCL, FSDP2 or DDP, bf16), chosen from the device at hand and the spec's parallelism block.

torchrun provides RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_ENV = "KUBEFORGE_COLLECTIVE_TIMEOUT_SECONDS"


@dataclass(frozen=True)
class Choice:
    """What the runtime does on this device."""

    device_type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"
    strategy: str  # "ddp" | "fsdp"
    precision: str  # "bf16" | "fp32"
    note: str = ""


def choose(requested_strategy: str, requested_precision: str, cuda_available: bool) -> Choice:
    """The device decides the backend and the default precision; the spec decides the strategy.

    GPU: NCCL, `auto` precision = bf16 (FSDP2 MixedPrecisionPolicy, or autocast under DDP).
    CPU: gloo, `auto` precision = fp32. Both DDP and FSDP2 (`fully_shard`) run over gloo, so the sharded
    path is exercised on CPU as well.
    """
    if cuda_available:
        precision = "bf16" if requested_precision == "auto" else requested_precision
        return Choice("cuda", "nccl", requested_strategy, precision)
    precision = "fp32" if requested_precision == "auto" else requested_precision
    return Choice("cpu", "gloo", requested_strategy, precision)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int

    @classmethod
    def from_env(cls, env: Any = None) -> DistEnv:
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(choice: Choice, denv: DistEnv) -> Any:
    """Join the process group (env:// rendezvous set up by torchrun); returns the torch.device."""
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=int(os.environ.get(COLLECTIVE_TIMEOUT_ENV, "1800")))
    if choice.device_type == "cuda":
        torch.cuda.set_device(denv.local_rank)
        device = torch.device("cuda", denv.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(denv.rank))
        os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
        kwargs: dict[str, Any] = {"backend": choice.backend, "timeout": timeout}
        if choice.device_type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return device


def block_classes(model: Any) -> tuple[type, ...]:
    """The transformer block classes of a Hugging Face model (its `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def wrap(model: Any, choice: Choice, device: Any, denv: DistEnv) -> Any:
    """DDP, or FSDP2 (`fully_shard` per block, then the root) with bf16 compute and fp32 reduction."""
    import torch

    if choice.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if choice.precision == "bf16" else MixedPrecisionPolicy()
        model.to(device)
        blocks = block_classes(model)
        for m in list(model.modules()):
            if blocks and isinstance(m, blocks):
                fully_shard(m, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    model.to(device)
    return DDP(model, device_ids=[denv.local_rank] if choice.device_type == "cuda" else None)


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    return getattr(model, "module", model)


def autocast(choice: Choice) -> Any:
    """bf16 autocast for DDP; FSDP2 casts through its MixedPrecisionPolicy; fp32 runs as is."""
    import torch

    if choice.precision == "bf16" and choice.strategy == "ddp":
        return torch.autocast(choice.device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def grad_sync(model: Any, choice: Choice, sync: bool) -> Any:
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if sync:
        if choice.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        yield
        return
    if choice.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
    else:
        with model.no_sync():
            yield
