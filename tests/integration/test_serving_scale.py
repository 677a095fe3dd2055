"""InferenceDeployment has no scale subresource (two pools per object; the operator's autoscaler owns a pool's
size): `kubectl scale` is refused by the API server, never accepted and ignored (docs/install-helm.md)."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from builders import inference_deployment
from kubeforge import GROUP, VERSION
from kubeforge.controller.kube import RESOURCES, Kube

pytestmark = pytest.mark.integration


def test_kubectl_scale_is_refused_not_ignored(cluster, namespace):
    kube = Kube(cluster.api_client())
    obj = inference_deployment("scaled")
    obj["metadata"]["namespace"] = namespace
    assert kube.create(obj)
    crd = client.ApiextensionsV1Api(cluster.api_client()).read_custom_resource_definition(
        f"inferencedeployments.{GROUP}")
    served = next(v for v in crd.spec.versions if v.name == VERSION)
    assert served.subresources.scale is None and served.subresources.status is not None
    api = cluster.api_client()
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/inferencedeployments/scaled/scale"
    for method, body in (("GET", None), ("PATCH", {"spec": {"replicas": 5}})):
        with pytest.raises(ApiException) as err:  # what `kubectl scale` sends
            api.call_api(path, method, body=body, auth_settings=["BearerToken"], _preload_content=False,
                         header_params={"Content-Type": "application/merge-patch+json"})
        assert err.value.status == 404, (method, err.value.body)
    stored = kube.get(RESOURCES["InferenceDeployment"], namespace, "scaled")
    assert stored["spec"]["decode"]["replicas"] == 2 and stored["metadata"]["generation"] == 1
