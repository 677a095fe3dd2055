"""`kubeforge dev-cluster`: a real Kubernetes v1.34 control plane on one machine whose pods run as local
processes (see docs/dev-cluster.md)."""

from __future__ import annotations

__all__ = ["DevCluster"]


def __getattr__(name: str):  # lazy: the node agent and the shim must not import the whole CLI stack
    if name == "DevCluster":
        from .cluster import DevCluster

        return DevCluster
    raise AttributeError(name)
