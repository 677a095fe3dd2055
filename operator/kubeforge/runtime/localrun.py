"""Run the PretrainJob runtime locally the way a pod runs it (tests, benchmarks, demos without a cluster).

`pretrain_job(...)` builds the resolved job JSON the operator mounts; `launch_argv(...)` the pod command;
`runtime_env(...)` the pod environment; `worker_pids(...)` finds torchrun's workers (they run in their
own sessions, so signalling the launcher's process group does not reach them).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .. import contract


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pretrain_job(
    name: str,
    data_uri: str,
    checkpoint_uri: str,
    model: dict[str, Any],
    training: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    namespace: str = "default",
    uid: str = "00000000-0000-0000-0000-000000000000",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": model,
        "data": {"uri": data_uri, **(data or {})},
        "training": training,
        "checkpoint": {"uri": checkpoint_uri, **(checkpoint or {})},
    }
    if optimizer:
        spec["optimizer"] = optimizer
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec}


def write_job(job: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(job))
    return p


def launch_argv(nproc: int, port: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                module: str = "kubeforge.runtime.pretrain", shutdown_timeout: int = 60) -> list[str]:
    """The pod command: torchrun's arguments, run through kubeforge.runtime.launch (keeps exit codes)."""
    return [sys.executable, "-m", "kubeforge.runtime.launch", "--nnodes", str(nnodes), "--nproc-per-node",
            str(nproc), "--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(port),
            "--shutdown-timeout", str(shutdown_timeout), "-m", module]


def runtime_env(s3_env: dict[str, str], spec_file: str | Path, workdir: str | Path,
                progress_file: str | Path | None, termination_log: str | Path,
                threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(s3_env)
    env.update({
        contract.ENV_SPEC_FILE: str(spec_file),
        contract.ENV_PROGRESS_MODE: f"file:{progress_file}" if progress_file else "off",
        contract.ENV_TERMINATION_LOG: str(termination_log),
        "KUBEFORGE_WORKDIR": str(workdir),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def worker_pids(launcher_pid: int) -> list[int]:
    """PIDs whose parent is the launcher (torchrun's workers), from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid:
            pids.append(int(d.name))
    return sorted(pids)
