"""Start, check and stop the dev cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the
node agent, an S3 server and (optionally) the kubeforge operator, all as detached local processes.

Everything lives in one state dir (default ~/.cache/kubeforge/devcluster or $KUBEFORGE_DEVCLUSTER_DIR):
    state.json           ports, settings, S3 credentials, pid + start time of every component
    kubeconfig           admin (system:masters) client-cert kubeconfig
    pki/                 CA, API server cert, admin cert, ServiceAccount signing keys
    etcd/  s3/           data
    logs/<component>.log
    pods/<ns>_<pod>/     per-pod dir of the node agent (container logs, volumes, termination messages)
    hosts                cluster DNS records the pod shim reads
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import assets
from .pki import ensure_pki, sign_serving_cert
from .procs import proc_start_ticks

# A loopback service range: every ClusterIP is an address this machine owns, so the node agent's userspace
# proxy can listen on it (see proxy.py) — no kube-proxy, no iptables, no root-wide change. Each dev cluster
# on the machine takes a network slot k: Services in 127.(100+k).0.0/16 (the `kubernetes` Service at .0.1),
# pods in 127.k.(10+node).0/24, so several clusters (parallel test runs) never share an address.
MAX_NET_SLOTS = 64


def service_cidr(slot: int) -> str:
    return f"127.{100 + slot}.0.0/16"


def service_ip(slot: int) -> str:
    return f"127.{100 + slot}.0.1"


SERVICE_CIDR, SERVICE_IP = service_cidr(0), service_ip(0)


def net_slot_lock(slot: int) -> Path:
    return assets.cache_dir() / "net-slots" / f"{slot}.lock"


def claim_net_slot() -> tuple[int, Any]:
    """The lowest slot no dev cluster holds: a running one's node agent keeps `<k>.lock` locked, and a
    starting one's `up` keeps `<k>.claim` locked until its node agent runs (returned open: the caller holds it)."""
    for k in range(MAX_NET_SLOTS):
        lock = net_slot_lock(k)
        lock.parent.mkdir(parents=True, exist_ok=True)
        claim = open(lock.with_suffix(".claim"), "a")  # noqa: SIM115  held by the caller
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            claim.close()
            continue
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                claim.close()
                continue
            fcntl.flock(f, fcntl.LOCK_UN)
        return k, claim
    raise RuntimeError(f"all {MAX_NET_SLOTS} dev-cluster network slots are in use")
ISSUER = "https://kubernetes.default.svc.cluster.local"
BUCKET = "kubeforge"
S3_SECRET = "kubeforge-s3"
# Never inherited by the operator (DESIGN: the operator holds no data credentials); pass them explicitly.
DATA_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "s3", "nodeagent", "kueue",
         "operator")


def default_state_dir() -> Path:
    env = os.environ.get("KUBEFORGE_DEVCLUSTER_DIR")
    return Path(env) if env else assets.cache_dir() / "devcluster"


def repo_root() -> Path | None:
    for p in Path(__file__).resolve().parents:
        if (p / "pyproject.toml").is_file() and (p / "operator" / "kubeforge").is_dir():
            return p
    return None


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health: Callable[[], bool] | None = None
    start_timeout: float = 60.0
    drop_env: tuple[str, ...] = ()  # inherited variables the process must not see


class DevCluster:
    def __init__(self, state_dir: Path | None = None) -> None:
        self._slot_claim: Any = None  # the network slot's claim, held while `up` starts a new cluster
        self.dir = (state_dir or default_state_dir()).resolve()
        self.state_file = self.dir / "state.json"
        self.state: dict[str, Any] = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    # ------------------------------------------------------------------------------------------- paths
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.state.get("ports") or {})

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def s3(self) -> dict[str, str]:
        return dict(self.state.get("s3") or {})

    def env_exports(self) -> dict[str, str]:
        s3 = self.s3
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL": s3.get("endpoint", ""),
            "AWS_ACCESS_KEY_ID": s3.get("access_key", ""),
            "AWS_SECRET_ACCESS_KEY": s3.get("secret_key", ""),
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    # ------------------------------------------------------------------------------------------- health
    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _get_ok(self, url: str, tls: bool = False, expect: str | None = None, insecure: bool = False) -> bool:
        ctx = self._ssl() if tls else None
        if insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                body = r.read().decode(errors="replace")
                return r.status == 200 and (expect is None or expect in body)
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def _health_checks(self) -> dict[str, Callable[[], bool]]:
        p = self.ports
        s3_url = self.s3.get("endpoint", "")
        s3_path = "/minio/health/live" if self.s3.get("kind") == "minio" else "/"
        return {
            "etcd": lambda: self._get_ok(f"http://127.0.0.1:{p['etcd']}/health", expect="true"),
            "kube-apiserver": lambda: self._get_ok(f"https://127.0.0.1:{p['apiserver']}/readyz", tls=True),
            # Self-signed serving certs (their own --cert-dir); /healthz is open to anonymous requests.
            "kube-controller-manager": lambda: self._get_ok(f"https://127.0.0.1:{p['controller_manager']}/healthz",
                                                            insecure=True),
            "kube-scheduler": lambda: self._get_ok(f"https://127.0.0.1:{p['scheduler']}/healthz", insecure=True),
            "s3": lambda: self._get_ok(s3_url + s3_path),
            "nodeagent": lambda: self._get_ok(f"http://127.0.0.1:{p['nodeagent']}/healthz"),
            "kueue": lambda: self._get_ok(f"http://127.0.0.1:{p.get('kueue_health', 0)}/readyz"),
            "operator": lambda: True,  # liveness only: the operator has no health endpoint we rely on
        }

    # ------------------------------------------------------------------------------------------- processes
    def _alive(self, name: str) -> int | None:
        c = (self.state.get("components") or {}).get(name)
        if not c:
            return None
        pid = int(c["pid"])
        return pid if proc_start_ticks(pid) == c.get("ticks") else None

    def status(self) -> list[dict[str, Any]]:
        checks = self._health_checks() if self.ports else {}
        out = []
        comps = self.state.get("components") or {}
        for name in [n for n in ORDER if n in comps] + [n for n in comps if n not in ORDER]:
            c = comps[name]
            pid = self._alive(name)
            out.append({
                "component": name, "pid": int(c["pid"]), "alive": pid is not None,
                # extra processes (operator, watchdog, test helpers) have no health endpoint: alive is healthy
                "healthy": bool(pid is not None and checks.get(name, lambda: True)()),
                "log": str(self.log_path(name)),
            })
        return out

    def _spawn(self, comp: Component) -> None:
        self.log_path(comp.name).parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in comp.drop_env}
        env.update(comp.env)
        with open(self.log_path(comp.name), "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} start: "
                       f"{' '.join(comp.argv)}\n".encode())
            logf.flush()
            # start_new_session: the component survives the CLI and gets its own process group for `down`.
            proc = subprocess.Popen(comp.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(self.dir), start_new_session=True)
        self.state.setdefault("components", {})[comp.name] = {
            "pid": proc.pid, "ticks": proc_start_ticks(proc.pid), "argv": comp.argv,
        }
        self._save()
        deadline = time.monotonic() + comp.start_timeout
        while comp.health is not None and not comp.health():
            if proc.poll() is not None:
                raise RuntimeError(f"{comp.name} exited with {proc.returncode}; see {self.log_path(comp.name)}:\n"
                                   + self._tail(comp.name))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{comp.name} not healthy after {comp.start_timeout:.0f}s; see "
                                   f"{self.log_path(comp.name)}:\n" + self._tail(comp.name))
            time.sleep(0.25)

    def _tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _stop(self, name: str, grace: float = 10.0) -> None:
        pid = self._alive(name)
        if pid is not None:
            try:
                # grace <= 0: an abrupt kill (a crash), no SIGTERM first
                os.killpg(pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and proc_start_ticks(pid) is not None:
                _reap(pid)
                time.sleep(0.1)
            if proc_start_ticks(pid) is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _reap(pid)
        (self.state.get("components") or {}).pop(name, None)
        self._save()

    # ------------------------------------------------------------------------------------------- setup
    def _init_state(self, nodes: int, gpus: int) -> None:
        if not self.ports:
            names = ["etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "nodeagent", "s3",
                     "s3_console"]
            self.state["ports"] = dict(zip(names, free_ports(len(names))))
        kueue_ports = [n for n in ("kueue_webhook", "kueue_health", "kueue_metrics", "kubelet")
                       if n not in self.state["ports"]]
        if kueue_ports:
            self.state["ports"].update(zip(kueue_ports, free_ports(len(kueue_ports))))
        if not self.s3:
            self.state["s3"] = {
                "kind": "minio" if shutil.which("minio") else "moto",
                "endpoint": f"http://127.0.0.1:{self.state['ports']['s3']}",
                "access_key": "kubeforge" + secrets.token_hex(4),
                "secret_key": secrets.token_urlsafe(24),
                "bucket": BUCKET,
            }
        if "net_slot" not in self.state:
            self.state["net_slot"], self._slot_claim = claim_net_slot()
        self.state.setdefault("components", {})
        self._save()

    @property
    def net_slot(self) -> int:
        return int(self.state.get("net_slot", 0))

    def _write_kubeconfig(self) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        kc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubeforge-dev",
            "clusters": [{"name": "kubeforge-dev", "cluster": {
                "server": self.apiserver_url, "certificate-authority-data": b64(self.pki / "ca.crt")}}],
            "users": [{"name": "kubeforge-admin", "user": {
                "client-certificate-data": b64(self.pki / "admin.crt"),
                "client-key-data": b64(self.pki / "admin.key")}}],
            "contexts": [{"name": "kubeforge-dev", "context": {"cluster": "kubeforge-dev", "user": "kubeforge-admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(kc))
        self.kubeconfig.chmod(0o600)

    def _components(self, bins: dict[str, Path], nodes: int, gpus: int, cpus: str, memory: str) -> list[Component]:
        p, pki, d = self.ports, self.pki, self.dir
        checks = self._health_checks()
        kc = str(self.kubeconfig)
        py = sys.executable
        comps = [
            Component("etcd", [
                str(bins["etcd"]), "--name=devcluster", f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
                f"--initial-cluster=devcluster=http://127.0.0.1:{p['etcd_peer']}",
                "--quota-backend-bytes=4294967296", "--snapshot-count=10000", "--log-level=warn",
            ], health=checks["etcd"], start_timeout=30),
            Component("kube-apiserver", [
                str(bins["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}",
                "--advertise-address=127.0.0.1",
                # No kube-proxy and loopback pod IPs: nothing would use the `kubernetes` Endpoints (and the
                # API rejects loopback endpoint addresses), so do not maintain them.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
                f"--service-cluster-ip-range={service_cidr(self.net_slot)}",
                # kubectl logs: the API server calls the node agent's kubelet API over TLS (see nodeagent.py).
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=RBAC", "--allow-privileged=true",
                "--enable-priority-and-fairness=false", "--profiling=false", "--v=1",
            ], health=checks["kube-apiserver"], start_timeout=90),
            Component("kube-controller-manager", [
                str(bins["kube-controller-manager"]), f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['controller_manager']}",
                f"--cert-dir={d / 'pki' / 'controller-manager'}",
                f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={service_cidr(self.net_slot)}",
                # `endpoint` off: the API rejects loopback addresses in Endpoints (the controller would only emit
                # warning events); EndpointSlices accept them and are maintained.
                ("--controllers=*,-endpoints-controller,-node-ipam-controller,-cloud-node-lifecycle-controller,"
                 "-node-route-controller,-service-lb-controller,-persistentvolume-attach-detach-controller,"
                 "-persistentvolume-expander-controller"),
                "--profiling=false", "--v=1",
            ], health=checks["kube-controller-manager"], start_timeout=60),
            Component("kube-scheduler", [
                str(bins["kube-scheduler"]), f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}",
                f"--cert-dir={d / 'pki' / 'scheduler'}",
                "--profiling=false", "--v=1",
            ], health=checks["kube-scheduler"], start_timeout=60),
        ]
        s3 = self.s3
        if s3["kind"] == "minio":
            s3_argv = [shutil.which("minio") or "minio", "server", str(d / "s3"),
                       "--address", f"127.0.0.1:{p['s3']}", "--console-address", f"127.0.0.1:{p['s3_console']}"]
            s3_env = {"MINIO_ROOT_USER": s3["access_key"], "MINIO_ROOT_PASSWORD": s3["secret_key"]}
        else:
            # moto keeps objects in memory: fine for tests and demos; restarts lose data.
            s3_argv = [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p["s3"])]
            s3_env = {}
        comps.append(Component("s3", s3_argv, env=s3_env, health=checks["s3"], start_timeout=60))
        comps.append(Component("nodeagent", [
            py, "-m", "kubeforge.devcluster.nodeagent", f"--kubeconfig={kc}", f"--state-dir={d}",
            f"--nodes={nodes}", f"--gpus-per-node={gpus}", f"--cpus-per-node={cpus}",
            f"--memory-per-node={memory}", f"--health-port={p['nodeagent']}",
            "--apiserver-host=127.0.0.1", f"--apiserver-port={p['apiserver']}",
            f"--kubelet-port={p['kubelet']}", f"--kubelet-cert-dir={pki / 'kubelet'}",
            f"--net-slot={self.net_slot}", f"--net-slot-lock={net_slot_lock(self.net_slot)}",
        ], env=self._pkg_env(), health=checks["nodeagent"], start_timeout=60))
        return comps

    def _pkg_env(self) -> dict[str, str]:
        """Make `python -m kubeforge...` work from a checkout that is not pip-installed."""
        root = repo_root()
        env = {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        if root is not None:
            pp = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = str(root / "operator") + (os.pathsep + pp if pp else "")
        return env

    # ------------------------------------------------------------------------------------------- up/down
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up`/`down` at a time per state dir (two shells, or a test session and a person)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if self.state_file.exists():  # another holder may have changed it
                    self.state = json.loads(self.state_file.read_text())
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def up(self, *args: Any, **kwargs: Any) -> None:
        with self._locked():
            try:
                self._up(*args, **kwargs)
            finally:
                if self._slot_claim is not None:  # the node agent holds the slot now (or nothing started)
                    self._slot_claim.close()
                    self._slot_claim = None

    def _up(self, nodes: int = 2, gpus_per_node: int = 2, with_operator: bool = False,
           cpus_per_node: str = "8", memory_per_node: str = "32Gi",
           operator_argv: list[str] | None = None, extra_crd_dirs: list[Path] | None = None,
           owner_pid: int | None = None, with_kueue: bool = False) -> None:
        """Start what is not running and healthy. `owner_pid`: a watchdog takes the cluster down when that
        process dies (test sessions killed by a signal would otherwise leave a whole control plane behind)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        bins = assets.ensure_binaries()
        prev = (self.state.get("nodes"), self.state.get("gpus_per_node"))
        self._init_state(nodes, gpus_per_node)
        ensure_pki(self.pki, service_ip(self.net_slot))
        if not (self.pki / "kubelet" / "ca.crt").exists():  # the node agent's kubelet API serving cert
            sign_serving_cert(self.pki, self.pki / "kubelet", ["localhost"] + [f"kubeforge-node-{i}" for i in
                                                                               range(nodes)], ["127.0.0.1"])
            shutil.copy(self.pki / "ca.crt", self.pki / "kubelet" / "ca.crt")
        self._write_kubeconfig()
        comps = self._components(bins, nodes, gpus_per_node, cpus_per_node, memory_per_node)
        if prev != (nodes, gpus_per_node) and prev != (None, None):
            self._stop("nodeagent")  # node shape changed: re-register
        self.state.update({"nodes": nodes, "gpus_per_node": gpus_per_node})
        self._save()
        started_any = False
        for comp in comps:
            if self._alive(comp.name) is not None:
                if comp.health is None or comp.health():
                    continue
                _err(f"dev-cluster: {comp.name} is running but unhealthy; restarting it")
                self._stop(comp.name)
            _err(f"dev-cluster: starting {comp.name}")
            self._spawn(comp)
            started_any = True
            if comp.name == "kube-apiserver":
                self._bootstrap_api()
        if started_any or not self.state.get("bootstrapped"):
            self._bootstrap_api()
            self._bootstrap_s3()
            self.state["bootstrapped"] = True
            self._save()
        digest = self._crd_digest()
        if started_any or digest != self.state.get("crds_digest"):  # (re)generated CRDs get installed
            self.install_crds()
            self.state["crds_digest"] = digest
            self._save()
        for d in extra_crd_dirs or []:
            install_crd_files(self.api_client(), sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")))
        if with_kueue:
            self._up_kueue()
        if owner_pid is not None and self._alive("watchdog") is None:
            self._spawn(Component("watchdog", [
                sys.executable, "-m", "kubeforge.devcluster.cluster", "watchdog", str(self.dir), str(owner_pid),
                proc_start_ticks(owner_pid) or "",
            ], env=self._pkg_env()))
        if with_operator and self._alive("operator") is None:
            argv = operator_argv or [sys.executable, "-m", "kubeforge", "operator"]
            _err("dev-cluster: starting operator")
            # KUBECONFIG only: the operator holds no data (S3) credentials.
            self._spawn(Component("operator", argv, env=self._pkg_env(), health=None, drop_env=DATA_CREDENTIALS))

    def _up_kueue(self) -> None:
        """Kueue's CRDs, webhooks and the manager process (see kueue.py); waits until its webhooks answer."""
        from . import kueue

        binary = assets.ensure_kueue()
        module = assets.kueue_module_dir()
        p = self.ports
        api = self.api_client()
        kueue.install(api, module, p["kueue_webhook"])
        cfg = self.dir / "kueue" / "config.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(kueue.configuration(
            p["kueue_webhook"], p["kueue_health"], p["kueue_metrics"], self.dir / "kueue" / "certs")))
        if self._alive("kueue") is None or not self._health_checks()["kueue"]():
            if self._alive("kueue") is not None:
                self._stop("kueue")
            _err("dev-cluster: starting kueue")
            # The on-demand visibility API server authenticates through in-cluster config only (its
            # delegated authn has no kubeconfig flag), which a process outside a pod does not have.
            self._spawn(Component("kueue", [str(binary), f"--config={cfg}", "--feature-gates=VisibilityOnDemand=false"],
                                  env={"KUBECONFIG": str(self.kubeconfig)}, drop_env=DATA_CREDENTIALS))
        # In a pod the cert Secret is a volume in certDir; here the CLI writes it there once Kueue filled it.
        certs = self.dir / "kueue" / "certs"
        deadline = time.monotonic() + 180
        while not (kueue.mount_cert_secret(api, certs) and self._health_checks()["kueue"]()):
            if self._alive("kueue") is None:
                raise RuntimeError("kueue exited; see " + str(self.log_path("kueue")) + ":\n" + self._tail("kueue"))
            if time.monotonic() > deadline:
                raise RuntimeError("kueue not ready after 180s; see " + str(self.log_path("kueue")) + ":\n"
                                   + self._tail("kueue"))
            time.sleep(0.5)
        kueue.wait_ready(api)
        self.state["kueue"] = True
        self._save()

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Spawn an extra detached process against the cluster, tracked like a component (e.g. the operator).
        It gets KUBECONFIG; S3 credentials only when passed in `env` (the operator must not need them)."""
        self._spawn(Component(name, argv, env=self._pkg_env() | (env or {}), health=None,
                              drop_env=tuple(k for k in DATA_CREDENTIALS if k not in (env or {}))))
        return int(self.state["components"][name]["pid"])

    def stop_process(self, name: str, grace: float = 10.0) -> None:
        self._stop(name, grace)

    # ------------------------------------------------------------------------------------------- faults
    def restart_component(self, name: str, down_seconds: float = 0.0, grace: float = 10.0) -> None:
        """Stop a running component (SIGTERM, SIGKILL after `grace`; grace <= 0: a crash), leave it down for
        `down_seconds`, and start it again with the same command line; returns once it is healthy."""
        comp = (self.state.get("components") or {}).get(name)
        if comp is None or self._alive(name) is None:
            raise RuntimeError(f"{name} is not running")
        argv = list(comp["argv"])
        self._stop(name, grace)
        time.sleep(down_seconds)
        env = self._pkg_env() if name in ("nodeagent", "watchdog") else {}
        _err(f"dev-cluster: restarting {name}")
        self._spawn(Component(name, argv, env=env, health=self._health_checks().get(name),
                              start_timeout=90, drop_env=DATA_CREDENTIALS if name == "kueue" else ()))

    def restart_apiserver(self, down_seconds: float = 0.0, grace: float = 10.0) -> None:
        """Stop kube-apiserver and start it again (etcd keeps the state): clients see connection errors,
        then watches that must resume or relist."""
        self.restart_component("kube-apiserver", down_seconds, grace)
        self._bootstrap_api()

    def _node_control(self, node: str, action: str) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['nodeagent']}/nodes/{node}/{action}",
                                     method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            return dict(json.loads(r.read() or b"{}"))

    def stop_node(self, node: str) -> list[str]:
        """Simulate losing one node (its kubelet or machine dies): no more heartbeats, its pods' processes
        killed, nothing reported. The node lifecycle controller marks it NotReady/unreachable after
        --node-monitor-grace-period. Returns the pods that were lost ("ns/name")."""
        return list(self._node_control(node, "stop").get("lost", []))

    def start_node(self, node: str) -> None:
        """The node's kubelet is back: heartbeats resume; pods bound to it are taken up again."""
        self._node_control(node, "start")

    def down(self, purge: bool = False) -> None:
        with self._locked():
            self._down(purge)

    def _down(self, purge: bool) -> None:
        comps = self.state.get("components") or {}
        extra = [n for n in comps if n not in ORDER]
        for name in extra + list(reversed(ORDER)):
            if name in comps:
                if int(comps[name]["pid"]) == os.getpid():  # the watchdog taking the cluster down
                    comps.pop(name)
                    continue
                _err(f"dev-cluster: stopping {name}")
                self._stop(name, grace=15.0 if name == "nodeagent" else 10.0)
        self._kill_pod_processes()
        if purge and self.dir.exists():
            shutil.rmtree(self.dir)
            self.state = {}

    def _kill_pod_processes(self) -> None:
        """Pod processes the node agent could not stop (it was killed): by recorded pid + start time."""
        for pidfile in (self.dir / "pods").glob("*/*.pid"):
            try:
                pid_s, ticks = pidfile.read_text().split()
                if proc_start_ticks(int(pid_s)) == ticks:
                    os.killpg(int(pid_s), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            pidfile.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- bootstrap
    def api_client(self) -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def _bootstrap_api(self) -> None:
        """Wait until the API can take objects: the `default` namespace exists."""
        import urllib3
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + 60
        while True:
            try:
                core.read_namespace("default")
                return
            except (ApiException, urllib3.exceptions.HTTPError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _bootstrap_s3(self) -> None:
        import boto3
        from botocore.config import Config
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        s3 = self.s3
        s3c = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3["access_key"],
                           aws_secret_access_key=s3["secret_key"], region_name="us-east-1",
                           config=Config(retries={"max_attempts": 5}))
        try:
            s3c.create_bucket(Bucket=s3["bucket"])
        except s3c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except s3c.exceptions.BucketAlreadyExists:
            pass
        core = client.CoreV1Api(self.api_client())
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=S3_SECRET, namespace="default",
                                         labels={"app.kubernetes.io/part-of": "kubeforge-devcluster"}),
            string_data={"AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
                         "AWS_ENDPOINT_URL": s3["endpoint"], "AWS_DEFAULT_REGION": "us-east-1"},
        )
        try:
            core.create_namespaced_secret("default", body)
        except ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_secret(S3_SECRET, "default", body)

    def _crd_digest(self) -> str:
        root = repo_root()
        h = hashlib.sha256()
        for f in sorted((root / "crds").glob("*.y*ml")) if root else []:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def install_crds(self, crd_dir: Path | None = None) -> list[str]:
        """Create-or-replace every CRD in crds/*.yaml with the Python client (create avoids kubectl's
        last-applied annotation, which large CRDs overflow)."""
        root = repo_root()
        crd_dir = crd_dir or (root / "crds" if root else None)
        if crd_dir is None or not crd_dir.is_dir():
            return []
        return install_crd_files(self.api_client(), sorted(crd_dir.glob("*.yaml")) + sorted(crd_dir.glob("*.yml")))


def install_crd_files(api: Any, files: list[Path]) -> list[str]:
    docs = [doc for f in files for doc in yaml.safe_load_all(f.read_text())]
    return install_crd_files_docs(api, docs)


def install_crd_files_docs(api: Any, docs: list[dict[str, Any]], keep_ca_bundle: bool = False) -> list[str]:
    """Create or replace CRDs, then wait until they are Established. `keep_ca_bundle`: a conversion
    webhook's caBundle already injected into the stored CRD (by the webhook's own cert manager) is kept."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api)
    names: list[str] = []
    for doc in docs:
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        name = doc["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(doc)
        except ApiException as e:
            if e.status != 409:
                raise RuntimeError(f"CRD {name}: {e.status} {e.reason}: {e.body}") from e
            cur = api.sanitize_for_serialization(ext.read_custom_resource_definition(name))
            doc["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            ca = (((cur["spec"].get("conversion") or {}).get("webhook") or {}).get("clientConfig") or {}).get(
                "caBundle")
            hook = (doc["spec"].get("conversion") or {}).get("webhook")
            if keep_ca_bundle and ca and hook:
                hook["clientConfig"]["caBundle"] = ca
            ext.replace_custom_resource_definition(name, doc)
        names.append(name)
    # Established before anyone creates objects of these kinds.
    deadline = time.monotonic() + 30
    for name in names:
        while time.monotonic() < deadline:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])} if crd.status else {}
            if conds.get("Established") == "True":
                break
            time.sleep(0.2)
    return names


def _watchdog(state_dir: str, pid: int, ticks: str) -> None:
    """Wait for the owner process to end, then stop the cluster (the owner's own teardown usually wins)."""
    while proc_start_ticks(pid) == ticks and ticks:
        time.sleep(2)
    dc = DevCluster(Path(state_dir))
    if dc.state.get("components"):
        dc.down()


def _reap(pid: int) -> None:
    """Collect a child we started in this process (tests keep the CLI process alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "watchdog":
        _watchdog(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python -m kubeforge.devcluster.cluster watchdog STATE_DIR PID START_TICKS")
