"""Reconciles due later: the `requeue_after` a reconcile returns, and pod events folded into one reconcile.

kopf has no work queue: an event handler runs once per event, and a timer fires for every object whether
it needs it or not. This is the missing piece of controller-runtime's `RequeueAfter`: one deadline per
object (the earliest asked for wins, so a burst of pod events becomes one reconcile), a single scheduling
thread and a few workers; a failed reconcile is tried again with backoff.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

RETRY_MIN_S, RETRY_MAX_S = 1.0, 300.0


class Requeue:
    def __init__(self, run: Callable[[Hashable], float | None], workers: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.clock = run, clock
        self._due: dict[Hashable, float] = {}  # key -> its one pending deadline
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._failures: dict[Hashable, int] = {}
        self._cv = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="requeue")
        self._thread = threading.Thread(target=self._loop, name="requeue", daemon=True)
        self._thread.start()

    def after(self, key: Hashable, seconds: float) -> None:
        """Reconcile `key` in `seconds`, unless it is already due sooner."""
        due = self.clock() + max(0.0, seconds)
        with self._cv:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            self._cv.notify()

    def pending(self, key: Hashable) -> bool:
        with self._cv:
            return key in self._due

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped:
                    while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                        heapq.heappop(self._heap)  # superseded by an earlier deadline, or already run
                    wait = self._heap[0][0] - self.clock() if self._heap else None
                    if wait is not None and wait <= 0:
                        break
                    self._cv.wait(wait)
                if self._stopped:
                    return
                _, _, key = heapq.heappop(self._heap)
                del self._due[key]
            self._pool.submit(self._run, key)

    def _run(self, key: Hashable) -> None:
        try:
            again = self.run(key)
        except Exception as exc:  # noqa: BLE001 - retried with backoff, like kopf's TemporaryError
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (n - 1))
            log.warning("reconcile of %s failed (%s); again in %.0fs", key, exc, delay, exc_info=n == 1)
            self.after(key, delay)
            return
        self._failures.pop(key, None)
        if again is not None:
            self.after(key, again)
