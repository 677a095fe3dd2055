"""kubeforge-provenance.json: where an exported model came from, written into every exported model folder.

    {"schema": "kubeforge.dev/provenance/v1", "kind": "RLJob", "name": "...", "namespace": "...", "uid": "...",
     "created": "2026-01-01T00:00:00Z", "output": "s3://.../final",
     "source": {"uri": "s3://.../final", "provenance": {...the source folder's own file...}}  (or null: from scratch)
     "data": ["s3://..."], "steps": 40, "tokens": 1234,
     "metrics": {"loss": 1.2} | {"reward": 0.8, "initialReward": 0.1},
     "evals": {...}}   (ContextExtensionJob: every stage's perplexity and needle score)

The source's provenance is nested whole, so the folder at the end of a chain carries the chain. `summary`
is the short form that travels where space is scarce (a container's termination message, 4 KiB): the
same fields, the nested sources summarised too, large parts dropped first when it does not fit.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILE_NAME = "kubeforge-provenance.json"
SCHEMA = "kubeforge.dev/provenance/v1"
SUMMARY_MAX_BYTES = 3500  # under Kubernetes' 4096-byte termination message, with room for the wrapper


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The provenance in a model folder; None when it has none (or an unreadable one)."""
    if model_dir is None:
        return None
    try:
        data = json.loads((Path(model_dir) / FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record(job: dict[str, Any], *, source_uri: str | None, source_dir: str | Path | None, data: list[str],
           steps: int, tokens: int | None = None, metrics: dict[str, Any] | None = None,
           evals: dict[str, Any] | None = None, output: str | None = None,
           created: str | None = None) -> dict[str, Any]:
    """The provenance of a model a job exports. `job` is the job file the operator mounted (kind, metadata)."""
    meta = job.get("metadata") or {}
    return {
        "schema": SCHEMA,
        "kind": job.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "created": created or now_rfc3339(),
        "output": output,
        "source": {"uri": source_uri, "provenance": read(source_dir)} if source_uri else None,
        "data": list(data),
        "steps": steps,
        "tokens": tokens,
        "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (metrics or {}).items()},
        "evals": evals or {},
    }


def write(model_dir: str | Path, prov: dict[str, Any]) -> Path:
    path = Path(model_dir) / FILE_NAME
    path.write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return path


def summary(prov: dict[str, Any], max_bytes: int = SUMMARY_MAX_BYTES) -> dict[str, Any]:
    """The short form: identity, steps, metrics, evals, created, data, and the source chain summarised."""
    def short(p: dict[str, Any]) -> dict[str, Any]:
        out = {k: p.get(k) for k in ("kind", "name", "uid", "created", "steps", "metrics", "evals", "data")
               if p.get(k) not in (None, {}, [])}
        src = p.get("source") or {}
        if src.get("uri"):
            nested = src.get("provenance")
            out["source"] = {"uri": src["uri"], **({"provenance": short(nested)} if isinstance(nested, dict) else {})}
        return out

    out = short(prov)
    # too long: drop the bulkiest parts (at every level of the chain) until it fits
    for key in ("evals", "data", "uid"):
        if len(json.dumps(out)) <= max_bytes:
            break
        _drop_everywhere(out, key)
    return out


def _drop_everywhere(p: dict[str, Any], key: str) -> None:
    nested = (p.get("source") or {}).get("provenance")
    if isinstance(nested, dict):
        _drop_everywhere(nested, key)
    p.pop(key, None)


def chain(prov: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The provenance records from this model back to the first one: [self, source, source's source, ...]."""
    out = []
    while isinstance(prov, dict):
        out.append(prov)
        prov = (prov.get("source") or {}).get("provenance")
    return out


__all__ = ["FILE_NAME", "SCHEMA", "chain", "read", "record", "summary", "write"]
