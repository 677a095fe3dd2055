"""Shared fixtures.

`cluster` (session): the cluster in $KUBECONFIG when set (S3 from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY), otherwise a dev cluster (`kubeforge dev-cluster`, 2 nodes x 2 GPUs) started once for
the session in its own state dir and stopped at the end. Set KUBEFORGE_TEST_KEEP_CLUSTER=1 to leave it up.

`namespace` (function): a fresh namespace with the `kubeforge-s3` Secret, deleted afterwards.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(_ROOT / "operator"))  # run from a checkout without `pip install -e .`

if TYPE_CHECKING:
    from kubeforge.devcluster.testing import ClusterHandle


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    from kubeforge.devcluster import testing
    from kubeforge.devcluster.cluster import DevCluster

    handle = testing.from_env()
    if handle is not None:
        yield handle
        return
    state_dir = Path(os.environ["KUBEFORGE_TEST_DEVCLUSTER_DIR"]) if os.environ.get(
        "KUBEFORGE_TEST_DEVCLUSTER_DIR") else tmp_path_factory.mktemp("devcluster")
    dc = DevCluster(state_dir)
    try:
        dc.up(nodes=2, gpus_per_node=2, owner_pid=os.getpid())
    except Exception:
        dc.down()
        raise
    try:
        yield testing.from_devcluster(dc)
    finally:
        if not os.environ.get("KUBEFORGE_TEST_KEEP_CLUSTER"):
            dc.down()


@pytest.fixture
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    name = cluster.create_namespace(prefix="t")
    try:
        yield name
    finally:
        if not os.environ.get("KUBEFORGE_TEST_KEEP_NAMESPACES"):
            cluster.delete_namespace(name)
