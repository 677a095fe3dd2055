"""The weight-broadcast group between the learner's rank 0 and the rollout engines' workers.

A process group of its own, outside the learner's torchrun group and outside vLLM's: a TCP store served by the
learner's rank 0 (`master_address:master_port`) and a torch.distributed ProcessGroup built directly on it
(NCCL on GPU, gloo on CPU), the way vLLM's RLHF examples build a `StatelessProcessGroup` next to the engine's
own. The learner is rank 0 and the only sender; engine worker w of engine i is rank `rankOffset_i + w`.

Tensors travel in buckets: consecutive tensors of one dtype flattened into one buffer of at most
`bucket_bytes`, one broadcast per bucket instead of one per tensor. Both sides compute the same buckets from
the same metadata (`bucket_plan`), so no sizes travel besides the metadata in the update request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix: "bfloat16", "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> TensorMeta:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: str) -> int:
    import torch

    return int(torch.empty((), dtype=getattr(torch, dtype)).element_size())


def bucket_plan(metas: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices of `metas` per bucket, in order: consecutive tensors of one dtype up to bucket_bytes (a
    larger tensor is a bucket of its own)."""
    buckets: list[list[int]] = []
    size = 0
    for i, m in enumerate(metas):
        nbytes = m.numel * element_size(m.dtype)
        cur = buckets[-1] if buckets else None
        if cur is None or metas[cur[0]].dtype != m.dtype or size + nbytes > bucket_bytes:
            buckets.append([i])
            size = nbytes
        else:
            cur.append(i)
            size += nbytes
    return buckets


def flatten(tensors: list[Any]) -> Any:
    import torch

    return torch.cat([t.detach().reshape(-1) for t in tensors]) if len(tensors) > 1 else \
        tensors[0].detach().reshape(-1).contiguous()


def unflatten(flat: Any, metas: list[TensorMeta]) -> list[Any]:
    out, offset = [], 0
    for m in metas:
        out.append(flat[offset:offset + m.numel].view(m.shape))
        offset += m.numel
    return out


class WeightGroup:
    """One member of the broadcast group. Rank 0 serves the store; construction returns once every rank
    joined (a first one-element broadcast proves the group, so NCCL's lazy setup cannot hang later)."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, backend: str,
                 device: Any = None, timeout_s: float = 600.0) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0,
                                   timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore("kubeforge-weights", self.store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg: Any = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            raise ValueError(f"unknown weight-sync backend {backend!r} (nccl or gloo)")
        probe = torch.ones(1, device=self.device) * (7 if rank == 0 else 0)
        self.broadcast(probe)
        if int(probe.item()) != 7:
            raise RuntimeError("the weight-sync group did not deliver rank 0's probe")

    def broadcast(self, tensor: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def close(self) -> None:
        try:
            self.pg.shutdown() if hasattr(self.pg, "shutdown") else None
        except Exception:  # noqa: BLE001, S110 - best effort: the peer may be gone already
            pass
        self.pg = None


__all__ = ["DEFAULT_BUCKET_BYTES", "TensorMeta", "WeightGroup", "bucket_plan", "dtype_name", "flatten", "unflatten"]
