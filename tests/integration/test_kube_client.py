"""The operator's API client against a real API server: which API versions it takes as served."""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client

from kubeforge.controller import kube as kube_module
from kubeforge.controller.kube import Kube, Resource

pytestmark = pytest.mark.integration


def test_a_version_installed_after_a_no_is_found_and_a_yes_is_kept(cluster, namespace, monkeypatch):
    """Kueue installed (or upgraded) after the operator started: a 'not served' answer is not kept for
    good, so the version is found once its CRD is there; a 'served' answer is kept (no call per reconcile)."""
    group = f"p{uuid.uuid4().hex[:8]}.probe.kubeforge.dev"
    res = Resource(group, "v1beta2", "widgets")
    kube = Kube(cluster.api_client())
    monkeypatch.setattr(kube_module, "UNSERVED_TTL_S", 0.0)  # a 'no' is asked again at once (30 s in the operator)
    assert not kube.serves(res, namespace)

    ext = client.ApiextensionsV1Api(cluster.api_client())
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": v, "served": True, "storage": v == "v1beta2",
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}
                              for v in ("v1beta1", "v1beta2")]},
    }
    ext.create_custom_resource_definition(crd)
    try:
        deadline = time.monotonic() + 60
        while not kube.serves(res, namespace) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert kube.serves(res, namespace)
        calls = kube_module.metrics.API_REQUESTS.labels("list", "widgets", "200")._value.get()
        assert kube.serves(res, namespace) and kube.serves(res, namespace)
        assert kube_module.metrics.API_REQUESTS.labels("list", "widgets", "200")._value.get() == calls
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")
