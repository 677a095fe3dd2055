"""Locate the control-plane binaries; build them with scripts/build-k8s.sh when they are missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

K8S_VERSION = "v1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kubectl")
REQUIRED = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge"))


def default_bin_dir() -> Path:
    return Path(os.environ.get("KUBEFORGE_K8S_BIN", cache_dir() / f"k8s-{K8S_VERSION}" / "bin"))


def build_script() -> Path | None:
    # operator/kubeforge/devcluster/assets.py -> repo root
    here = Path(__file__).resolve()
    for root in here.parents:
        cand = root / "scripts" / "build-k8s.sh"
        if cand.is_file():
            return cand
    return None


def find_binaries() -> dict[str, Path]:
    """Every binary found, KUBEBUILDER_ASSETS first (envtest convention), then the build cache."""
    found: dict[str, Path] = {}
    dirs = []
    if os.environ.get("KUBEBUILDER_ASSETS"):
        dirs.append(Path(os.environ["KUBEBUILDER_ASSETS"]))
    dirs.append(default_bin_dir())
    for name in BINARIES:
        for d in dirs:
            p = d / name
            if p.is_file() and os.access(p, os.X_OK):
                found[name] = p
                break
    return found


def ensure_binaries(log: bool = True) -> dict[str, Path]:
    found = find_binaries()
    if all(n in found for n in REQUIRED):
        return found
    script = build_script()
    if script is None:
        missing = [n for n in REQUIRED if n not in found]
        raise RuntimeError(
            f"missing {missing}: set KUBEBUILDER_ASSETS or run scripts/build-k8s.sh from a kubeforge checkout"
        )
    if log:
        print(f"dev-cluster: building control-plane binaries with {script} (first run: ~15 min)", flush=True)
    subprocess.run(["bash", str(script)], check=True, stdout=subprocess.DEVNULL if not log else None)
    found = find_binaries()
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        raise RuntimeError(f"build finished but {missing} still missing")
    return found
