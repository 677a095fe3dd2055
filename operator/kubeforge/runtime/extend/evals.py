"""Evaluations after each stage, run with the same sequence parallelism as training.

- perplexity at each configured length: exp of the mean next-token loss over held-back sequences of the
  data (the first sequences of a stream with its own shuffle seed; a corpus small enough to be seen in
  training makes this a training perplexity, which the report says).
- needle in a haystack: for each (length, depth) a haystack of data tokens with the sentence
  "The secret number is N." at that depth, then "What is the secret number? The secret number is N.";
  the cell is 1 when every token of N is predicted exactly under teacher forcing (argmax), else 0, and the
  grid also keeps the per-token accuracy. Written as JSON and as the usual heatmap (depth x length).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import attention as sp
from .sequence import Mesh, shard_logits

NEEDLE = "The secret number is {n}."
QUESTION = " What is the secret number? The secret number is "


def _sp_gather(local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The full sequence [B, S] from every rank's shard [B, S/d] of the sequence group."""
    if mesh.degree == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(mesh.degree)]
    dist.all_gather(parts, local.contiguous(), group=mesh.sp_group)
    return sp.unshard(parts, "zigzag" if mesh.impl == "zigzag" else "ring", dim=1)


@torch.no_grad()
def perplexity(model: Any, mesh: Mesh, sequences: list[list[int]], device: Any) -> float:
    """exp(mean next-token loss) over sequences of seqLen+1 tokens, collective over the sequence group."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for seq in sequences:
        batch = torch.tensor([seq], device=device)
        logits, targets = shard_logits(model, batch, mesh)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        if mesh.degree > 1:
            dist.all_reduce(ce, group=mesh.sp_group)
        total += ce.double()
        count += len(seq) - 1
    return math.exp(total.item() / max(1, count))


def needle_case(filler: list[int], encode: Any, length: int, depth: float, number: str) -> tuple[list[int], int]:
    """Token ids of one haystack of exactly `length`+1 tokens and the index where the answer starts."""
    needle = encode(" " + NEEDLE.format(n=number) + " ")
    tail = encode(QUESTION)
    answer = encode(number)
    room = length + 1 - len(needle) - len(tail) - len(answer)
    if room < 0:
        raise ValueError(f"a needle case needs more than {length} tokens")
    hay = (filler * (room // max(1, len(filler)) + 1))[:room]
    at = int(round(depth * room))
    ids = hay[:at] + needle + hay[at:] + tail + answer
    return ids, len(ids) - len(answer)


@torch.no_grad()
def needle_grid(model: Any, mesh: Mesh, filler: list[int], encode: Any, lengths: list[int],
                depths: list[float], device: Any, seed: int = 0) -> dict[str, Any]:
    """Teacher-forced exact match of the needle for each length x depth (collective over the group)."""
    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            number = str(rng.randrange(10_000, 100_000))
            ids, start = needle_case(filler, encode, length, depth, number)
            batch = torch.tensor([ids], device=device)
            logits, _ = shard_logits(model, batch, mesh)
            preds = _sp_gather(logits.argmax(-1), mesh)[0]
            # the prediction at position i is for token i+1
            want = torch.tensor(ids[start:], device=device)
            got = preds[start - 1:len(ids) - 1]
            acc = (got == want).float().mean().item()
            cells.append({"length": length, "depth": depth, "match": bool(acc == 1.0),
                          "tokenAccuracy": round(acc, 4)})
    score = sum(c["match"] for c in cells) / max(1, len(cells))
    return {"lengths": lengths, "depths": depths, "cells": cells, "score": round(score, 4)}


def heatmap_png(grid: dict[str, Any], path: Path, title: str) -> None:
    """The picture people expect from NIAH: depth (rows) x context length (columns), green = retrieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = grid["lengths"], grid["depths"]
    acc = {(c["length"], c["depth"]): c["tokenAccuracy"] for c in grid["cells"]}
    data = [[acc[(L, d)] for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="needle token accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path, title: str) -> list[str]:
    """evals.json (+ niah.png when there is a grid) under out_dir; returns the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evals.json").write_text(json.dumps(results, indent=2))
    names = ["evals.json"]
    if results.get("needle", {}).get("cells"):
        heatmap_png(results["needle"], out_dir / "niah.png", title)
        names.append("niah.png")
    return names
