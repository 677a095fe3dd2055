"""What a `from: {kind, name}` reference resolves to, from the referenced object as read: its output URI once it
Succeeded, why we wait while it has not, a failure when it failed. Pure; the caller fetches the object.
Used by RLJob's `reward.model.from` (controller/rl.py); the same rule as `model.from`."""

from __future__ import annotations

from typing import Any

from .training import Source


def source_of(kind: str, name: str, src: dict[str, Any] | None, field: str) -> Source:
    if src is None:
        return Source(waiting=f"waiting for {kind} {name} to exist ({field})")
    status = src.get("status") or {}
    phase = status.get("phase")
    uri = (status.get("output") or {}).get("uri")
    if phase == "Failed":
        return Source(failed=f"{kind} {name} failed, so {field} has no output")
    if phase != "Succeeded" or not uri:
        return Source(waiting=f"waiting for {kind} {name} to succeed ({field}; now {phase or 'Pending'})")
    return Source(uri=str(uri))


__all__ = ["source_of"]
