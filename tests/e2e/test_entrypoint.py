"""Your own training script on the dev cluster: a PretrainJob with spec.entrypoint, and the same script through
`torchx run -s kubeforge` (the TorchX CLI itself). A worker is killed mid-run; the gang restarts and the script
resumes from its own last committed checkpoint. A script that ignores kubeforge's sdk still succeeds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubeforge.devcluster.testing import ClusterHandle, pod_processes
from torchx_entry_points import entry_point_env

from .conftest import REPO, Jobs, Operator, wait

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dev_cluster_only")]
KIND = "PretrainJob"
# The user's image would hold kubeforge; dev-cluster pods share this machine's venv, whose kubeforge may be
# another checkout's, so the pods are pointed at this tree the way a user points at their own code.
CODE = str(REPO / "operator")

# A user's own DDP loop (fits y = 3x + 1), checkpointing with kubeforge.runtime.sdk.
USER_SCRIPT = textwrap.dedent('''
    import argparse, time
    import torch, torch.distributed as dist
    from kubeforge.runtime import sdk

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--step-seconds", type=float, default=0.25)
    a = p.parse_args()
    dist.init_process_group("gloo")
    run = sdk.Run(total_steps=a.steps)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    restored = run.restore()
    if restored:
        state = torch.load(restored.path / "state.pt")
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = restored.step
        print(f"resumed from step {start}", flush=True)
    for step in range(start, a.steps):
        x = torch.rand(16, 1, generator=torch.Generator().manual_seed(step * 100 + run.rank))
        loss = torch.nn.functional.mse_loss(model(x), 3 * x + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.report(step + 1, loss=loss.item(), tokens=(step + 1) * 16 * run.world_size)
        stop = run.should_stop()
        if (step + 1) % a.every == 0 or stop:
            with run.checkpoint(step + 1) as d:
                torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, d / "state.pt")
            if stop:
                run.exit_preempted()
        time.sleep(a.step_seconds)  # a real step takes longer than this toy one
    run.finish()
    dist.destroy_process_group()
''')

# A script that knows nothing of kubeforge: only torchrun's environment.
PLAIN_SCRIPT = textwrap.dedent('''
    import time
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.ones(1)
    for _ in range(20):
        dist.all_reduce(total)
        time.sleep(0.1)
    print("plain script done on rank", dist.get_rank(), flush=True)
    dist.destroy_process_group()
''')


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in (("user_train.py", USER_SCRIPT), ("plain_train.py", PLAIN_SCRIPT)):
        path = tmp_path / name
        path.write_text(text)
        out[name] = str(path)
    return out


def entrypoint_job(jobs: Jobs, name: str, script: str, args: list[str], **run_policy) -> dict:
    return {
        "apiVersion": "kubeforge.dev/v1alpha1",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "entrypoint": {"script": script, "args": args},
            "checkpoint": {"uri": f"s3://kubeforge/checkpoints/{jobs.ns}/{name}", "secretRef": {"name": "kubeforge-s3"}},
            "resources": {"numNodes": 2, "processesPerNode": 1, "requests": {"cpu": "500m", "memory": "512Mi"},
                          "env": [{"name": "PYTHONPATH", "value": CODE}]},
            "runPolicy": {"maxRestarts": 2, "backoffSeconds": 1, "progressDeadlineSeconds": 300, **run_policy},
        },
    }


def kill_script(namespace: str, pod: str, script: str) -> None:
    """SIGKILL the script's worker process (not the torchrun launcher above it)."""
    pids = wait(lambda: [p for p in pod_processes(namespace, pod, script.encode())
                         if p not in pod_processes(namespace, pod, b"kubeforge.runtime.launch")], 60,
                f"the script's process in {pod}")
    os.kill(pids[0], signal.SIGKILL)


def killed_once_then_resumed(jobs: Jobs, cluster: ClusterHandle, name: str, script: str) -> dict:
    wait(lambda: (jobs.status(KIND, name).get("lastCheckpoint") or {}).get("step", 0) >= 10, 180,
         "a checkpoint committed by the script")
    kill_script(jobs.ns, f"{name}-worker-1", script)
    wait(lambda: jobs.status(KIND, name).get("attempt") == 1, 90, "the gang to be restarted")
    st = jobs.wait_phase(KIND, name, {"Succeeded", "Failed"}, timeout=300)
    assert st["phase"] == "Succeeded", st
    assert st["restarts"] == 1 and st["progress"]["step"] == 80 and st["progress"]["percent"] == 100
    assert st["lastCheckpoint"]["step"] == 80
    log = cluster.pod_log(jobs.ns, f"{name}-worker-0")
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 10, log[-2000:]
    return st


def test_own_script_resumes_from_its_own_checkpoint_after_a_kill(operator: Operator, jobs: Jobs,
                                                                 cluster: ClusterHandle, scripts: dict[str, str]):
    script = scripts["user_train.py"]
    jobs.create(entrypoint_job(jobs, "byos", script, ["--steps", "80", "--every", "10"]))
    pods = wait(lambda: len(jobs.pods("byos")) == 2 and jobs.pods("byos"), 60, "2 pods")
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["KUBEFORGE_CHECKPOINT_URI"] == f"s3://kubeforge/checkpoints/{jobs.ns}/byos"
    assert env["PET_NNODES"] == "2"
    killed_once_then_resumed(jobs, cluster, "byos", script)


def test_a_script_that_ignores_the_sdk_still_succeeds(operator: Operator, jobs: Jobs, scripts: dict[str, str]):
    jobs.create(entrypoint_job(jobs, "plain", scripts["plain_train.py"], []))
    st = jobs.wait_phase(KIND, "plain", {"Succeeded", "Failed"}, timeout=180)
    assert st["phase"] == "Succeeded" and st["restarts"] == 0 and st["message"] == "training finished"
    assert "progress" not in st  # it reported nothing; only the launcher's heartbeat watched it


def torchx(tmp_path: Path, cluster: ClusterHandle, *args: str, timeout: float = 120) -> str:
    env = entry_point_env(tmp_path / "entry-points") | {"KUBECONFIG": str(cluster.kubeconfig)}
    cli = str(Path(sys.executable).parent / "torchx")
    out = subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert out.returncode == 0, f"torchx {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_torchx_run_status_log_list_and_cancel(operator: Operator, jobs: Jobs, cluster: ClusterHandle,
                                               scripts: dict[str, str], tmp_path: Path):
    script = scripts["user_train.py"]
    cfg = f"namespace={jobs.ns},checkpoint_uri=s3://kubeforge/torchx/{jobs.ns},checkpoint_secret=kubeforge-s3"
    ddp = ["dist.ddp", "-j", "2x1", "--max_retries", "2", "--cpu", "1", "--memMB", "512",
           "--image", "ghcr.io/kubeforge/trainer:0.1.0", "--env", f"PYTHONPATH={CODE}", "--script", script, "--"]
    out = torchx(tmp_path, cluster, "run", "-s", "kubeforge", "-cfg", cfg, *ddp, "--steps", "80", "--every", "10")
    handle = re.search(r"kubeforge://[^\s]+", out).group(0)
    name = handle.rsplit(":", 1)[1]
    assert jobs.get(KIND, name)["spec"]["entrypoint"]["script"] == script

    wait(lambda: "RUNNING" in torchx(tmp_path, cluster, "status", handle), 120, "torchx status RUNNING")
    assert f"{jobs.ns}:{name}" in torchx(tmp_path, cluster, "list", "-s", "kubeforge", "-cfg", f"namespace={jobs.ns}")
    st = killed_once_then_resumed(jobs, cluster, name, script)
    assert st["restarts"] == 1
    status = torchx(tmp_path, cluster, "status", handle)
    assert "SUCCEEDED" in status, status
    role = jobs.get(KIND, name)["metadata"]["annotations"]["kubeforge.dev/torchx-role"]
    log = torchx(tmp_path, cluster, "log", f"{handle}/{role}/0")
    assert "resumed from step" in log, log[-2000:]

    # cancel: the gang stops (the sdk checkpoints on SIGTERM) and the job stays, suspended and cancelled
    out = torchx(tmp_path, cluster, "run", "-s", "kubeforge", "-cfg", cfg, *ddp, "--steps", "100000",
                 "--every", "1000")
    other = re.search(r"kubeforge://[^\s]+", out).group(0)
    other_name = other.rsplit(":", 1)[1]
    wait(lambda: (jobs.status(KIND, other_name).get("progress") or {}).get("step", 0) >= 5, 180, "5 steps")
    torchx(tmp_path, cluster, "cancel", other)
    wait(lambda: "CANCELLED" in torchx(tmp_path, cluster, "status", other), 60, "torchx status CANCELLED")
    wait(lambda: not jobs.pods(other_name), 120, "the cancelled gang's pods to be gone")
    st = jobs.status(KIND, other_name)
    assert st["phase"] == "Suspended" and st["restarts"] == 0
    assert 5 <= st["lastCheckpoint"]["step"] < 1000, "SIGTERM must make the sdk script checkpoint off its interval"
