"""Pure pieces of the training loop: the step plan, the learning-rate schedule, the optimizer, the loss.

Everything a spec can get wrong is checked here before any process group or model exists, and raises
InvalidSpec, which the runtime turns into contract.EXIT_INVALID_SPEC with the reason in the termination log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class InvalidSpec(Exception):
    """The job's spec cannot run as written; retrying does not help."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TrainPlan:
    """Step arithmetic of a run: what one optimizer step is, and how many there are."""

    world_size: int
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    total_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def sequences_per_rank_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum


def plan(training: Any, world_size: int) -> TrainPlan:
    """Check the batch arithmetic against the gang size and turn totalTokens into steps."""
    gbs, mbs = training.global_batch_size, training.micro_batch_size
    if (training.total_steps is None) == (training.total_tokens is None):
        raise InvalidSpec("exactly one of totalSteps and totalTokens must be set", "spec.training")
    per_pass = mbs * world_size
    if gbs % per_pass:
        raise InvalidSpec(
            f"globalBatchSize {gbs} is not a multiple of microBatchSize {mbs} x {world_size} processes "
            f"(= {per_pass})", "spec.training.globalBatchSize")
    tokens_per_step = gbs * training.seq_len
    steps = training.total_steps or math.ceil(training.total_tokens / tokens_per_step)
    return TrainPlan(world_size=world_size, seq_len=training.seq_len, global_batch_size=gbs,
                     micro_batch_size=mbs, grad_accum=gbs // per_pass, total_steps=steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then decay to
    min_lr_ratio at the last step (cosine or linear), or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise InvalidSpec(f"unknown schedule {schedule!r}", "spec.optimizer.schedule")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_optimizer(model: Any, opt: Any, device_type: str) -> Any:
    """AdamW with decoupled weight decay on matrices only; fused kernels on GPU, foreach elsewhere."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps}
    if device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, TypeError):  # a build without the fused/foreach kernels for this device
        return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)


def build_scheduler(optimizer: Any, opt: Any, total_steps: int) -> Any:
    import torch

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, opt.warmup_steps, opt.schedule, opt.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def causal_lm_loss(model: Any, batch: Any) -> Any:
    """Mean next-token cross-entropy of packed sequences [B, seqLen+1] (no padding, so a plain mean)."""
    import torch.nn.functional as F

    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
