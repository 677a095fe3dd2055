"""Locate the control-plane binaries; build them with scripts/build-k8s.sh when they are missing.

Kubernetes v1.34.4 (the newest minor of the 1.30-1.34 range users run, with CEL, policy/v1 and bound
ServiceAccount tokens as they behave there), etcd v3.6.17 (the 3.6 line v1.34 is released with) and, on
request, Kueue v0.17.0 — all built from the Go module proxy into ~/.cache/kubeforge, keyed by version."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

K8S_VERSION = "v1.34.4"
KUEUE_VERSION = "v0.17.0"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kubectl")
REQUIRED = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge"))


def default_bin_dir() -> Path:
    return Path(os.environ.get("KUBEFORGE_K8S_BIN", cache_dir() / f"k8s-{K8S_VERSION}" / "bin"))


def kueue_bin_dir() -> Path:
    return cache_dir() / f"kueue-{KUEUE_VERSION}" / "bin"


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


def ensure_kueue(log: bool = True) -> Path:
    """The Kueue manager binary (KUBEBUILDER_ASSETS/kueue first), built on first use."""
    if os.environ.get("KUBEBUILDER_ASSETS"):
        p = Path(os.environ["KUBEBUILDER_ASSETS"]) / "kueue"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    p = kueue_bin_dir() / "kueue"
    if p.is_file() and os.access(p, os.X_OK):
        return p
    script = build_script()
    if script is None:
        raise RuntimeError("missing kueue: set KUBEBUILDER_ASSETS or run scripts/build-k8s.sh kueue from a checkout")
    if log:
        print(f"dev-cluster: building Kueue {KUEUE_VERSION} with {script} (first run: ~5 min)", flush=True)
    subprocess.run(["bash", str(script), "kueue"], check=True, stdout=subprocess.DEVNULL if not log else None)
    if not p.is_file():
        raise RuntimeError(f"build finished but {p} is missing")
    return p


def kueue_module_dir() -> Path:
    """Kueue's module source in the Go module cache (its CRDs, webhook and RBAC manifests), fetched by the build."""
    d = cache_dir() / "go" / "mod" / "sigs.k8s.io" / f"kueue@{KUEUE_VERSION}"
    if not (d / "config").is_dir():
        ensure_kueue()
    return d
