"""The operator's own writes, coming back on the watch.

Every create, patch and delete the reconciler sends is answered with the object's new resourceVersion, and
the watch then delivers that very version as an event: an echo. An echo carries nothing the reconcile that
wrote it did not already decide on (that reconcile asked for its own requeue if it needed one), so
reconciling on it would only cost a GET and a LIST: for a new gang, one for the status write and one per pod
created. Any other version (someone else's change, a pod that started or failed, a relist after a watch
restart) is news and reconciles as before.

Versions are compared for equality only (they are opaque). An older version seen after our write returned
(the watch lags) is news to nobody but is reconciled anyway, which is merely redundant; an expectation whose
echo never comes (a watch restart relisted past it) is replaced by our next write to that object or pushed
out by newer ones. Either costs at most one needless reconcile and never skips a change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

Key = tuple[str, str, str]  # (plural, namespace, name)


class Echoes:
    def __init__(self, capacity: int = 20000) -> None:
        self.capacity = capacity
        self._expected: OrderedDict[Key, str] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, plural: str, body: Any) -> None:
        """Remember the version a write of ours produced (`body`: the API server's answer)."""
        meta = body.get("metadata") if isinstance(body, dict) else None
        if not meta or body.get("kind") == "Status" or not meta.get("resourceVersion") or not meta.get("name"):
            return
        key = (plural, meta.get("namespace") or "", meta["name"])
        with self._lock:
            self._expected[key] = meta["resourceVersion"]
            self._expected.move_to_end(key)
            while len(self._expected) > self.capacity:
                self._expected.popitem(last=False)

    def is_echo(self, plural: str, namespace: str | None, name: str, resource_version: str | None) -> bool:
        """Whether this version of the object is the one we last wrote (each echo is recognised once)."""
        key = (plural, namespace or "", name)
        with self._lock:
            expected = self._expected.get(key)
            if expected is None:
                return False
            if expected == resource_version:
                del self._expected[key]
                return True
            return False

    def __len__(self) -> int:
        return len(self._expected)


__all__ = ["Echoes"]
