"""Helpers to run serving processes on loopback: for tests and benchmarks, not for production paths."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from . import metrics as m

OPERATOR_DIR = str(Path(__file__).resolve().parents[3])  # .../operator (the source root)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (with these labels) on a server's /metrics."""
    return m.sum_samples(m.parse_text(httpx.get(url + "/metrics").text), name, **labels)


def sse_events(resp: httpx.Response) -> list:
    """The data of each server-sent event of a streamed response (JSON decoded, "[DONE]" as is)."""
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


class Proc:
    """`python -m <module> <args>` in a subprocess, with the package importable."""

    def __init__(
        self,
        module: str,
        args: list[str],
        port: int,
        ready_path: str = "/health",
        env: dict | None = None,
        log_path: str | None = None,
    ):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        e = dict(os.environ)
        e["PYTHONPATH"] = OPERATOR_DIR + os.pathsep + e.get("PYTHONPATH", "")
        e.setdefault("OMP_NUM_THREADS", "1")
        e.update(env or {})
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=e,
            stdout=self._log,
            stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
        )
        self.ready_path = ready_path

    def wait(self, timeout: float = 90.0) -> Proc:
        wait_http(self.url + self.ready_path, timeout, self.proc)
        return self

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def engine_proc(
    model_dir: str,
    port: int | None = None,
    role: str = "both",
    name: str = "tiny",
    extra: list[str] | None = None,
    log_path: str | None = None,
) -> Proc:
    port = port or free_port()
    args = [
        "--model",
        model_dir,
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--role",
        role,
        "--threads",
        "1",
        "--log-level",
        "warning",
        *(extra or []),
    ]
    return Proc("kubeforge.runtime.serve.engine", args, port, "/v1/models", log_path=log_path)


class ThreadServer:
    """A uvicorn server for a Starlette app on a background thread (no signal handlers)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # older uvicorn
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
