"""model.from, resolved: which output of which producing object a consumer uses (pure).

A consumer (any kind with `spec.model.from`) waits while its source does not exist or has not succeeded
(reason WaitingForModel), fails when its source failed (reason SourceFailed), and otherwise takes the
source's `status.output.uri` and pins it in its own `status.source` together with the source's uid and
generation. From then on the pin is what it uses, whatever happens to the source: a source re-created under
the same name (another uid), failed or deleted afterwards changes nothing for a consumer that already
resolved it. A consumer that has not resolved yet follows whichever object carries the name when it does.
Pointing `model.from` at another object drops the pin (it no longer describes the spec).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubeforge.api.status import SourceRef

from .conditions import rfc3339

WAITING_FOR_MODEL = "WaitingForModel"
SOURCE_FAILED = "SourceFailed"


@dataclass
class Source:
    """model.from resolved: the output URI to use (and its pin), or why not yet, or why never."""

    uri: str | None = None
    waiting: str | None = None
    failed: str | None = None
    pinned: SourceRef | None = None  # set when uri came from model.from
    reason: str = WAITING_FOR_MODEL  # the condition reason while waiting


def pinned_source(status: dict[str, Any] | None, kind: str, name: str) -> SourceRef | None:
    """The pin in a consumer's status, if it still describes model.from {kind, name}."""
    raw = (status or {}).get("source")
    if not isinstance(raw, dict) or not raw.get("uri"):
        return None
    try:
        ref = SourceRef.model_validate(raw)
    except ValueError:
        return None
    return ref if (ref.kind, ref.name) == (kind, name) else None


def failure_detail(src_status: dict[str, Any]) -> str:
    """The source's own account of its failure: its Failed condition, else its message."""
    for c in src_status.get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason', 'Failed')}: {c.get('message', '')}".rstrip(": ")
    return str(src_status.get("message") or "no reason given")


def resolve(kind: str, name: str, consumer_status: dict[str, Any] | None, source_obj: dict[str, Any] | None,
            now: datetime) -> Source:
    """Resolve model.from {kind, name} for a consumer whose status is `consumer_status`, given the source
    object as read now (None: it does not exist)."""
    pin = pinned_source(consumer_status, kind, name)
    if pin is not None:
        return Source(uri=pin.uri, pinned=pin)
    if source_obj is None:
        return Source(waiting=f"waiting for {kind} {name} to exist (model.from)")
    st = source_obj.get("status") or {}
    phase = st.get("phase") or "Pending"
    uri = (st.get("output") or {}).get("uri")
    if phase == "Failed":
        return Source(failed=f"{kind} {name} failed ({failure_detail(st)}), so model.from has no output")
    if phase != "Succeeded" or not uri:
        return Source(waiting=f"waiting for {kind} {name} to succeed (model.from; now {phase})")
    meta = source_obj.get("metadata") or {}
    pin = SourceRef(kind=kind, name=name, uid=meta.get("uid"), generation=meta.get("generation"), uri=uri,
                    resolved_at=rfc3339(now))
    return Source(uri=uri, pinned=pin)


__all__ = ["SOURCE_FAILED", "WAITING_FOR_MODEL", "Source", "failure_detail", "pinned_source", "resolve"]
