"""The dev cluster's node agent: a kubelet without containers.

It registers N Nodes, keeps their Lease and Ready condition fresh, and runs every pod bound to them as local
processes (one process group per container, the image ignored). Each pod gets its own loopback address
(127.0.<10+node>.<n>) as podIP. Cluster DNS names are published in a hosts file that the Python shim in
`shim/sitecustomize.py` consults; volumes are directories under the pod's state dir, and the shim maps
mountPaths onto them. See docs/dev-cluster.md for what is emulated and what is not.

Event-driven: one watch on pods, one on services; one thread per pod that sleeps until the watch, a process
exit or a probe deadline wakes it.

    python -m kubeforge.devcluster.nodeagent --kubeconfig K --state-dir S --nodes 2 --gpus-per-node 2
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from . import podenv
from .assets import K8S_VERSION as KUBELET_VERSION
from .podenv import ConfigError
from .procs import kill_group, proc_start_ticks
from .proxy import ServiceProxy, target_port

log = logging.getLogger("kubeforge.devcluster.nodeagent")

SHIM_DIR = Path(__file__).resolve().parent / "shim"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"
# Env the agent passes through from its own environment (everything else a pod sees comes from its spec),
# so the admin kubeconfig never leaks into pods.
PASSTHROUGH_ENV = (
    "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE", "TORCH_HOME", "XDG_CACHE_HOME", "OMP_NUM_THREADS",
)
RESTART_BACKOFF_BASE_S = 2.0  # the kubelet uses 10 s; shorter here so crash-loop tests stay quick
RESTART_BACKOFF_MAX_S = 60.0


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def ts(t: dt.datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


# ------------------------------------------------------------------------------------------------ informer


class Informer(threading.Thread):
    """List+watch one resource kind into a dict cache of raw (camelCase) objects, calling on_change."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        on_change: Callable[[str, dict[str, Any]], None],
    ) -> None:
        super().__init__(name=f"informer-{name}", daemon=True)
        self.list_fn = list_fn
        self.on_change = on_change
        self.cache: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self.stop = threading.Event()

    @staticmethod
    def key(obj: dict[str, Any]) -> str:
        m = obj["metadata"]
        return f"{m.get('namespace', '')}/{m['name']}"

    def _relist(self) -> str:
        resp = self.list_fn(_preload_content=False)
        data = json.loads(resp.data)
        fresh = {self.key(o): o for o in data.get("items") or []}
        for k in list(self.cache):
            if k not in fresh:
                old = self.cache.pop(k)
                self.on_change("DELETED", old)
        for k, o in fresh.items():
            self.cache[k] = o
            self.on_change("MODIFIED", o)
        self.synced.set()
        return str(data["metadata"]["resourceVersion"])

    def run(self) -> None:
        rv: str | None = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                w = watch.Watch()
                for ev in w.stream(self.list_fn, resource_version=rv, timeout_seconds=240,
                                   allow_watch_bookmarks=True):
                    typ, obj = ev["type"], ev["raw_object"]
                    if typ == "ERROR":
                        rv = None
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if typ == "BOOKMARK":
                        continue
                    k = self.key(obj)
                    if typ == "DELETED":
                        self.cache.pop(k, None)
                    else:
                        self.cache[k] = obj
                    self.on_change(typ, obj)
            except ApiException as e:
                if e.status != 410:
                    log.warning("%s: watch failed: %s", self.name, e.reason)
                    time.sleep(1)
                rv = None
            except Exception as e:  # noqa: BLE001  connection reset, API server restart, bad event: relist
                if self.stop.is_set():
                    return
                log.warning("%s: watch interrupted: %s", self.name, e)
                time.sleep(1)
                rv = None


# ------------------------------------------------------------------------------------------------ kubelet API


def instance_span(log_path: Path, previous: bool) -> tuple[int, int | None] | None:
    """Byte range of the current (or previous) container instance in its log; end None = to the end."""
    try:
        starts = [int(x) for x in log_path.with_suffix(".starts").read_text().split()]
    except (OSError, ValueError):
        starts = [0] if log_path.exists() else []
    if previous:
        return (starts[-2], starts[-1]) if len(starts) >= 2 else None
    return (starts[-1], None) if starts else None


def select_log(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


class KubeletServer:
    """The part of the kubelet API the API server proxies for `kubectl logs`: GET /containerLogs/ns/pod/c with
    follow, previous, tailLines and limitBytes, over TLS with the cluster CA, client certificates required
    (the API server presents --kubelet-client-certificate). Exec, attach and port-forward are not served."""

    def __init__(self, agent: NodeAgent, port: int, cert: Path, key: Path, ca: Path) -> None:
        self.agent = agent
        srv = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                srv.handle(self)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, name="kubelet-api", daemon=True).start()

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(h.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            return self._reply(h, 200, b"ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._reply(h, 404, b"not served by the kubeforge dev-cluster node agent (only containerLogs)")
        _, ns, pod, container = parts
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        worker = self.agent.worker_for(ns, pod)
        run = None
        if worker is not None:
            run = next((c for c in worker.inits + worker.mains if c.name == container), None)
        log_path = self.agent.state_dir / "pods" / f"{ns}_{pod}" / f"{container}.log"
        if run is None and not log_path.exists():
            return self._reply(h, 404, f"container {container!r} in pod {ns}/{pod} not found".encode())
        previous = q.get("previous") in ("true", "1")
        span = instance_span(log_path, previous)
        if span is None:
            msg = (f'previous terminated container "{container}" in pod "{pod}" not found' if previous
                   else f'container "{container}" in pod "{pod}" is waiting to start')
            return self._reply(h, 400, msg.encode())
        start, end = span
        with open(log_path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
            tail = int(q["tailLines"]) if q.get("tailLines", "").lstrip("-").isdigit() else None
            limit = int(q["limitBytes"]) if q.get("limitBytes", "").isdigit() else None
            out = select_log(data, tail, limit)
            follow = q.get("follow") in ("true", "1") and not previous and end is None
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            try:
                self._chunk(h, out)
                sent = len(out)
                while follow and (limit is None or sent < limit):
                    chunk = f.read()
                    if chunk:
                        chunk = chunk if limit is None else chunk[:limit - sent]
                        self._chunk(h, chunk)
                        sent += len(chunk)
                        continue
                    if run is None or run.state != "running" or self.agent.worker_for(ns, pod) is not worker:
                        self._chunk(h, f.read())
                        break
                    time.sleep(0.2)
                h.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client stopped following

    @staticmethod
    def _chunk(h: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
        if data:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

    @staticmethod
    def _reply(h: http.server.BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


# ------------------------------------------------------------------------------------------------ probes


def run_probe(probe: dict[str, Any], pod_ip: str, container: dict[str, Any], env: dict[str, str],
              cwd: str) -> tuple[bool, str]:
    timeout = float(probe.get("timeoutSeconds") or 1)

    def port_of(p: Any) -> int:
        if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
            return int(p)
        for cp in container.get("ports") or []:
            if cp.get("name") == p:
                return int(cp["containerPort"])
        raise ValueError(f"unknown named port {p!r}")

    try:
        if probe.get("httpGet"):
            hg = probe["httpGet"]
            host = hg.get("host") or pod_ip
            port = port_of(hg.get("port"))
            conn: http.client.HTTPConnection
            if (hg.get("scheme") or "HTTP").upper() == "HTTPS":
                conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                   context=ssl._create_unverified_context())
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            headers = {h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
            headers.setdefault("User-Agent", f"kube-probe/{KUBELET_VERSION.lstrip('v').rsplit('.', 1)[0]}")
            try:
                conn.request("GET", hg.get("path") or "/", headers=headers)
                code = conn.getresponse().status
            finally:
                conn.close()
            return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"
        if probe.get("tcpSocket"):
            ts_ = probe["tcpSocket"]
            with socket.create_connection((ts_.get("host") or pod_ip, port_of(ts_["port"])), timeout=timeout):
                return True, ""
        if probe.get("exec"):
            cmd = podenv.resolve_argv0(list(probe["exec"].get("command") or []))
            r = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True, check=False)
            return r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")[-500:]
    except Exception as e:  # noqa: BLE001  whatever goes wrong, the probe failed
        return False, str(e)
    return True, ""


@dataclass
class ProbeState:
    spec: dict[str, Any]
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    ok: bool = False


# ------------------------------------------------------------------------------------------------ containers


@dataclass
class ContainerRun:
    spec: dict[str, Any]
    init: bool
    log_path: Path
    term_path: Path
    proc: subprocess.Popen[bytes] | None = None
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    ready: bool = False
    started: bool = False
    restart_at: float = 0.0
    killed_by_probe: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    probes: dict[str, ProbeState] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def terminated_dict(self) -> dict[str, Any]:
        return {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "message": self.message or None,
            "startedAt": ts(self.started_at),
            "finishedAt": ts(self.finished_at),
            "containerID": f"devcluster://{self.proc.pid}" if self.proc else None,
        }

    def status(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": ts(self.started_at)}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_dict()}
        else:
            state = {"waiting": {"reason": self.reason, "message": self.message or None}}
        image = self.spec.get("image") or "none"
        return {
            "name": self.name,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
            "ready": self.ready,
            "started": self.started if not self.init else None,
            "restartCount": self.restart_count,
            "image": image,
            "imageID": f"devcluster://{image}",
            "containerID": f"devcluster://{self.proc.pid}" if self.proc and self.state != "waiting" else None,
        }


# ------------------------------------------------------------------------------------------------ pods


def descendants(root: int) -> list[int]:
    """Every live descendant of a process (from /proc's parent pids), whatever session or group it is in."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class PodWorker(threading.Thread):
    """Runs one pod: volumes, init containers, containers, probes, restarts, status, graceful deletion."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any], node_index: int) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.node_index = node_index
        self.dir = agent.state_dir / "pods" / f"{self.ns}_{self.pod_name}"
        self.wake = threading.Event()
        self.gone = False  # the API object is gone (force-deleted)
        self.lost = False  # its node died (stop_node): processes killed, nothing more reported
        self.done = False
        self.ip: str | None = None
        self.start_time: dt.datetime | None = None
        self.mounts: dict[str, str] = {}
        self.volumes_ready = False
        self.config_error = ""
        self.last_status: str = ""
        self.transitions: dict[str, tuple[str, str]] = {}
        spec = pod["spec"]
        self.inits = [self._run(c, True) for c in spec.get("initContainers") or []]
        self.mains = [self._run(c, False) for c in spec.get("containers") or []]

    def _run(self, c: dict[str, Any], init: bool) -> ContainerRun:
        return ContainerRun(spec=c, init=init, log_path=self.dir / f"{c['name']}.log",
                            term_path=self.dir / "termination" / c["name"])

    # --- plumbing
    def lose(self) -> None:
        self.lost = True
        self.wake.set()

    def update(self, pod: dict[str, Any] | None) -> None:
        if pod is None:
            self.gone = True
        else:
            self.pod = pod
        self.wake.set()

    @property
    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy") or "Always")

    def event(self, reason: str, message: str, typ: str = "Normal", field_path: str | None = None) -> None:
        self.agent.event(self.pod, reason, message, typ, field_path)

    # --- main loop
    def run(self) -> None:
        try:
            self._prepare_dir()
            self.ip = self.agent.ips.allocate(self.uid, self.node_index, (self.pod.get("status") or {}).get("podIP"))
            self.start_time = now()
            while True:
                if self.lost:  # a machine that dies sends no SIGTERM and reports nothing
                    for c in self.inits + self.mains:
                        if c.proc is not None and c.proc.poll() is None:
                            # children in sessions of their own (torchrun's workers) die with the machine too
                            for pid in descendants(c.proc.pid):
                                try:
                                    os.kill(pid, signal.SIGKILL)
                                except OSError:
                                    pass
                            kill_group(c.proc.pid, signal.SIGKILL)
                            c.proc.wait()
                            self._poll(c)
                    return
                if self.gone or self.pod["metadata"].get("deletionTimestamp"):
                    self._terminate()
                    return
                if not self.done:
                    self._step()
                    self._report()
                timeout = self._next_wake()
                self.wake.wait(timeout)
                self.wake.clear()
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.ns, self.pod_name)
            self._kill_all(grace=2)
        finally:
            self.agent.ips.release(self.uid)
            self.agent.forget(self)

    def _prepare_dir(self) -> None:
        marker = self.dir / ".uid"
        if self.dir.exists() and (not marker.exists() or marker.read_text() != self.uid):
            shutil.rmtree(self.dir, ignore_errors=True)  # an older pod of the same name
        (self.dir / "termination").mkdir(parents=True, exist_ok=True)
        marker.write_text(self.uid)

    def _next_wake(self) -> float | None:
        if self.done:
            return None
        t = time.monotonic()
        deadlines: list[float] = []
        config_wait = any(c.state == "waiting" and c.reason == "CreateContainerConfigError"
                          for c in self.inits + self.mains)
        if not self.volumes_ready or self.config_error or config_wait:
            deadlines.append(t + 2)  # a missing Secret/ConfigMap may appear: retry
        for c in self.inits + self.mains:
            if c.state == "running":
                deadlines += [p.next_at for p in c.probes.values() if self._probe_active(c, p)]
            if c.restart_at:
                deadlines.append(c.restart_at)
        if not deadlines:
            return None
        return max(0.05, min(deadlines) - t)

    # --- one reconcile step
    def _step(self) -> None:
        if not self.volumes_ready:
            try:
                self._materialise_volumes()
                self.volumes_ready = True
                self.config_error = ""
            except ConfigError as e:
                self._set_waiting_all("ContainerCreating", f"volume: {e}")
                return
        for c in self.inits + self.mains:
            self._poll(c)
        # init containers, in order
        for c in self.inits:
            if c.state == "terminated" and c.exit_code == 0:
                continue
            if c.state == "running":
                return
            if c.state == "terminated" and self.restart_policy == "Never":
                return  # pod failed
            self._maybe_start(c)
            return
        for c in self.mains:
            if c.state == "waiting" or (c.state == "terminated" and self._should_restart(c)):
                self._maybe_start(c)
        for c in self.mains:
            if c.state == "running":
                self._probe(c)

    def _should_restart(self, c: ContainerRun) -> bool:
        rp = self.restart_policy
        return rp == "Always" or (rp == "OnFailure" and c.exit_code != 0)

    def _set_waiting_all(self, reason: str, message: str) -> None:
        for c in self.inits + self.mains:
            if c.state == "waiting":
                c.reason, c.message = reason, message

    def _maybe_start(self, c: ContainerRun) -> None:
        t = time.monotonic()
        if c.state == "terminated":
            if not c.restart_at:
                delay = min(RESTART_BACKOFF_BASE_S * 2 ** c.restart_count, RESTART_BACKOFF_MAX_S)
                c.restart_at = t + delay
                self.event("BackOff", f"Back-off restarting failed container {c.name}", "Warning")
            if t < c.restart_at:
                return
            c.last_terminated = c.terminated_dict()
            c.restart_count += 1
        c.restart_at = 0.0
        self._start(c)

    def _start(self, c: ContainerRun) -> None:
        spec = c.spec
        try:
            env = self._env(c)
        except ConfigError as e:
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)
            self.config_error = str(e)
            return
        self.config_error = ""
        argv = [podenv.expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not spec.get("command"):
            c.state, c.reason = "waiting", "CreateContainerError"
            c.message = "the dev cluster runs no images: the container needs an explicit `command`"
            self.done = self.restart_policy == "Never"
            return
        argv = podenv.resolve_argv0([podenv.map_arg(a, self.mounts) for a in argv])
        workdir = spec.get("workingDir")
        cwd = podenv.map_path(workdir, self.mounts) if workdir else str(self.dir / "workdir" / c.name)
        if workdir and cwd == workdir and not os.path.isdir(cwd):
            cwd = str(self.dir / "rootfs" / workdir.lstrip("/"))
        os.makedirs(cwd, exist_ok=True)
        c.term_path.unlink(missing_ok=True)
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        # One log file per container, restarts appended; each instance's start offset is recorded so the
        # kubelet API can serve the current instance and `previous` (kubectl logs -p) like a kubelet.
        with open(c.log_path.with_suffix(".starts"), "a") as starts:
            starts.write(f"{c.log_path.stat().st_size if c.log_path.exists() else 0}\n")
        with open(c.log_path, "ab") as logf:
            try:
                proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                c.state, c.reason, c.message = "terminated", "StartError", str(e)
                c.exit_code, c.started_at, c.finished_at = 128, now(), now()
                self.event("Failed", f"Error: {e}", "Warning")
                return
        (self.dir / f"{c.name}.pid").write_text(f"{proc.pid} {proc_start_ticks(proc.pid)}\n")
        c.proc, c.env, c.cwd = proc, env, cwd
        c.state, c.reason, c.message, c.exit_code = "running", "", "", None
        c.started_at, c.finished_at = now(), None
        c.ready = False
        c.killed_by_probe = False
        t = time.monotonic()
        c.probes = {}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if spec.get(kind) and not c.init:
                c.probes[kind] = ProbeState(spec[kind], next_at=t + float(spec[kind].get("initialDelaySeconds") or 0))
        c.started = "startupProbe" not in c.probes
        if not c.init and "readinessProbe" not in c.probes and c.started:
            c.ready = True
        threading.Thread(target=self._reap, args=(proc,), name=f"reap-{proc.pid}", daemon=True).start()
        self.event("Started", f"Started container {c.name}", field_path=f"spec.containers{{{c.name}}}")

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self.wake.set()

    def _poll(self, c: ContainerRun) -> None:
        if c.state != "running" or c.proc is None or c.proc.poll() is None:
            return
        rc = c.proc.returncode
        # A signal death reads as 128+N, like a container runtime reports it.
        c.exit_code = 128 - rc if rc < 0 else rc
        c.finished_at = now()
        c.state = "terminated"
        c.reason = "Completed" if c.exit_code == 0 else "Error"
        c.ready = False
        c.message = self._termination_message(c)
        kill_group(c.proc.pid, signal.SIGKILL)  # stragglers the main process left in its group
        (self.dir / f"{c.name}.pid").unlink(missing_ok=True)

    def _termination_message(self, c: ContainerRun) -> str:
        try:
            msg = c.term_path.read_text(errors="replace")[:4096]
        except OSError:
            msg = ""
        if not msg and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" and c.exit_code:
            try:
                with open(c.log_path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 2048))
                    msg = "\n".join(f.read().decode(errors="replace").splitlines()[-80:])
            except OSError:
                pass
        return msg

    # --- probes
    def _probe_active(self, c: ContainerRun, p: ProbeState) -> bool:
        if p is c.probes.get("startupProbe"):
            return not c.started
        return c.started

    def _probe(self, c: ContainerRun) -> None:
        t = time.monotonic()
        for kind, p in list(c.probes.items()):
            if not self._probe_active(c, p) or t < p.next_at:
                continue
            ok, msg = run_probe(p.spec, self.ip or "127.0.0.1", c.spec, c.env, c.cwd)
            p.next_at = time.monotonic() + float(p.spec.get("periodSeconds") or 10)
            if ok:
                p.successes, p.failures = p.successes + 1, 0
                if p.successes >= int(p.spec.get("successThreshold") or 1):
                    p.ok = True
            else:
                p.failures, p.successes = p.failures + 1, 0
                self.event("Unhealthy", f"{kind[:-5].capitalize()} probe failed: {msg}", "Warning")
                if p.failures >= int(p.spec.get("failureThreshold") or 3):
                    p.ok = False
            if kind == "startupProbe" and p.ok:
                c.started = True
                if "readinessProbe" not in c.probes:
                    c.ready = True
                for other in c.probes.values():  # liveness/readiness start after startup succeeds
                    if other is not p:
                        other.next_at = time.monotonic() + float(other.spec.get("initialDelaySeconds") or 0)
            elif kind == "readinessProbe":
                c.ready = p.ok
            if kind in ("livenessProbe", "startupProbe") and not ok and p.failures >= int(
                p.spec.get("failureThreshold") or 3
            ):
                self.event("Killing", f"Container {c.name} failed {kind[:-5]} probe, will be restarted")
                c.killed_by_probe = True
                self._stop_container(c, self._grace())
                return

    # --- stopping
    def _grace(self) -> float:
        meta = self.pod["metadata"]
        g = meta.get("deletionGracePeriodSeconds")
        if g is None:
            g = self.pod["spec"].get("terminationGracePeriodSeconds")
        return float(30 if g is None else g)

    def _stop_container(self, c: ContainerRun, grace: float) -> None:
        if c.proc is None or c.proc.poll() is not None:
            self._poll(c)
            return
        kill_group(c.proc.pid, signal.SIGTERM)
        try:
            c.proc.wait(timeout=max(grace, 0.0))
        except subprocess.TimeoutExpired:
            kill_group(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
        self._poll(c)

    def _kill_all(self, grace: float) -> None:
        running = [c for c in self.inits + self.mains if c.proc is not None and c.proc.poll() is None]
        for c in running:
            kill_group(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        for c in running:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                kill_group(c.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                c.proc.wait()  # type: ignore[union-attr]
            self._poll(c)

    def _terminate(self) -> None:
        grace = 2.0 if self.gone else self._grace()
        if any(c.state == "running" for c in self.inits + self.mains):
            for c in self.mains:
                if c.state == "running":
                    self.event("Killing", f"Stopping container {c.name}",
                               field_path=f"spec.containers{{{c.name}}}")
        self._kill_all(grace)
        if not self.gone:
            try:
                self._report()
            except ApiException as e:
                log.debug("pod %s/%s: last status update failed: %s", self.ns, self.pod_name, e.reason)
            try:
                self.agent.core.delete_namespaced_pod(
                    self.pod_name, self.ns,
                    body=client.V1DeleteOptions(grace_period_seconds=0,
                                                preconditions=client.V1Preconditions(uid=self.uid)),
                )
            except ApiException as e:
                if e.status not in (404, 409):
                    log.warning("pod %s/%s: final delete failed: %s", self.ns, self.pod_name, e.reason)
        # Keep the logs (for `dev-cluster logs` after the fact); drop volumes and scratch dirs.
        for sub in ("volumes", "rootfs", "workdir"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    # --- env and volumes
    def _lookup(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "secret":
                s = self.agent.core.read_namespaced_secret(name, ns)
                return {k: base64.b64decode(v).decode(errors="replace") for k, v in (s.data or {}).items()}
            cm = self.agent.core.read_namespaced_config_map(name, ns)
            return dict(cm.data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _env(self, c: ContainerRun) -> dict[str, str]:
        pod = dict(self.pod)
        pod["status"] = dict(pod.get("status") or {}, podIP=self.ip, podIPs=[{"ip": self.ip}], hostIP="127.0.0.1")
        spec_env = podenv.container_env(pod, c.spec, self._lookup, self.agent.allocatable)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        venv_bin = os.path.dirname(sys.executable)
        env["PATH"] = f"{venv_bin}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        host, port = self.agent.apiserver
        env.update({
            "HOSTNAME": self._hostname(),
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
        })
        env.update({k: podenv.map_arg(v, self.mounts) for k, v in spec_env.items()})
        mounts = dict(self.mounts)
        mounts[c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG] = str(c.term_path)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(SHIM_DIR)] + ([spec_env["PYTHONPATH"]] if spec_env.get("PYTHONPATH") else [])),
            "KUBEFORGE_DEVCLUSTER": "1",
            "KUBEFORGE_DEVCLUSTER_POD": f"{self.ns}/{self.pod_name}",
            "KUBEFORGE_DEVCLUSTER_NAMESPACE": self.ns,
            "KUBEFORGE_DEVCLUSTER_HOSTNAME": self._hostname(),
            "KUBEFORGE_DEVCLUSTER_HOSTS": str(self.agent.hosts_file),
            "KUBEFORGE_DEVCLUSTER_MOUNTS": json.dumps(mounts),
        })
        env["KUBEFORGE_DEVCLUSTER_POD_IP"] = self.ip or ""
        if self.agent.net_shim is not None:
            env["LD_PRELOAD"] = " ".join(filter(None, [str(self.agent.net_shim), spec_env.get("LD_PRELOAD")]))
        return env

    def _hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.pod_name)[:63]

    def _materialise_volumes(self) -> None:
        vols = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        root = self.dir / "volumes"
        paths: dict[str, Path] = {}
        for name, v in vols.items():
            d = root / name
            if v.get("hostPath"):
                paths[name] = Path(v["hostPath"]["path"])
                if (v["hostPath"].get("type") or "") in ("DirectoryOrCreate", ""):
                    paths[name].mkdir(parents=True, exist_ok=True)
                continue
            d.mkdir(parents=True, exist_ok=True)
            paths[name] = d
            if v.get("configMap"):
                self._write_source(d, "configmap", v["configMap"])
            elif v.get("secret"):
                self._write_source(d, "secret", dict(v["secret"], name=v["secret"].get("secretName")))
            elif v.get("downwardAPI"):
                self._write_downward(d, v["downwardAPI"].get("items") or [])
            elif v.get("projected"):
                for src in v["projected"].get("sources") or []:
                    if src.get("configMap"):
                        self._write_source(d, "configmap", src["configMap"])
                    elif src.get("secret"):
                        self._write_source(d, "secret", src["secret"])
                    elif src.get("downwardAPI"):
                        self._write_downward(d, src["downwardAPI"].get("items") or [])
                    elif src.get("serviceAccountToken"):
                        self._write_sa_token(d, src["serviceAccountToken"])
            # emptyDir and anything unsupported: an empty directory
        mounts: dict[str, str] = {}
        for c in (self.pod["spec"].get("initContainers") or []) + (self.pod["spec"].get("containers") or []):
            for m in c.get("volumeMounts") or []:
                base = paths.get(m["name"])
                if base is None:
                    continue
                host = base / m["subPath"] if m.get("subPath") else base
                if m.get("subPath") and not host.exists():
                    host.mkdir(parents=True, exist_ok=True)
                # One map for the pod: containers mounting different volumes at one path are not supported.
                mounts[m["mountPath"].rstrip("/") or "/"] = str(host)
        self.mounts = mounts

    def _write_source(self, d: Path, kind: str, src: dict[str, Any]) -> None:
        data = self._lookup(kind, self.ns, src["name"])
        if data is None:
            if src.get("optional"):
                return
            raise ConfigError(f"{kind} {src['name']!r} not found")
        items = src.get("items")
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                if src.get("optional"):
                    continue
                raise ConfigError(f"key {key!r} not in {kind} {src['name']!r}")
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(data[key])

    def _write_downward(self, d: Path, items: list[dict[str, Any]]) -> None:
        for it in items:
            if it.get("fieldRef"):
                val = podenv.field_ref(self.pod, it["fieldRef"]["fieldPath"])
            else:
                val = podenv.resource_ref(None, it["resourceFieldRef"], self.agent.allocatable)
            p = d / it["path"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(val)

    def _write_sa_token(self, d: Path, src: dict[str, Any]) -> None:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec = client.V1TokenRequestSpec(
            audiences=[src["audience"]] if src.get("audience") else [],
            expiration_seconds=int(src.get("expirationSeconds") or 3600 * 24),
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1", name=self.pod_name,
                                                           uid=self.uid),
        )
        tr = self.agent.core.create_namespaced_service_account_token(
            sa, self.ns, client.AuthenticationV1TokenRequest(spec=spec))
        p = d / src.get("path", "token")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(tr.status.token)

    # --- status
    def _phase(self) -> str:
        if any(c.state == "terminated" and c.exit_code != 0 for c in self.inits) and self.restart_policy == "Never":
            return "Failed"
        if any(c.state == "waiting" and c.reason == "CreateContainerError" for c in self.mains) \
                and self.restart_policy == "Never":
            return "Failed"
        if not all(c.state == "terminated" and c.exit_code == 0 for c in self.inits):
            return "Pending"
        if any(c.state == "running" for c in self.mains):
            return "Running"
        if all(c.state == "terminated" for c in self.mains):
            if any(self._should_restart(c) for c in self.mains):
                return "Running"
            return "Succeeded" if all(c.exit_code == 0 for c in self.mains) else "Failed"
        if any(c.state == "terminated" or c.restart_count for c in self.mains):
            return "Running"
        return "Pending"

    def _cond(self, typ: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        status = "True" if ok else "False"
        prev = self.transitions.get(typ)
        if prev is None or prev[0] != status:
            self.transitions[typ] = (status, ts(now()) or "")
        c: dict[str, Any] = {"type": typ, "status": status, "lastProbeTime": None,
                             "lastTransitionTime": self.transitions[typ][1]}
        if reason and not ok:
            c["reason"] = reason
        return c

    def _report(self) -> None:
        if self.lost:
            return
        phase = self._phase()
        terminal = phase in ("Succeeded", "Failed")
        inited = all(c.state == "terminated" and c.exit_code == 0 for c in self.inits)
        ready = not terminal and all(c.ready for c in self.mains)
        reason = "PodCompleted" if terminal else "ContainersNotReady"
        own = {"Initialized", "ContainersReady", "Ready"}
        conds = [c for c in (self.pod.get("status") or {}).get("conditions") or [] if c.get("type") not in own]
        conds += [
            self._cond("Initialized", inited or terminal, "ContainersNotInitialized"),
            self._cond("Ready", ready, reason),
            self._cond("ContainersReady", ready, reason),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conds,
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": ts(self.start_time),
            "containerStatuses": [c.status() for c in self.mains],
            "initContainerStatuses": [c.status() for c in self.inits] or None,
            "message": self.config_error or None,
            "reason": None,
        }
        body = json.dumps(status, sort_keys=True)
        if terminal:
            self.done = True
        if body == self.last_status:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.pod_name, self.ns, {"status": status},
                                                        _content_type=MERGE_PATCH)
            self.last_status = body
            self.agent.dns_changed()
        except ApiException as e:
            if e.status == 404:
                self.gone = True
            else:
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, e.reason)
                self.done = False


# ------------------------------------------------------------------------------------------------ native shim


def build_net_shim(out_dir: Path) -> Path | None:
    """Compile the LD_PRELOAD pod-network shim (shim/kfnet.c: cluster DNS in getaddrinfo, per-pod wildcard and
    localhost binds); None without a C compiler."""
    src = SHIM_DIR / "kfnet.c"
    so = out_dir / "libkfnet.so"
    if so.exists() and so.stat().st_mtime >= src.stat().st_mtime:
        return so
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler: cluster DNS works for Python code only, and pods binding 0.0.0.0 share "
                    "ports (see docs/dev-cluster.md)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = so.with_suffix(".tmp.so")
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], capture_output=True,
                       check=False)
    if r.returncode != 0:
        log.warning("building %s failed: %s", src, r.stderr.decode(errors="replace")[-500:])
        return None
    os.replace(tmp, so)
    return so


# ------------------------------------------------------------------------------------------------ IPs


class IPAllocator:
    """127.<slot>.<10+node>.<2..254>: the whole 127/8 is loopback on Linux, so every pod can bind its own IP;
    `slot` keeps the pods of dev clusters running side by side apart."""

    def __init__(self, slot: int = 0) -> None:
        self.slot = slot
        self.lock = threading.Lock()
        self.by_uid: dict[str, str] = {}
        self.cursor: dict[int, int] = {}

    def allocate(self, uid: str, node: int, want: str | None = None) -> str:
        with self.lock:
            if uid in self.by_uid:
                return self.by_uid[uid]
            used = set(self.by_uid.values())
            prefix = f"127.{self.slot}.{10 + node}."
            if want and want.startswith(prefix) and want not in used:
                self.by_uid[uid] = want
                return want
            start = self.cursor.get(node, 1)
            for i in range(253):
                host = 2 + (start + i - 1) % 253  # round-robin: do not hand a freed IP out again at once
                ip = f"{prefix}{host}"
                if ip not in used:
                    self.cursor[node] = host
                    self.by_uid[uid] = ip
                    return ip
            raise RuntimeError(f"node {node}: no pod IPs left")

    def release(self, uid: str) -> None:
        with self.lock:
            self.by_uid.pop(uid, None)


# ------------------------------------------------------------------------------------------------ agent


def _labels_match(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


# A Service without a selector whose backend is a process on this machine (e.g. Kueue's webhook server): the
# API server refuses loopback addresses in EndpointSlices, so the dev cluster reads them from this annotation,
# "host:port" per Service port name ("name=host:port,..."; a bare "host:port" serves every port).
HOST_BACKENDS_ANNOTATION = "devcluster.kubeforge.dev/host-backends"


def host_backends(svc: dict[str, Any], port: dict[str, Any]) -> list[tuple[str, int]]:
    spec = (svc["metadata"].get("annotations") or {}).get(HOST_BACKENDS_ANNOTATION) or ""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, addr = item.rpartition("=")
        if name and name != (port.get("name") or ""):
            continue
        host, _, p = addr.rpartition(":")
        if host and p.isdigit():
            out.append((host, int(p)))
    return out


def _pod_ready(pod: dict[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _has_cluster_ip(svc: dict[str, Any]) -> bool:
    ip = (svc.get("spec") or {}).get("clusterIP")
    return bool(ip) and ip != "None"


def service_members(svc: dict[str, Any], pods_in_ns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods a Service's endpoints would list as ready (or all, with publishNotReadyAddresses)."""
    spec = svc.get("spec") or {}
    not_ready_ok = bool(spec.get("publishNotReadyAddresses"))
    members = [p for p in pods_in_ns if _labels_match(spec.get("selector"), p["metadata"].get("labels"))
               and (not_ready_ok or _pod_ready(p))]
    return sorted(members, key=lambda p: p["metadata"]["name"])


def running_pods_by_ns(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        st = p.get("status") or {}
        if st.get("podIP") and st.get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp"):
            by_ns.setdefault(p["metadata"]["namespace"], []).append(p)
    return by_ns


def dns_records(pods: list[dict[str, Any]], services: list[dict[str, Any]], api_host: str,
                proxied: set[str] | None = None) -> dict[str, list[str]]:
    """Cluster DNS as CoreDNS would answer it, keyed by FQDN (`*.svc.cluster.local`).

    Services whose ClusterIP the proxy serves (`proxied` keys) resolve to that ClusterIP; other selector
    Services (headless, or a port the proxy could not bind) resolve to their ready pod IPs."""
    proxied = proxied or set()
    rec: dict[str, list[str]] = {}
    sfx = "svc.cluster.local"
    by_ns = running_pods_by_ns(pods)
    for s in services:
        ns, name = s["metadata"]["namespace"], s["metadata"]["name"]
        spec = s.get("spec") or {}
        key = f"{ns}/{name}"
        if key in proxied:
            rec[f"{name}.{ns}.{sfx}"] = [spec["clusterIP"]]
            if _has_cluster_ip(s):
                continue
        if spec.get("type") == "ExternalName":
            continue
        members = service_members(s, by_ns.get(ns, []))
        if members and f"{name}.{ns}.{sfx}" not in rec:
            rec[f"{name}.{ns}.{sfx}"] = [p["status"]["podIP"] for p in members]
        if not _has_cluster_ip(s):
            for p in members:
                if p["spec"].get("hostname") and p["spec"].get("subdomain") == name:
                    rec[f"{p['spec']['hostname']}.{name}.{ns}.{sfx}"] = [p["status"]["podIP"]]
    rec.setdefault(f"kubernetes.default.{sfx}", [api_host])
    return rec


class NodeAgent:
    def __init__(self, api: client.ApiClient, state_dir: Path, nodes: int, gpus_per_node: int,
                 cpus: str, memory: str, apiserver: tuple[str, int], net_slot: int = 0) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.state_dir = state_dir
        self.node_names = [f"kubeforge-node-{i}" for i in range(nodes)]
        self.gpus = gpus_per_node
        self.allocatable = {"cpu": cpus, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus_per_node),
                            "ephemeral-storage": "100Gi"}
        self.apiserver = apiserver
        self.kubelet_port: int | None = None
        self.hosts_file = state_dir / "hosts"
        self.ips = IPAllocator(net_slot)
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.dns_dirty = threading.Event()
        self.last_heartbeat = 0.0
        self.down: set[str] = set()  # nodes whose kubelet is "dead" (stop_node): no heartbeat, pods not run
        self.boot_id = str(uuid.uuid4())
        self.net_shim: Path | None = None
        self.proxy = ServiceProxy(self._backends)
        self.pods = Informer("pods", self.core.list_pod_for_all_namespaces, self._on_pod)
        self.services = Informer("services", self.core.list_service_for_all_namespaces, self._on_service)

    # --- nodes
    def register_nodes(self) -> None:
        for i, name in enumerate(self.node_names):
            body = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "kubeforge.dev/dev-cluster": "true", "node.kubernetes.io/instance-type": "kubeforge-dev",
                }},
                "spec": {"podCIDR": f"127.{self.ips.slot}.{10 + i}.0/24",
                         "podCIDRs": [f"127.{self.ips.slot}.{10 + i}.0/24"]},
            }
            try:
                self.core.create_node(body)
            except ApiException as e:
                if e.status != 409:
                    raise
        # Nodes beyond N from an earlier run with more nodes would attract pods nobody runs.
        for n in self.core.list_node(label_selector="kubeforge.dev/dev-cluster=true").items:
            if n.metadata.name not in self.node_names:
                self.core.delete_node(n.metadata.name)
        self.heartbeat(full=True)

    def heartbeat(self, full: bool) -> None:
        t = dt.datetime.now(dt.UTC)
        for name in self.node_names:
            if name in self.down:
                continue
            lease = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
            }
            try:
                self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": lease["spec"]})
            except ApiException as e:
                if e.status != 404:
                    raise
                self.coord.create_namespaced_lease("kube-node-lease", lease)
            if full:
                self.core.patch_node_status(name, {"status": self._node_status(name)})
        self.last_heartbeat = time.monotonic()

    def _node_status(self, name: str) -> dict[str, Any]:
        stamp = ts(now())
        conds = [
            ("Ready", "True", "KubeletReady", "kubeforge dev-cluster node agent is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        return {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": stamp,
                            "lastTransitionTime": stamp} for t, s, r, m in conds],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            # The API server reaches this port for `kubectl logs` (one server answers for every node).
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port or 0}},
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": self.boot_id,
                "kernelVersion": os.uname().release, "osImage": "kubeforge dev-cluster (local processes)",
                "containerRuntimeVersion": "devcluster://0", "kubeletVersion": KUBELET_VERSION,
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def _heartbeat_loop(self) -> None:
        n = 0
        while not self.stop.wait(10):
            n += 1
            try:
                # Lease every 10 s (what the node lifecycle controller reads), full status every 60 s.
                self.heartbeat(full=n % 6 == 0)
            except Exception as e:  # noqa: BLE001  keep beating; the next round retries
                log.warning("heartbeat failed: %s", e)

    # --- pods
    def _on_pod(self, typ: str, pod: dict[str, Any]) -> None:
        self.dns_changed()
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.node_names or node in self.down:
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if typ == "DELETED":
                if w:
                    w.update(None)
                return
            if w is not None:
                w.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    self._confirm_delete(pod)
                return  # finished before this agent started; nothing to run
            w = PodWorker(self, pod, self.node_names.index(node))
            self.workers[uid] = w
            w.start()

    # --- node loss (tests): the kubelet of one node dies, and comes back
    def stop_node(self, name: str) -> list[str]:
        """Simulate the node's kubelet (or machine) dying: its Lease and status stop being renewed, its pods'
        processes are killed with SIGKILL, and nothing about them is reported any more. The node lifecycle
        controller notices after --node-monitor-grace-period. Returns the pods that were lost."""
        if name not in self.node_names:
            raise KeyError(name)
        with self.lock:
            self.down.add(name)
            lost = [w for w in self.workers.values() if w.node_index == self.node_names.index(name)]
        for w in lost:
            w.lose()
        log.warning("node %s stopped (simulated node loss): %d pods lost", name, len(lost))
        return sorted(f"{w.ns}/{w.pod_name}" for w in lost)

    def start_node(self, name: str) -> None:
        """The node's kubelet is back: heartbeats resume and its pods are taken up again from the API (as a
        restarted kubelet does: pods deleted meanwhile are confirmed gone, the others run)."""
        if name not in self.node_names:
            raise KeyError(name)
        with self.lock:
            self.down.discard(name)
        self.heartbeat(full=True)
        for pod in list(self.pods.cache.values()):
            if (pod.get("spec") or {}).get("nodeName") == name:
                self._on_pod("MODIFIED", pod)
        log.warning("node %s started again", name)

    def _confirm_delete(self, pod: dict[str, Any]) -> None:
        m = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(m["name"], m["namespace"], body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=m["uid"])))
        except ApiException:
            pass

    def forget(self, w: PodWorker) -> None:
        with self.lock:
            if self.workers.get(w.uid) is w:
                del self.workers[w.uid]
        self.dns_changed()

    def worker_for(self, ns: str, pod: str) -> PodWorker | None:
        with self.lock:
            return next((w for w in self.workers.values() if w.ns == ns and w.pod_name == pod), None)

    def _on_service(self, typ: str, svc: dict[str, Any]) -> None:
        self.dns_changed()

    def event(self, pod: dict[str, Any], reason: str, message: str, typ: str, field_path: str | None) -> None:
        m = pod["metadata"]
        t = now()
        ev = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{m['name']}.", namespace=m["namespace"]),
            involved_object=client.V1ObjectReference(kind="Pod", api_version="v1", name=m["name"],
                                                     namespace=m["namespace"], uid=m["uid"], field_path=field_path),
            reason=reason, message=message[:1024], type=typ, first_timestamp=t, last_timestamp=t, count=1,
            source=client.V1EventSource(component="kubelet", host=pod["spec"].get("nodeName")),
        )
        try:
            self.core.create_namespaced_event(m["namespace"], ev)
        except ApiException:
            pass  # events are best effort

    # --- services: proxy listeners and DNS
    def _backends(self, key: str, port: dict[str, Any]) -> list[tuple[str, int]]:
        if key == "default/kubernetes":
            return [self.apiserver]
        svc = self.services.cache.get(key)
        if svc is None:
            return []
        ns = key.split("/", 1)[0]
        if not (svc.get("spec") or {}).get("selector"):
            return host_backends(svc, port)
        pods = [p for p in list(self.pods.cache.values()) if p["metadata"]["namespace"] == ns]
        out = []
        for p in service_members(svc, running_pods_by_ns(pods).get(ns, [])):
            tp = target_port(p, port)
            if tp is not None:
                out.append((p["status"]["podIP"], tp))
        return out

    def _sync_proxy(self, services: list[dict[str, Any]]) -> set[str]:
        desired: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
        for s in services:
            spec = s.get("spec") or {}
            ip = spec.get("clusterIP") or ""
            if not ip.startswith("127."):
                continue
            key = f"{s['metadata']['namespace']}/{s['metadata']['name']}"
            for port in spec.get("ports") or []:
                if (port.get("protocol") or "TCP") == "TCP":
                    desired[(ip, int(port["port"]))] = (key, port)
        try:
            self.proxy.sync(desired)
        except Exception as e:  # noqa: BLE001  DNS must still be written; pod IPs are the fallback
            log.warning("service proxy sync failed: %s", e)
        return {key for addr, (key, _) in desired.items() if self.proxy.listening(*addr)}

    def dns_changed(self) -> None:
        self.dns_dirty.set()

    def _dns_loop(self) -> None:
        last = ""
        while not self.stop.is_set():
            # A ClusterIP the proxy could not bind (e.g. a previous cluster's listener still closing) is
            # retried every second until it binds, not only on the next Service change.
            self.dns_dirty.wait(timeout=1.0 if self.proxy.failed else None)
            time.sleep(0.05)  # coalesce bursts of watch events
            self.dns_dirty.clear()
            try:
                last = self._write_dns(last)
            except Exception:  # never let DNS updates stop; the next change retries
                log.exception("updating cluster DNS failed")

    def _write_dns(self, last: str) -> str:
        services = list(self.services.cache.values())
        proxied = self._sync_proxy(services)
        rec = dns_records(list(self.pods.cache.values()), services, self.apiserver[0], proxied)
        text = "".join(f"{ip} {name}\n" for name, ips in sorted(rec.items()) for ip in ips)
        if text != last:
            tmp = self.hosts_file.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.hosts_file)  # atomic: readers never see half a file
        return text

    # --- health
    def healthy(self) -> bool:
        return self.pods.synced.is_set() and self.services.synced.is_set() \
            and time.monotonic() - self.last_heartbeat < 45

    def _serve_health(self, port: int) -> None:
        agent = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = agent.healthy()
                body = json.dumps({"ok": ok, "pods": len(agent.workers)}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                # /nodes/<name>/stop | /nodes/<name>/start: node loss for tests (loopback only)
                parts = self.path.strip("/").split("/")
                code, body = 404, b"{}"
                if len(parts) == 3 and parts[0] == "nodes" and parts[2] in ("stop", "start"):
                    try:
                        if parts[2] == "stop":
                            body = json.dumps({"lost": agent.stop_node(parts[1])}).encode()
                        else:
                            agent.start_node(parts[1])
                        code = 200
                    except KeyError:
                        code = 404
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=srv.serve_forever, name="health", daemon=True).start()

    # --- lifecycle
    def run(self, health_port: int, kubelet: tuple[int, Path, Path, Path] | None = None) -> None:
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        if kubelet is not None:
            self.kubelet_port = KubeletServer(self, *kubelet).port
        self.hosts_file.touch()
        self.net_shim = build_net_shim(self.state_dir / "shim")
        self._kill_leftovers()
        self.register_nodes()
        self._serve_health(health_port)
        for t in (self.pods, self.services):
            t.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._dns_loop, name="dns", daemon=True).start()
        self.dns_changed()
        log.info("node agent up: nodes=%s gpus/node=%d", self.node_names, self.gpus)
        self.stop.wait()
        self.shutdown()

    def _kill_leftovers(self) -> None:
        """Processes a previous agent started and did not stop (it was SIGKILLed): stop them now."""
        for pidfile in (self.state_dir / "pods").glob("*/*.pid"):
            try:
                pid_s, ticks = pidfile.read_text().split()
                pid = int(pid_s)
                if proc_start_ticks(pid) == ticks:
                    kill_group(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
            pidfile.unlink(missing_ok=True)

    def shutdown(self) -> None:
        with self.lock:
            workers = list(self.workers.values())
        threads = [threading.Thread(target=w._kill_all, args=(5.0,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge.devcluster.nodeagent")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--cpus-per-node", default="8")
    ap.add_argument("--memory-per-node", default="32Gi")
    ap.add_argument("--health-port", type=int, required=True)
    ap.add_argument("--apiserver-host", default="127.0.0.1")
    ap.add_argument("--apiserver-port", type=int, required=True)
    ap.add_argument("--net-slot", type=int, default=0,
                    help="pod IPs are 127.<slot>.<10+node>.x; the agent holds --net-slot-lock while it runs")
    ap.add_argument("--net-slot-lock", type=Path, default=None)
    ap.add_argument("--kubelet-port", type=int, default=None,
                    help="serve the kubelet's containerLogs API over TLS on this port (kubectl logs)")
    ap.add_argument("--kubelet-cert-dir", type=Path, default=None,
                    help="tls.crt, tls.key and ca.crt (the CA that signed the API server's client cert)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    cfg = client.Configuration()
    config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 64  # one watch per informer plus one connection per busy pod thread
    if args.net_slot_lock is not None:  # held for the agent's life: no other dev cluster takes this slot
        import fcntl

        args.net_slot_lock.parent.mkdir(parents=True, exist_ok=True)
        slot_file = open(args.net_slot_lock, "a")  # noqa: SIM115  kept open (and locked) until exit
        try:
            fcntl.flock(slot_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.error("network slot %d is taken by another dev cluster (%s)", args.net_slot, args.net_slot_lock)
            return 1
    agent = NodeAgent(client.ApiClient(cfg), args.state_dir, args.nodes, args.gpus_per_node,
                      args.cpus_per_node, args.memory_per_node, (args.apiserver_host, args.apiserver_port),
                      args.net_slot)

    def on_signal(signum: int, frame: Any) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet = None
    if args.kubelet_port is not None and args.kubelet_cert_dir is not None:
        d = args.kubelet_cert_dir
        kubelet = (args.kubelet_port, d / "tls.crt", d / "tls.key", d / "ca.crt")
    agent.run(args.health_port, kubelet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
