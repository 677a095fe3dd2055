"""`kubeforge dev-cluster ...`: a real Kubernetes control plane on one machine, pods as local processes.

    kubeforge dev-cluster up [--nodes N] [--gpus-per-node G] [--with-operator] [--with-kueue] [--state-dir DIR]
    kubeforge dev-cluster status [--json]
    kubeforge dev-cluster env
    kubeforge dev-cluster logs <ns>/<pod> [-c container] [-f]
    kubeforge dev-cluster down [--purge]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import assets
from .cluster import DevCluster, default_state_dir


def _print_exports(dc: DevCluster) -> None:
    for k, v in dc.env_exports().items():
        print(f"export {k}={shlex.quote(v)}")


def _cmd_up(a: argparse.Namespace) -> int:
    dc = DevCluster(a.state_dir)
    t0 = time.monotonic()
    try:
        dc.up(nodes=a.nodes, gpus_per_node=a.gpus_per_node, with_operator=a.with_operator,
              cpus_per_node=a.cpus_per_node, memory_per_node=a.memory_per_node, extra_crd_dirs=a.crds,
              with_kueue=a.with_kueue)
    except Exception as e:  # noqa: BLE001  any failure: one clear line and exit 1, logs name the component
        print(f"dev-cluster: up failed: {e}", file=sys.stderr)
        return 1
    kubectl = assets.find_binaries().get("kubectl")
    print(f"dev-cluster: ready in {time.monotonic() - t0:.1f}s (state: {dc.dir}); "
          f"pods' logs: kubeforge dev-cluster logs <ns>/<pod>"
          + (f"; a kubectl matching the server: {kubectl}" if kubectl else ""), file=sys.stderr)
    _print_exports(dc)
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    dc = DevCluster(a.state_dir)
    rows = dc.status()
    if a.json:
        print(json.dumps({"state_dir": str(dc.dir), "ports": dc.ports, "components": rows}, indent=2))
    else:
        if not rows:
            print(f"no dev cluster in {dc.dir}")
        for r in rows:
            print(f"{r['component']:<24} pid={r['pid']:<8} alive={str(r['alive']).lower():<6} "
                  f"healthy={str(r['healthy']).lower()}")
    return 0 if rows and all(r["healthy"] for r in rows) else 1


def _cmd_env(a: argparse.Namespace) -> int:
    dc = DevCluster(a.state_dir)
    if not dc.state:
        print(f"no dev cluster in {dc.dir}", file=sys.stderr)
        return 1
    _print_exports(dc)
    return 0


def _cmd_down(a: argparse.Namespace) -> int:
    DevCluster(a.state_dir).down(purge=a.purge)
    return 0


def _cmd_logs(a: argparse.Namespace) -> int:
    dc = DevCluster(a.state_dir)
    ns, _, pod = a.pod.rpartition("/")
    pod_dir = dc.dir / "pods" / f"{ns or 'default'}_{pod}"
    logs = sorted(pod_dir.glob("*.log"))
    if not logs:
        print(f"no logs for {ns or 'default'}/{pod} in {pod_dir}", file=sys.stderr)
        return 1
    if a.container:
        path = pod_dir / f"{a.container}.log"
        if not path.exists():
            print(f"no container {a.container!r}; have: {', '.join(p.stem for p in logs)}", file=sys.stderr)
            return 1
    elif len(logs) == 1:
        path = logs[0]
    else:
        print(f"pod has several containers, pick one with -c: {', '.join(p.stem for p in logs)}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        if a.tail is not None:
            lines = f.read().splitlines(keepends=True)[-a.tail:]
            out.write(b"".join(lines))
        else:
            out.write(f.read())
        out.flush()
        while a.follow:  # like `tail -f`: the file only grows (restarts append)
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
            else:
                time.sleep(0.3)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kubeforge dev-cluster",
                                 description="Local Kubernetes control plane whose pods run as local processes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None,
                        help=f"state dir (default {default_state_dir()}; env KUBEFORGE_DEVCLUSTER_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="start (or check) the cluster; prints env exports")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--gpus-per-node", type=int, default=2,
                    help="nvidia.com/gpu each fake node advertises (scheduling only; no GPU is attached)")
    up.add_argument("--cpus-per-node", default="8")
    up.add_argument("--memory-per-node", default="32Gi")
    up.add_argument("--with-operator", action="store_true", help="also run `python -m kubeforge operator`")
    up.add_argument("--with-kueue", action="store_true",
                    help="also run the Kueue controller (v0.17.0, built on first use) with its CRDs and webhooks")
    up.add_argument("--crds", type=Path, action="append", default=[], metavar="DIR",
                    help="also create-or-replace the CRDs in DIR/*.yaml (repeatable), e.g. Kueue's")
    up.set_defaults(fn=_cmd_up)
    st = sub.add_parser("status", parents=[common], help="each component: pid, alive, healthy")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)
    env = sub.add_parser("env", parents=[common], help="print the export lines again")
    env.set_defaults(fn=_cmd_env)
    dn = sub.add_parser("down", parents=[common], help="stop every component and pod process")
    dn.add_argument("--purge", action="store_true", help="also delete the state dir (etcd data, PKI, logs)")
    dn.set_defaults(fn=_cmd_down)
    lg = sub.add_parser("logs", parents=[common], help="a pod container's output (kubectl logs cannot work here)")
    lg.add_argument("pod", help="<namespace>/<pod> (namespace defaults to `default`)")
    lg.add_argument("-c", "--container")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--tail", type=int, default=None)
    lg.set_defaults(fn=_cmd_logs)
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
