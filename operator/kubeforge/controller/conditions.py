"""metav1.Condition handling, as Kubernetes' own controllers do it.

Setters return whether anything changed; lastTransitionTime moves only when the status flips; the clock is
passed in so tests control time.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from kubeforge.api.status import READY, RECONCILING, STALLED, Condition


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.status == "True"


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> bool:
    """Set (or add) one condition in place; True when the list changed."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = find(conditions, type_)
    if old is None:
        conditions.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=rfc3339(now),
                observed_generation=generation,
            )
        )
        return True
    changed = (old.status, old.reason, old.message, old.observed_generation) != (value, reason, message, generation)
    if old.status != value:
        old.last_transition_time = rfc3339(now)
    old.status, old.reason, old.message, old.observed_generation = value, reason, message, generation
    return changed


def set_kstatus(
    conditions: list[Condition], *, ready: bool, reconciling: bool, stalled: bool, reason: str, message: str,
    generation: int | None, now: datetime,
) -> bool:
    """Ready / Reconciling / Stalled together, the way kstatus (Argo CD, Flux) reads them.

    kstatus: Reconciling means the controller is still converging; Stalled that it has given up. An object
    is never both, so Stalled wins.
    """
    reconciling = reconciling and not stalled
    changed = set_condition(conditions, READY, ready, reason, message, generation, now)
    changed |= set_condition(conditions, RECONCILING, reconciling, reason, message if reconciling else "", generation, now)
    changed |= set_condition(conditions, STALLED, stalled, reason, message if stalled else "", generation, now)
    return changed
