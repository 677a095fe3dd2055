"""The Helm chart, rendered and linted by real Helm (helm-python-sdk: Helm v4 as a library), for the
default values and every documented option."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubeforge import helmcheck

PLURALS = ["pretrainjobs", "contextextensionjobs", "rljobs", "inferencedeployments"]


def docs(values=None) -> list[dict]:
    return helmcheck.render(values)


def one(rendered: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in rendered if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def operator_container(rendered: list[dict]) -> dict:
    return one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_make_verify_check_passes():
    assert helmcheck.main([]) == 0


@pytest.mark.parametrize("case", sorted(helmcheck.VALUE_MATRIX))
def test_helm_lint_strict_is_clean(case):
    assert helmcheck.lint(helmcheck.VALUE_MATRIX[case]) == []


@pytest.mark.parametrize("case", sorted(helmcheck.VALUE_MATRIX))
def test_rendered_rbac_covers_what_the_operator_uses(case):
    values = helmcheck.VALUE_MATRIX[case]
    assert helmcheck.check_rbac(docs(values), (values.get("operator") or {}).get("namespaces") or []) == []


def test_a_digest_tag_renders_a_digest_reference():
    digest = "sha256:" + "ab" * 32
    assert operator_container(docs({"image": {"tag": digest}}))["image"] == f"ghcr.io/kubeforge/operator@{digest}"
    assert operator_container(docs({"image": {"tag": "1.2.3"}}))["image"] == "ghcr.io/kubeforge/operator:1.2.3"


def test_the_webhook_configuration_is_the_charts_and_calls_the_service():
    rendered = docs()
    cfg = one(rendered, "ValidatingWebhookConfiguration")
    service = one(rendered, "Service", "kubeforge-webhook")
    secret = one(rendered, "Secret", "kubeforge-webhook-tls")
    assert len(cfg["webhooks"]) == len(PLURALS)
    for hook, plural in zip(cfg["webhooks"], PLURALS):
        client = hook["clientConfig"]
        assert "url" not in client
        assert client["service"] == {"name": service["metadata"]["name"], "namespace": "kubeforge-system",
                                     "port": 9443, "path": f"/validate-{plural}"}
        assert client["caBundle"] == secret["data"]["ca.crt"]
        assert [r["operations"] for r in hook["rules"]] == [["CREATE", "UPDATE"]]  # never DELETE
        assert hook["rules"][0]["resources"] == [plural]
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    env = {e["name"]: e.get("value") for e in operator_container(rendered)["env"]}
    assert env["KUBEFORGE_WEBHOOK_CONFIGURATION"] == ""  # the operator does not create its own


def test_the_operator_serves_the_paths_and_operations_the_chart_configures():
    """kopf's own registry, in a process started the way the chart starts the operator."""
    code = ("import kopf, json, kubeforge.controller.handlers;"
            "r = kopf.get_default_registry();"
            "print(json.dumps({h.id: sorted(h.operations or ['*']) for h in r._webhooks.get_all_handlers()}))")
    env = {**os.environ, "KUBEFORGE_WEBHOOK": "true", "KUBEFORGE_WEBHOOK_CONFIGURATION": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {f"validate-{p}": ["CREATE", "UPDATE"] for p in PLURALS}


def test_webhook_certificate_from_cert_manager_or_an_own_secret():
    rendered = docs({"webhook": {"certificate": "certManager"}})
    cfg = one(rendered, "ValidatingWebhookConfiguration")
    assert cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "kubeforge-system/kubeforge-webhook"
    assert one(rendered, "Certificate")["spec"]["secretName"] == "kubeforge-webhook-tls"
    own = docs({"webhook": {"certificate": "secret", "secretName": "mine", "caBundle": "Zm9v"}})
    assert not [d for d in own if d["kind"] == "Secret"]
    assert one(own, "ValidatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"] == "Zm9v"
    volumes = one(own, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": "mine"}} in volumes


def test_replicas_peer_roll_without_a_gap_and_are_ready_only_when_serving_admission():
    rendered = docs()
    dep = one(rendered, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = operator_container(rendered)
    assert c["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert {e["name"]: e.get("value") for e in c["env"]}["KUBEFORGE_PEERING"] == "kubeforge"
    assert one(rendered, "ClusterKopfPeering")["metadata"]["name"] == "kubeforge"
    assert one(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_standalone_is_one_replica_and_two_are_refused():
    dep = one(docs({"replicaCount": 1, "peering": {"enabled": False}}), "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    with pytest.raises(Exception, match="replicaCount must be 1"):
        docs({"replicaCount": 2, "peering": {"enabled": False}})


def test_rbac_reads_no_configmap_it_did_not_create_and_can_set_owner_references():
    role = one(docs(), "ClusterRole", "kubeforge")
    by = helmcheck.rules_by_resource([role])
    assert by[("", "configmaps")] == {"get", "create", "patch", "delete"}  # no cluster-wide list/watch
    assert by[("kubeforge.dev", "pretrainjobs/finalizers")] == {"update"}


def test_watching_namespaces_grants_roles_there_not_cluster_wide():
    rendered = docs({"operator": {"namespaces": ["team-a", "team-b"]}})
    cluster = helmcheck.rules_by_resource([one(rendered, "ClusterRole", "kubeforge")])
    assert ("", "pods") not in cluster and ("kubeforge.dev", "pretrainjobs") not in cluster
    roles = {d["metadata"]["namespace"] for d in rendered if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"] for d in rendered if d["kind"] == "RoleBinding"}
    assert roles == bindings == {"team-a", "team-b"}
    assert {d["metadata"]["namespace"] for d in rendered if d["kind"] == "KopfPeering"} == {"team-a", "team-b"}
    hook = one(rendered, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]


def test_the_operator_creates_but_never_reads_secrets():
    for rendered in (docs(), docs({"operator": {"namespaces": ["team-a"]}})):
        for role in helmcheck.operator_rbac(rendered).values():
            by = helmcheck.rules_by_resource([role])
            if ("", "secrets") in by:
                assert by[("", "secrets")] == {"create"}
            assert by.get(("networking.k8s.io", "networkpolicies"), frozenset()) <= {"get", "create", "patch", "delete"}


def test_own_pod_policy_is_shipped_bound_and_switchable():
    rendered = docs()
    policy, binding = one(rendered, "ValidatingAdmissionPolicy"), one(rendered, "ValidatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"  # GA in 1.30
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail" and "matchResources" not in binding["spec"]
    scoped = one(docs({"operator": {"namespaces": ["team-a", "team-b"]}}), "ValidatingAdmissionPolicyBinding")
    assert scoped["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    off = docs(helmcheck.VALUE_MATRIX["no-own-pod-policy"])
    assert not [d for d in off if "AdmissionPolicy" in d["kind"]]


def test_user_roles_aggregate_into_the_built_in_ones():
    rendered = docs()
    editor, viewer = one(rendered, "ClusterRole", "kubeforge-editor"), one(rendered, "ClusterRole", "kubeforge-viewer")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "create" in editor["rules"][0]["verbs"] and set(viewer["rules"][0]["verbs"]) == {"get", "list", "watch"}


def test_metrics_service_and_service_monitor():
    rendered = docs({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    svc = one(rendered, "Service", "kubeforge-metrics")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    sm = one(rendered, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in operator_container(rendered)["env"]}
    assert env["KUBEFORGE_METRICS_PORT"] == "8081"


def test_workload_images_and_pull_secrets_reach_the_operator():
    env = {e["name"]: e.get("value") for e in operator_container(docs(helmcheck.VALUE_MATRIX["mirror"]))["env"]}
    assert env["KUBEFORGE_TRAINER_IMAGE"] == "mirror.corp/ml/trainer:0.1.0"
    assert env["KUBEFORGE_SERVE_IMAGE"] == "mirror.corp/ml/vllm-serve:0.1.0"
    assert json.loads(env["KUBEFORGE_IMAGE_PULL_SECRETS"]) == ["corp-registry"]


# --- the checks catch breakage -----------------------------------------------------------------------------
@pytest.fixture
def chart(tmp_path: Path) -> Path:
    dst = tmp_path / "kubeforge"
    shutil.copytree(helmcheck.CHART_DIR, dst)
    return dst


def test_a_rule_the_operator_needs_going_missing_is_reported(chart):
    helpers = chart / "templates" / "_helpers.tpl"
    helpers.write_text(helpers.read_text().replace('verbs: ["get", "list", "create", "patch", "delete"]',
                                                   'verbs: ["get", "create", "patch", "delete"]'))
    errors = helmcheck.check_rbac(helmcheck.render(chart=chart), [])
    assert any("lacks ['list'] on deployments" in e for e in errors), errors


def test_every_resource_kopf_watches_needs_list_and_watch_in_the_chart(chart):
    """The required rules include every watch registered with kopf (its handlers and indices), so a new watch
    cannot ship without its RBAC: the Kueue Workload watch here."""
    assert {("kueue.x-k8s.io", "workloads"), ("", "pods")} <= helmcheck.watched_by_kopf()
    helpers = chart / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    granted = 'resources: ["workloads"]\n    verbs: ["get", "list", "watch", "create", "patch", "delete"]'
    assert granted in text
    helpers.write_text(text.replace(granted, 'resources: ["workloads"]\n    verbs: ["get", "create", "patch", "delete"]'))
    errors = helmcheck.check_rbac(helmcheck.render(chart=chart), [])
    assert "RBAC lacks ['list', 'watch'] on workloads (apiGroup 'kueue.x-k8s.io'); the operator uses them" in errors


def test_the_reconcile_workers_and_api_concurrency_reach_the_operator():
    env = {e["name"]: e.get("value") for e in operator_container(docs({"operator": {
        "reconcileWorkers": 32, "apiConcurrency": 48}}))["env"]}
    assert (env["KUBEFORGE_RECONCILE_WORKERS"], env["KUBEFORGE_API_CONCURRENCY"]) == ("32", "48")
    from kubeforge.settings import OperatorSettings

    defaults = {e["name"]: e.get("value") for e in operator_container(docs({}))["env"]}
    settings = OperatorSettings(reconcile_workers=int(defaults["KUBEFORGE_RECONCILE_WORKERS"]),
                                api_concurrency=int(defaults["KUBEFORGE_API_CONCURRENCY"]))
    assert (settings.reconcile_workers, settings.api_concurrency) == (
        OperatorSettings.model_fields["reconcile_workers"].default, OperatorSettings.model_fields["api_concurrency"].default)


def test_a_values_error_is_reported_by_helm(chart):
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["webhook"]["failurePolicy"] = "Sometimes"
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    assert helmcheck.lint(chart=chart)


def test_crd_drift_is_reported(chart):
    crd = chart / "crds" / "pretrainjobs.kubeforge.dev.yaml"
    crd.write_text(crd.read_text() + "\n# edited\n")
    assert helmcheck.check_crds(chart) == [
        "chart crds/pretrainjobs.kubeforge.dev.yaml differs from crds/pretrainjobs.kubeforge.dev.yaml (run `make generate`)"]
