"""Test support around a cluster: the dev cluster started for a test session, or any cluster in KUBECONFIG.

Used by tests/conftest.py; kept in the package so e2e scripts and benchmarks can reuse it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from .cluster import DATA_CREDENTIALS, S3_SECRET, DevCluster, install_crd_files, repo_root

T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 60.0, interval: float = 0.25, what: str = "condition") -> T:
    """Poll `fn` until it returns something truthy; raise TimeoutError with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001  transient API errors count as "not yet"
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def pod_processes(namespace: str, pod: str, match: bytes = b"") -> list[int]:
    """PIDs of a dev-cluster pod's processes (found by the pod env the node agent sets), whose command line
    contains `match`: how a test or benchmark kills one worker of a gang the way an OOM or a crash would."""
    want = {f"KUBEFORGE_POD_NAME={pod}".encode(), f"KUBEFORGE_POD_NAMESPACE={namespace}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and match in cmd:
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Process:
    """A process started against the cluster (e.g. the operator); stop() is SIGTERM then SIGKILL."""

    name: str
    argv: list[str]
    log_path: Path
    _stop: Callable[[float], None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `grace` seconds; grace <= 0 is a plain SIGKILL (a crash)."""
        self._stop(grace)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ClusterHandle:
    kubeconfig: Path
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str = "kubeforge"
    state_dir: Path | None = None
    dev: DevCluster | None = None
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def api_client(self) -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def install_crds(self, *paths: Path) -> list[str]:
        """Create-or-replace the CRDs in these files/dirs (e.g. Kueue's) and wait until they are Established."""
        files: list[Path] = []
        for p in paths:
            files += sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
        return install_crd_files(self.api_client(), files)

    @property
    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3_secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def s3_client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.s3_access_key,
                            aws_secret_access_key=self.s3_secret_key, region_name="us-east-1")

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A dev-cluster pod's container output (the node agent's log file); '' when unknown."""
        if self.state_dir is None:
            return ""
        d = self.state_dir / "pods" / f"{namespace}_{pod}"
        files = [d / f"{container}.log"] if container else sorted(d.glob("*.log"))
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def start_process(self, argv: list[str] | None = None, name: str = "operator",
                      env: dict[str, str] | None = None) -> Process:
        """Run `argv` (default: `python -m kubeforge operator`) against this cluster, detached, logging to a
        file, with KUBECONFIG set (S3 credentials only if given in `env`: `env=cluster.s3_env`). On the dev
        cluster it is tracked in the state dir, so `dev-cluster down` stops it too."""
        argv = argv or [sys.executable, "-m", "kubeforge", "operator"]
        if self.dev is not None:
            self.dev.start_process(name, argv, env)
            return Process(name, argv, self.dev.log_path(name), lambda g: self.dev.stop_process(name, g))  # type: ignore[union-attr]
        log_dir = Path(os.environ.get("KUBEFORGE_TEST_LOG_DIR", "/tmp"))
        log_path = log_dir / f"kubeforge-{name}-{os.getpid()}.log"
        full_env = {k: v for k, v in os.environ.items() if k not in DATA_CREDENTIALS}
        full_env |= {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        root = repo_root()
        if root is not None:
            full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "operator"), full_env.get("PYTHONPATH")]))
        full_env |= env or {}
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, env=full_env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[name] = proc

        def stop(grace: float) -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

        return Process(name, argv, log_path, stop)

    def start_operator(self, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Process:
        return self.start_process(argv, "operator", env)

    @contextmanager
    def operator(self, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[Process]:
        p = self.start_operator(argv, env)
        try:
            yield p
        finally:
            p.stop()

    # --- namespaces
    def create_namespace(self, prefix: str = "t") -> str:
        """A fresh namespace with the S3 secret copied in and its default ServiceAccount usable."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api_client())
        name = f"{prefix}-{secrets.token_hex(3)}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=name, labels={"kubeforge.dev/test": "true"})))
        data = dict(self.s3_env)
        try:
            src = core.read_namespaced_secret(S3_SECRET, "default")
            data = {k: __import__("base64").b64decode(v).decode() for k, v in (src.data or {}).items()}
        except ApiException:
            pass
        core.create_namespaced_secret(name, client.V1Secret(
            metadata=client.V1ObjectMeta(name=S3_SECRET), string_data=data))

        # Pods are refused until the ServiceAccount controller created `default` (tokens are bound tokens,
        # requested per pod; no token Secret is created on Kubernetes >= 1.24).
        def sa_ready() -> bool:
            return bool(core.read_namespaced_service_account("default", name))

        wait_for(sa_ready, 30, what=f"default ServiceAccount in {name}")
        return name

    def delete_namespace(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(self.api_client()).delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise


def from_env() -> ClusterHandle | None:
    """A handle on the cluster in $KUBECONFIG (S3 from AWS_* env), or None when KUBECONFIG is unset."""
    kc = os.environ.get("KUBECONFIG")
    if not kc:
        return None
    sd = os.environ.get("KUBEFORGE_DEVCLUSTER_DIR")
    state_dir = Path(sd) if sd else None
    dev = DevCluster(state_dir) if state_dir and (state_dir / "state.json").exists() else None
    return ClusterHandle(
        kubeconfig=Path(kc.split(os.pathsep)[0]),
        s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""),
        s3_access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
        s3_secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        s3_bucket=os.environ.get("KUBEFORGE_S3_BUCKET", "kubeforge"),
        state_dir=state_dir, dev=dev,
    )


def from_devcluster(dc: DevCluster) -> ClusterHandle:
    s3 = dc.s3
    return ClusterHandle(kubeconfig=dc.kubeconfig, s3_endpoint=s3["endpoint"], s3_access_key=s3["access_key"],
                         s3_secret_key=s3["secret_key"], s3_bucket=s3.get("bucket", "kubeforge"),
                         state_dir=dc.dir, dev=dc)
