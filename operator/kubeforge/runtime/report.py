"""Progress reports from rank 0 to the operator, and the container's termination message.

Modes (env KUBEFORGE_PROGRESS):
- `pod-annotation` (default in a cluster): merge-patch contract.PROGRESS_ANNOTATION on the pod's own object
  (KUBEFORGE_POD_NAME / KUBEFORGE_POD_NAMESPACE) with the in-cluster client; the pod's ServiceAccount needs
  only `patch` on that pod.
- `file:<path>`: append one JSON object per line (local runs and tests).
- `off`.

Reports go through a background thread and a bounded queue, so a slow or failing API server never slows
or stops training: failures are logged and the next report tries again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import contract

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Progress:
    """What rank 0 reports; serialised with the camelCase keys the operator reads."""

    step: int
    total_steps: int
    tokens: int
    loss: float | None = None
    tokens_per_second: float | None = None
    last_checkpoint: dict[str, Any] | None = None  # {"uri", "step", "time"}
    output_uri: str | None = None
    time: str = ""
    reward: float | None = None  # RLJob: mean reward of the latest batch
    rl: dict[str, Any] | None = None  # RLJob: the status.rl block (camelCase keys)
    extra: dict[str, Any] | None = None  # kind-specific keys (ContextExtensionJob: stage, stages)

    def to_json(self) -> dict[str, Any]:
        """JSON the API server accepts: a non-finite loss (a diverged run) is null plus `lossNonFinite`
        ("nan", "inf"), never a bare NaN, which would make every report a 400."""
        d: dict[str, Any] = {
            "step": self.step,
            "totalSteps": self.total_steps,
            "tokens": self.tokens,
            "loss": _finite(self.loss, 6),
            "tokensPerSecond": _finite(self.tokens_per_second, 1),
            "lastCheckpoint": self.last_checkpoint,
            "time": self.time or now_rfc3339(),
        }
        if self.loss is not None and d["loss"] is None:
            d["lossNonFinite"] = str(float(self.loss))
        if self.output_uri:
            d["outputUri"] = self.output_uri
        if self.reward is not None:
            d["reward"] = round(float(self.reward), 6)
        if self.rl is not None:
            d["rl"] = self.rl
        if self.extra:
            d.update(self.extra)
        return d


def _finite(x: float | None, digits: int) -> float | None:
    return round(float(x), digits) if x is not None and math.isfinite(float(x)) else None


class Sink:
    def send(self, payload: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class FileSink(Sink):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, payload: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(payload, allow_nan=False) + "\n")


class PodAnnotationSink(Sink):
    def __init__(self, name: str, namespace: str) -> None:
        from kubernetes import client, config

        config.load_incluster_config()
        self.api = client.CoreV1Api()
        self.name, self.namespace = name, namespace

    def send(self, payload: dict[str, Any]) -> None:
        annotation = json.dumps(payload, allow_nan=False)
        body = {"metadata": {"annotations": {contract.PROGRESS_ANNOTATION: annotation}}}
        self.api.patch_namespaced_pod(self.name, self.namespace, body, _request_timeout=10)


def sink_from_env(env: Any = None) -> Sink | None:
    env = os.environ if env is None else env
    in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST"))
    mode = env.get(contract.ENV_PROGRESS_MODE) or ("pod-annotation" if in_cluster else "off")
    try:
        if mode == "off":
            return None
        if mode.startswith("file:"):
            return FileSink(mode[len("file:"):])
        if mode == "pod-annotation":
            name, ns = env.get(contract.ENV_POD_NAME), env.get(contract.ENV_POD_NAMESPACE)
            if not name or not ns:
                log.warning("progress: %s/%s not set; reporting off", contract.ENV_POD_NAME,
                            contract.ENV_POD_NAMESPACE)
                return None
            return PodAnnotationSink(name, ns)
        log.warning("progress: unknown mode %r; reporting off", mode)
    except Exception as exc:  # noqa: BLE001 - reporting never stops training
        log.warning("progress: cannot set up %r (%s); reporting off", mode, exc)
    return None


class Reporter:
    """Rate-limited, non-blocking progress reports (rank 0 only; other ranks get a disabled one)."""

    def __init__(self, sink: Sink | None, min_interval: float = MIN_INTERVAL_S) -> None:
        self.sink = sink
        self.min_interval = min_interval
        self._last_sent = -1e9
        self._pending: deque[dict[str, Any]] = deque(maxlen=64)  # oldest dropped if the sink stalls
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if sink is not None:
            self._thread = threading.Thread(target=self._run, name="progress-report", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    def report(self, progress: Progress, force: bool = False) -> bool:
        """Queue a report; without `force` it is dropped if one was sent less than min_interval ago."""
        if self.sink is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval:
            return False
        self._last_sent = now
        with self._cv:
            self._pending.append(progress.to_json())
            self._cv.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending and self._closed:
                    return
                payload = self._pending.popleft()
                self._busy = True
            try:
                self.sink.send(payload)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - never let reporting kill training
                log.warning("progress report failed: %s", exc)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the newest queued report has been sent."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.01, deadline - time.monotonic()))

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def write_termination_message(payload: dict[str, Any], env: Any = None) -> None:
    """Write the result (or the failure reason) where Kubernetes reads the termination message; never raises.

    Kubernetes keeps at most 4096 bytes, so long messages are cut."""
    env = os.environ if env is None else env
    path = env.get(contract.ENV_TERMINATION_LOG) or contract.DEFAULT_TERMINATION_LOG
    data = json.dumps(payload)
    if len(data) > 4000 and "message" in payload:
        payload = dict(payload, message=str(payload["message"])[: 3000] + "...")
        data = json.dumps(payload)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(data)
    except OSError as exc:
        log.info("termination message not written to %s (%s): %s", path, exc, data)
