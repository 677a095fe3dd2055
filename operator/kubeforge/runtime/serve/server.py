"""A uvicorn server that drains on SIGTERM instead of closing its socket at once.

Kubernetes sends SIGTERM when a pod is deleted (scale-down, rollout) while Services and the router may still
route to it for a moment. On the first SIGTERM/SIGINT the server calls `begin_drain()` (the app flips its
readiness to 503), keeps serving for at least `min_drain_s`, and exits once `is_drained()` holds or
`drain_timeout` passes. A second signal exits at once. terminationGracePeriodSeconds must exceed
drain_timeout + 5.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import uvicorn

log = logging.getLogger("kubeforge.serve.server")


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        begin_drain: Callable[[], None],
        is_drained: Callable[[], bool],
        drain_timeout: float = 30.0,
        min_drain_s: float = 0.0,
    ):
        super().__init__(config)
        self.begin_drain = begin_drain
        self.is_drained = is_drained
        self.drain_timeout = drain_timeout
        self.min_drain_s = min_drain_s
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            return super().handle_exit(sig, frame)  # a second signal: stop now
        self.draining = True
        self.begin_drain()
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        start = time.monotonic()
        deadline = start + self.drain_timeout
        while time.monotonic() < deadline:
            if time.monotonic() - start >= self.min_drain_s and self.is_drained():
                break
            time.sleep(0.05)
        log.info("drained after %.1fs (complete: %s); exiting", time.monotonic() - start, self.is_drained())
        self.should_exit = True


def serve(app, host: str, port: int, begin_drain, is_drained, drain_timeout: float, min_drain_s: float = 0.0):
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,  # the drain already waited for in-flight work
        timeout_keep_alive=30,
    )
    DrainingServer(config, begin_drain, is_drained, drain_timeout, min_drain_s).run()
