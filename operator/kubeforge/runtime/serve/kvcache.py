"""KV-cache hand-off between a prefill engine and a decode engine (the reference engine's connector).

The prefill engine runs the prompt, keeps the resulting KV cache (plus the logits of the last prompt
position, so the decode engine samples the first token itself) in a bounded `KVStore` under a random
transfer id, and names it in the `kv_transfer_params` it returns. The decode engine fetches it once over
HTTP (`GET /kv/<id>`, safetensors bytes: no pickle crosses the wire), checks that it belongs to the same
prompt and the same model shape, and continues generating from it without recomputing the prompt. An
entry is freed when fetched or when its TTL expires.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

FORMAT = "kubeforge-kv/1"


class KVTransferError(Exception):
    """The KV cache could not be fetched or does not fit this request."""


@dataclass
class KVEntry:
    prompt_ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value), [1, kv_heads, seq, head_dim]
    last_logits: torch.Tensor  # [vocab] float32: logits at the last prompt position
    model_sig: dict
    created: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        n = self.last_logits.numel() * self.last_logits.element_size()
        for k, v in self.layers:
            n += k.numel() * k.element_size() + v.numel() * v.element_size()
        return n


def model_signature(config) -> dict:
    """What must match between the two engines for a cache to be reusable."""
    heads = getattr(config, "num_attention_heads", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
        "hidden_size": getattr(config, "hidden_size", None),
        "head_dim": getattr(config, "head_dim", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


# ---------------------------------------------------------------------------- transformers cache compat


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer out of a transformers cache object or the legacy tuple format."""
    if hasattr(cache, "layers") and cache.layers and hasattr(cache.layers[0], "keys"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def build_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config=None):
    """A transformers DynamicCache holding the given per-layer tensors."""
    from transformers import DynamicCache

    cache = None
    if config is not None:
        try:
            cache = DynamicCache(config=config)
        except TypeError:
            cache = None
    if cache is None:
        cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


# ------------------------------------------------------------------------------------------- wire format


def serialize(entry: KVEntry) -> bytes:
    from safetensors.torch import save

    tensors = {
        "last_logits": entry.last_logits.contiguous(),
        "prompt_ids": torch.tensor(entry.prompt_ids, dtype=torch.int64),
    }
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:  # safetensors refuses tensors sharing memory (shared-KV layers)
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        return t

    for i, (k, v) in enumerate(entry.layers):
        tensors[f"k.{i}"] = own(k)
        tensors[f"v.{i}"] = own(v)
    meta = {"format": FORMAT, "num_layers": str(len(entry.layers)), "model_sig": json.dumps(entry.model_sig)}
    return save(tensors, metadata=meta)


def deserialize(data: bytes) -> KVEntry:
    from safetensors.torch import load

    try:
        tensors = load(data)
        # the metadata lives in the header: 8-byte little-endian length, then JSON
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    except Exception as e:
        raise KVTransferError(f"malformed KV payload: {e}") from e
    if meta.get("format") != FORMAT:
        raise KVTransferError(f"unknown KV payload format {meta.get('format')!r}")
    num_layers = int(meta["num_layers"])
    layers = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(num_layers)]
    return KVEntry(
        prompt_ids=tensors["prompt_ids"].tolist(),
        layers=layers,
        last_logits=tensors["last_logits"],
        model_sig=json.loads(meta["model_sig"]),
    )


def check_compatible(entry: KVEntry, prompt_ids: list[int], model_sig: dict) -> None:
    if entry.model_sig != model_sig:
        raise KVTransferError(f"KV cache from a different model shape: {entry.model_sig} != {model_sig}")
    if entry.prompt_ids != list(prompt_ids):
        raise KVTransferError(
            f"KV cache is for another prompt ({len(entry.prompt_ids)} tokens vs {len(prompt_ids)})"
        )
    seq = entry.layers[0][0].shape[-2] if entry.layers else 0
    if seq != len(prompt_ids):
        raise KVTransferError(f"KV cache holds {seq} positions, prompt has {len(prompt_ids)}")


# ------------------------------------------------------------------------------------------------ store


class KVStore:
    """Caches waiting to be fetched: bounded by count and bytes, expired after `ttl` seconds."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 2 << 30, ttl: float = 60.0):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, KVEntry] = OrderedDict()
        self._bytes = 0
        self.expired = 0
        self.evicted = 0

    def _drop(self, tid: str) -> KVEntry:
        e = self._entries.pop(tid)
        self._bytes -= e.nbytes
        return e

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for tid in [t for t, e in self._entries.items() if now - e.created > self.ttl]:
                self._drop(tid)
                self.expired += 1

    def put(self, entry: KVEntry) -> str:
        tid = uuid.uuid4().hex
        self.sweep()
        with self._lock:
            self._entries[tid] = entry
            self._bytes += entry.nbytes
            while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
                oldest = next(iter(self._entries))
                if oldest == tid:
                    break
                self._drop(oldest)
                self.evicted += 1
        return tid

    def pop(self, tid: str) -> KVEntry | None:
        self.sweep()
        with self._lock:
            return self._drop(tid) if tid in self._entries else None

    def clear(self) -> None:
        """Drop every entry (e.g. after new weights were loaded: the caches belong to the old ones)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def tokens(self) -> int:
        with self._lock:
            return sum(len(e.prompt_ids) for e in self._entries.values())
