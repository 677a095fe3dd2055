"""`make demo`: the whole life of a tiny model on CPU, on a real control plane, from one `kubectl apply`.

examples/lifecycle.yaml holds four objects chained by `model.from`: a PretrainJob, a ContextExtensionJob that
extends its context window, an RLJob that post-trains the extended model with a verifiable reward, and an
InferenceDeployment that serves the RLJob's output. The demo uploads the data they read, applies the file in
one go (each object waits for its source on its own), shows a live view of the four objects (one line each,
updated in place), then prints the needle-in-a-haystack heatmap's path, the reward curve, the served model's
lineage, and a completion through the router.

Without KUBECONFIG it brings up the dev cluster (real kube-apiserver, etcd, scheduler, controller-manager,
pods as local processes, an S3 server) with the operator and its admission webhook. With KUBECONFIG set it
uses that cluster and expects the operator installed there and AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY pointing at the store the cluster's `kubeforge-s3` Secret names. Nothing is faked: every
figure printed is read from the objects' status or from the store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "default"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LIFECYCLE = EXAMPLES / "lifecycle.yaml"
ORDER = ("PretrainJob", "ContextExtensionJob", "RLJob", "InferenceDeployment")
DONE = {"Succeeded", "Failed"}


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster() -> Any:
    """The handle on the cluster the demo runs against (the dev cluster when KUBECONFIG is unset)."""
    from kubeforge.devcluster import testing
    from kubeforge.devcluster.cluster import DevCluster, default_state_dir

    if os.environ.get("KUBECONFIG"):
        handle = testing.from_env()
        _say(f"using the cluster in KUBECONFIG ({handle.kubeconfig}); the operator must be installed there")
        return handle
    dc = DevCluster(default_state_dir())
    _say(f"starting the dev cluster in {dc.dir} (the first run builds Kubernetes: ~10 min)")
    webhook_env = ["env", "KUBEFORGE_WEBHOOK=true", "KUBEFORGE_WEBHOOK_HOST=127.0.0.1",
                   "KUBEFORGE_WEBHOOK_LISTEN=127.0.0.1", f"KUBEFORGE_WEBHOOK_PORT={_free_port()}"]
    dc.up(nodes=2, gpus_per_node=2, with_operator=True,
          operator_argv=[*webhook_env, sys.executable, "-m", "kubeforge", "operator"])
    for key, value in dc.env_exports().items():
        os.environ[key] = value
    _say("dev cluster up; to use it from your shell: eval \"$(kubeforge dev-cluster env)\"")
    return testing.from_devcluster(dc)


def _kubectl() -> str | None:
    """A kubectl to show the user's own commands with: the dev cluster's (matching the server), else PATH's."""
    from kubeforge.devcluster import assets

    try:
        found = assets.find_binaries().get("kubectl")
    except Exception:  # noqa: BLE001 - no cached binaries: fall back to PATH
        found = None
    return str(found) if found else shutil.which("kubectl")


# --- applying ------------------------------------------------------------------------------------------
def _wait_gone(kube: Any, kind: str, name: str, timeout: float = 120) -> None:
    from kubeforge.controller.kube import RESOURCES

    deadline = time.monotonic() + timeout
    while kube.get(RESOURCES[kind], NAMESPACE, name) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{kind} {name} from an earlier demo run was not deleted within {timeout:.0f}s")
        time.sleep(0.5)


def _clear_prefix(s3: Any, uri: str) -> None:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _fresh_start(kube: Any, s3: Any, docs: list[dict[str, Any]]) -> None:
    """Delete an earlier demo run's objects (downstream first) and checkpoints, so this run starts at step 0."""
    from kubeforge.controller.kube import RESOURCES

    for obj in sorted(docs, key=lambda o: -ORDER.index(o["kind"])):
        name = obj["metadata"]["name"]
        if kube.get(RESOURCES[obj["kind"]], NAMESPACE, name) is not None:
            _say(f"deleting {obj['kind']} {name} from an earlier run")
            kube.delete(RESOURCES[obj["kind"]], NAMESPACE, name)
            _wait_gone(kube, obj["kind"], name)
    for obj in docs:
        uri = ((obj.get("spec") or {}).get("checkpoint") or {}).get("uri")
        if uri:
            _clear_prefix(s3, uri)


def _apply(kube: Any, path: Path, docs: list[dict[str, Any]]) -> None:
    """`kubectl apply -f <file>` as a user would (retried while the operator's webhook starts); the API client
    when no kubectl is at hand."""
    kubectl = _kubectl()
    deadline = time.monotonic() + 90
    while True:
        if kubectl:
            cmd = [kubectl, "apply", "-n", NAMESPACE, "-f", str(path)]
            _say("$ kubectl apply -f " + str(path.relative_to(REPO) if path.is_relative_to(REPO) else path))
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                for line in run.stdout.splitlines():
                    _say("  " + line)
                return
            why = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["kubectl failed"]
        else:
            try:
                for obj in docs:
                    kube.create({**obj, "metadata": {**obj["metadata"], "namespace": NAMESPACE}})
                    _say(f"created {obj['kind']} {obj['metadata']['name']}")
                return
            except Exception as exc:  # noqa: BLE001 - retried below, then raised
                why = [str(exc).splitlines()[0]]
        if time.monotonic() > deadline:
            raise SystemExit(f"could not apply {path}: {why[0]}")
        _say(f"the API refused the apply for now ({why[0][:120]}); retrying")
        time.sleep(2)


# --- the live view -------------------------------------------------------------------------------------
def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def _waiting_reason(st: dict[str, Any]) -> str:
    """The condition that says why an object is not running yet (its source, its queue...)."""
    for c in st.get("conditions") or []:
        if c.get("type") in ("Reconciling", "Stalled", "Ready") and c.get("status") in ("True", "False") \
                and c.get("message") and "waiting" in c["message"].lower():
            return c["message"]
    return st.get("message") or ""


def status_line(kind: str, name: str, obj: dict[str, Any] | None) -> str:
    """One line that says where an object is: phase, then what matters for its kind."""
    st = (obj or {}).get("status") or {}
    phase = st.get("phase") or ("(not created)" if obj is None else "Pending")
    head = f"{kind:<20} {name:<16} {phase:<15}"
    prog = st.get("progress") or {}
    if phase in ("Pending", "Queued", "WaitingForModel") and _waiting_reason(st):
        return f"{head} {_waiting_reason(st)}"
    if kind == "InferenceDeployment":
        tail = f"pools {st.get('readyPools') or '-'}"
        if st.get("endpoint"):
            tail += f"  {st['endpoint']}"
        return f"{head} {tail}"
    step = f"step {prog.get('step', '-')}/{prog.get('totalSteps', '-')}"
    if kind == "ContextExtensionJob":
        tail = f"stage {st.get('currentStage') or '-'}  {step}  loss {_num(prog.get('loss'))}"
        scores = [s.get("evals", {}).get("needleScore") for s in st.get("stages") or [] if s.get("evals")]
        if scores:
            tail += f"  needle {_num(scores[-1], '{:.2f}')}"
    elif kind == "RLJob":
        rl = st.get("rl") or {}
        tail = (f"{step}  reward {_num(prog.get('reward'), '{:.2f}')} (from {_num(rl.get('initialReward'), '{:.2f}')})"
                f"  kl {_num(rl.get('kl'), '{:.4f}')}")
    else:
        tps = prog.get("tokensPerSecond")
        tail = f"{step}  loss {_num(prog.get('loss'))}  {round(tps) if tps else '-'} tok/s"
    if st.get("restarts"):
        tail += f"  restarts {st['restarts']}"
    return f"{head} {tail}"


class LiveView:
    """One line per object, rewritten in place on a terminal; on a pipe, a line is printed when it changes."""

    def __init__(self, objects: list[tuple[str, str]], out: Any = None) -> None:
        self.objects = objects
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.drawn = 0
        self.last: dict[tuple[str, str], str] = {}

    def update(self, lines: dict[tuple[str, str], str], elapsed: float) -> None:
        stamp = f"{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}"
        if self.tty:
            width = shutil.get_terminal_size((160, 20)).columns - 1
            buf = f"\x1b[{self.drawn}F" if self.drawn else ""
            for key in self.objects:
                buf += "\x1b[2K" + f"{stamp} {lines[key]}"[:width] + "\n"
            self.out.write(buf)
            self.out.flush()
            self.drawn = len(self.objects)
            return
        for key in self.objects:
            if self.last.get(key) != lines[key]:
                self.out.write(f"{stamp} {lines[key]}\n")
        self.out.flush()
        self.last = dict(lines)


def follow(kube: Any, docs: list[dict[str, Any]], timeout: float) -> dict[tuple[str, str], dict[str, Any]]:
    """Poll the objects until every job has finished and the InferenceDeployment is Ready (or one failed)."""
    from kubeforge.controller.kube import RESOURCES

    keys = [(o["kind"], o["metadata"]["name"]) for o in sorted(docs, key=lambda o: ORDER.index(o["kind"]))]
    view = LiveView(keys)
    start = time.monotonic()
    while True:
        objs = {k: kube.get(RESOURCES[k[0]], NAMESPACE, k[1]) for k in keys}
        view.update({k: status_line(k[0], k[1], objs[k]) for k in keys}, time.monotonic() - start)
        phases = {k: ((objs[k] or {}).get("status") or {}).get("phase") for k in keys}
        if any(p == "Failed" for p in phases.values()):
            return objs
        if all(phases[k] in DONE if k[0] != "InferenceDeployment" else phases[k] == "Ready" for k in keys):
            return objs
        if time.monotonic() - start > timeout:
            raise SystemExit(f"the chain did not finish in {timeout:.0f}s: {phases}")
        time.sleep(1)


# --- what the chain produced ---------------------------------------------------------------------------
def _get_object(s3: Any, uri: str) -> bytes | None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception:  # noqa: BLE001 - reported by the caller as missing
        return None


def show_needle(s3: Any, obj: dict[str, Any], out_dir: Path) -> None:
    """Each stage's NIAH heatmap, fetched from the job's checkpoint store to a local file, and the grid."""
    spec, st = obj["spec"], obj.get("status") or {}
    base = spec["checkpoint"]["uri"].rstrip("/")
    for stage in st.get("stages") or []:
        n = stage["index"] + 1 if isinstance(stage.get("index"), int) else None
        if n is None:
            continue
        for idx in (stage["index"], n):  # the stage folder's number as the runtime wrote it
            png = _get_object(s3, f"{base}/evals/stage-{idx}/niah.png")
            grid = _get_object(s3, f"{base}/evals/stage-{idx}/evals.json")
            if png:
                break
        if not png:
            continue
        local = out_dir / f"niah-stage-{n}-{stage.get('seqLen')}.png"
        local.write_bytes(png)
        _say(f"stage {n} ({stage.get('seqLen')} tokens, RoPE theta {stage.get('ropeTheta')}): needle heatmap "
             f"{local}")
        needle = (json.loads(grid) if grid else {}).get("needle") or {}
        if needle.get("cells"):
            acc = {(c["length"], c["depth"]): c["tokenAccuracy"] for c in needle["cells"]}
            _say("  depth \\ length " + " ".join(f"{L:>6}" for L in needle["lengths"]))
            for d in needle["depths"]:
                _say(f"  {d:>14.0%} " + " ".join(f"{acc[(L, d)]:>6.2f}" for L in needle["lengths"]))


def show_rewards(obj: dict[str, Any]) -> None:
    rl = (obj.get("status") or {}).get("rl") or {}
    curve = rl.get("rewardCurve") or []
    if not curve:
        _say("the RLJob reported no reward curve")
        return
    _say(f"reward curve of RLJob {obj['metadata']['name']} (mean reward per step; started at "
         f"{_num(rl.get('initialReward'), '{:.2f}')}):")
    for p in curve[:: max(1, len(curve) // 12)] + ([curve[-1]] if len(curve) > 12 else []):
        bar = "#" * int(round(40 * max(0.0, min(1.0, float(p["reward"])))))
        _say(f"  step {p['step']:>4}  {float(p['reward']):.2f}  {bar}")


def _service_address(kube: Any, service: str) -> str | None:
    """The Service's ClusterIP and port; the dev cluster's node agent proxies it on this machine."""
    from kubeforge.controller.kube import RESOURCES

    svc = kube.get(RESOURCES["Service"], NAMESPACE, service) or {}
    ip = (svc.get("spec") or {}).get("clusterIP")
    ports = (svc.get("spec") or {}).get("ports") or []
    if not ip or ip == "None" or not ports:
        return None
    return f"http://{ip}:{ports[0]['port']}"


def show_serving(cluster: Any, kube: Any, obj: dict[str, Any], prompt: str) -> None:
    import httpx

    st = obj.get("status") or {}
    _say(f"InferenceDeployment {obj['metadata']['name']} serves {st.get('resolvedModelUri')} at {st.get('endpoint')}")
    if cluster.dev is None:
        _say(f"from inside the cluster: curl {st.get('endpoint')}/v1/completions")
        return
    service = (st.get("endpoint") or "").split("//", 1)[-1].split(".", 1)[0]
    base = _service_address(kube, service)
    if base is None:
        raise SystemExit(f"Service {service} has no cluster IP")
    models = httpx.get(f"{base}/v1/models", timeout=30).json().get("data") or []
    from kubeforge.runtime.provenance import chain

    for card in models:
        links = chain(card.get("provenance"))
        if links:
            _say(f"lineage of {card.get('id')} on /v1/models (kubeforge-provenance.json), newest first:")
        for p in links:
            metrics = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in (p.get("metrics") or {}).items())
            _say(f"  {p.get('kind')} {p.get('name')} (uid {p.get('uid')}): {p.get('steps')} steps"
                 f"{', ' + metrics if metrics else ''}; data {', '.join(p.get('data') or []) or '-'}")
    served = obj["spec"].get("servedModelName") or (models[0]["id"] if models else obj["metadata"]["name"])
    body = {"model": served, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    resp.raise_for_status()
    _say(f"completion of {prompt!r} through the router: {resp.json()['choices'][0]['text']!r}")


def _upload_data(s3: Any, workdir: Path) -> list[str]:
    """The corpus, the RL prompts and anything else the lifecycle's objects read."""
    from kubeforge.runtime import lifecycle_data

    return list(lifecycle_data.upload(s3, "s3://kubeforge", workdir).values())


def main(argv: list[str] | None = None) -> int:
    from kubeforge.controller.kube import Kube

    parser = argparse.ArgumentParser(prog="kubeforge demo", description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", type=Path, default=LIFECYCLE, help="the chain to apply")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the whole chain may take")
    parser.add_argument("--out", type=Path, default=Path(".kubeforge/demo"), help="where heatmaps are written")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    cluster = _cluster()
    kube = Kube(cluster.api_client())
    s3 = cluster.s3_client()
    docs = [d for d in yaml.safe_load_all(args.file.read_text()) if d]
    with tempfile.TemporaryDirectory(prefix="kubeforge-demo-") as tmp:
        for uri in _upload_data(s3, Path(tmp)):
            _say(f"uploaded {uri}")
    _fresh_start(kube, s3, docs)
    t_apply = time.monotonic()
    _apply(kube, args.file, docs)
    objs = follow(kube, docs, args.timeout)
    t_done = time.monotonic()
    failed = [(k, o) for k, o in objs.items() if ((o or {}).get("status") or {}).get("phase") == "Failed"]
    if failed:
        for (kind, name), o in failed:
            _say(f"{kind} {name} failed: {((o or {}).get('status') or {}).get('message')}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    by_kind = {k[0]: o for k, o in objs.items()}
    if "ContextExtensionJob" in by_kind:
        show_needle(s3, by_kind["ContextExtensionJob"], args.out.resolve())
    if "RLJob" in by_kind:
        show_rewards(by_kind["RLJob"])
    if "InferenceDeployment" in by_kind:
        show_serving(cluster, kube, by_kind["InferenceDeployment"], prompt=_prompt(docs))
    kubectl = _kubectl()
    if kubectl:
        _say("$ kubectl get kubeforge")
        run = subprocess.run([kubectl, "get", "kubeforge", "-n", NAMESPACE], capture_output=True, text=True)
        for line in (run.stdout or run.stderr).splitlines():
            _say("  " + line)
    _say(f"the chain took {t_done - t_apply:.0f} s from apply to a Ready InferenceDeployment "
         f"({time.monotonic() - t0:.0f} s in all)")
    if cluster.dev is not None:
        _say("the dev cluster keeps running; `kubeforge dev-cluster down` stops it")
    return 0


def _prompt(docs: list[dict[str, Any]]) -> str:
    """A prompt of the kind the RLJob trained on (the file may name one in an annotation)."""
    for d in docs:
        ann = (d.get("metadata") or {}).get("annotations") or {}
        if ann.get("kubeforge.dev/demo-prompt"):
            return str(ann["kubeforge.dev/demo-prompt"])
    return "2+3="


if __name__ == "__main__":
    raise SystemExit(main())
