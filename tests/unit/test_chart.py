"""The Helm chart's static checks: they pass on the real chart and catch each kind of breakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kubeforge import helmcheck
from kubeforge.controller.kube import RESOURCES, Resource


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    """A copy of the chart (and of the repository's crds/ beside it) to break."""
    dst = tmp_path / "kubeforge"
    shutil.copytree(helmcheck.CHART_DIR, dst)
    shutil.copytree(helmcheck.CRD_DIR, tmp_path / "crds")
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _values(chart: Path, **patch) -> None:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for dotted, value in patch.items():
        node = values
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def _errors(report: helmcheck.Report) -> str:
    return "\n".join(report.errors)


# --- the real chart ----------------------------------------------------------------------------------------
def test_the_real_chart_passes_every_check():
    report = helmcheck.check_all()
    assert report.ok, _errors(report)


def test_main_exits_zero_on_the_real_chart(capsys):
    assert helmcheck.main([]) == 0
    assert "ok" in capsys.readouterr().out


def test_the_copy_fixture_passes(chart):
    report = helmcheck.check_all(chart, chart.parent / "crds")
    assert report.ok, _errors(report)


def test_templates_reduce_to_the_expected_documents():
    report = helmcheck.Report()
    kinds = sorted(d["kind"] for t in helmcheck.load_templates(helmcheck.CHART_DIR, report) for d in t.docs)
    assert report.ok, _errors(report)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]


def test_every_operator_resource_is_required():
    need = helmcheck.required_permissions()
    for res in RESOURCES.values():
        assert (res.group, res.plural) in need
    assert ("kueue.x-k8s.io", "workloads") in need
    assert need[("", "pods")] >= {"get", "patch"}  # what the per-job Roles grant


# --- breakage is caught --------------------------------------------------------------------------------------
def test_values_outside_the_schema_bounds(chart):
    _values(chart, operator__resyncSeconds=0, image__pullPolicy="Sometimes")
    errors = _errors(helmcheck.check_values_schema(chart))
    assert "values.yaml: image.pullPolicy" in errors
    assert "values.yaml: operator.resyncSeconds" in errors


def test_value_of_the_wrong_type(chart):
    _values(chart, webhook__port="9443")
    assert "values.yaml: webhook.port" in _errors(helmcheck.check_values_schema(chart))


def test_value_the_schema_does_not_describe(chart):
    _values(chart, podSecurityContext__sysctls=[])
    errors = _errors(helmcheck.check_values_schema(chart))
    assert "podSecurityContext.sysctls is not described" in errors


def test_schema_property_without_description_or_bounds(chart):
    schema = json.loads((chart / "values.schema.json").read_text())
    del schema["properties"]["operator"]["properties"]["resyncSeconds"]["description"]
    del schema["properties"]["webhook"]["properties"]["port"]["maximum"]
    (chart / "values.schema.json").write_text(json.dumps(schema))
    errors = _errors(helmcheck.check_values_schema(chart))
    assert "operator.properties.resyncSeconds has no description" in errors
    assert "webhook.properties.port is numeric without minimum and maximum" in errors


def test_broken_values_yaml_is_reported_not_raised(chart):
    (chart / "values.yaml").write_text("image: [unclosed\n")
    report = helmcheck.check_all(chart, chart.parent / "crds")
    assert not report.ok


def test_template_referencing_a_missing_value(chart):
    _edit(chart / "templates/deployment.yaml", "{{ .Values.operator.resyncSeconds | quote }}",
          "{{ .Values.operator.resyncSecs | quote }}")
    errors = _errors(helmcheck.check_value_references(chart))
    assert "templates/deployment.yaml: .Values.operator.resyncSecs is not in values.yaml" in errors
    assert "values.yaml: operator.resyncSeconds is used by no template" in errors


def test_value_no_template_uses(chart):
    _values(chart, operator__leaderElection=True)
    assert "operator.leaderElection is used by no template" in _errors(helmcheck.check_value_references(chart))


def test_clusterrole_missing_a_resource(chart):
    _edit(chart / "templates/clusterrole.yaml", '"services", "configmaps", "serviceaccounts"',
          '"services", "serviceaccounts"')
    errors = _errors(helmcheck.check_rbac(chart))
    assert "lacks ['create', 'delete', 'get', 'patch'] on configmaps" in errors


def test_clusterrole_missing_a_verb(chart):
    _edit(chart / "templates/clusterrole.yaml", 'resources: ["pods"]\n    verbs: ["get", "list", "watch",',
          'resources: ["pods"]\n    verbs: ["get", "list",')
    assert "lacks ['watch'] on pods" in _errors(helmcheck.check_rbac(chart))


def test_clusterrole_missing_the_kueue_workload_status(chart):
    _edit(chart / "templates/clusterrole.yaml", 'resources: ["workloads/status"]', 'resources: []')
    assert "on workloads/status" in _errors(helmcheck.check_rbac(chart))


def test_a_resource_the_operator_starts_using_needs_a_rule(chart):
    resources = {**RESOURCES, "Job": Resource("batch", "v1", "jobs")}
    errors = _errors(helmcheck.check_rbac(chart, resources))
    assert "on jobs (apiGroup 'batch')" in errors


def test_wildcards_and_peering_are_refused(chart):
    _edit(chart / "templates/clusterrole.yaml", 'resources: ["namespaces"]',
          'resources: ["namespaces", "*", "clusterkopfpeerings"]')
    errors = _errors(helmcheck.check_rbac(chart))
    assert "grants a wildcard" in errors
    assert "grants kopf peering (clusterkopfpeerings)" in errors


def test_webhook_rights_only_with_the_webhook(chart):
    path = chart / "templates/clusterrole.yaml"
    _edit(path, "  {{- if .Values.webhook.enabled }}\n  # kopf", "  # kopf")
    _edit(path, "  {{- end }}\n---", "---")
    errors = _errors(helmcheck.check_rbac(chart))
    assert "validatingwebhookconfigurations is granted without `if .Values.webhook.enabled`" in errors


def test_indentation_error_in_a_static_part(chart):
    _edit(chart / "templates/deployment.yaml", "          livenessProbe:\n            httpGet:",
          "          livenessProbe:\n          httpGet:\n              path: /x")
    errors = _errors(helmcheck.check_template_syntax(chart))
    assert "templates/deployment.yaml:" in errors and "do not parse as YAML" in errors


def test_unclosed_and_unopened_blocks(chart):
    _edit(chart / "templates/webhook-service.yaml", "{{- end }}", "")
    _edit(chart / "templates/serviceaccount.yaml", "{{- if .Values.serviceAccount.create }}", "")
    errors = _errors(helmcheck.check_template_syntax(chart))
    assert "templates/webhook-service.yaml:1: `{{ if .Values.webhook.enabled }}` is never closed" in errors
    assert "templates/serviceaccount.yaml" in errors and "`end` without an open block" in errors


def test_include_of_an_undefined_template(chart):
    _edit(chart / "templates/serviceaccount.yaml", '"kubeforge.labels"', '"kubeforge.label"')
    assert 'include "kubeforge.label" names no' in _errors(helmcheck.check_template_syntax(chart))


def test_env_var_that_is_no_operator_setting(chart):
    _edit(chart / "templates/deployment.yaml", "name: KUBEFORGE_RESYNC_SECONDS", "name: KUBEFORGE_RESYNC")
    report = helmcheck.check_deployment(chart)
    assert "env KUBEFORGE_RESYNC is no field" in _errors(report)
    assert any("KUBEFORGE_RESYNC_SECONDS is not exposed" in w for w in report.warnings)


def test_deployment_must_be_a_single_standalone_replica(chart):
    _edit(chart / "templates/deployment.yaml", "replicas: 1", "replicas: 2")
    assert "replicas must be 1" in _errors(helmcheck.check_deployment(chart))


def test_chart_yaml_fields(chart):
    _edit(chart / "Chart.yaml", "version: 0.1.0", "version: 1")
    _edit(chart / "Chart.yaml", "apiVersion: v2", "apiVersion: v1")
    errors = _errors(helmcheck.check_chart_yaml(chart))
    assert "apiVersion must be v2" in errors
    assert "version 1 is not SemVer" in errors


def test_crd_drift(chart):
    crd_dir = chart.parent / "crds"
    first = min((chart / "crds").glob("*.yaml"))
    first.write_bytes(first.read_bytes() + b"\n")
    (crd_dir / "extra.kubeforge.dev.yaml").write_text("{}\n")
    errors = _errors(helmcheck.check_crds(chart, crd_dir))
    assert f"chart crds/{first.name} differs" in errors
    assert "crds/extra.kubeforge.dev.yaml is missing from the chart" in errors


def test_main_exits_non_zero_with_messages(chart, capsys):
    _values(chart, operator__livenessPort=80)
    assert helmcheck.main(["--chart", str(chart), "--crds", str(chart.parent / "crds")]) == 1
    err = capsys.readouterr().err
    assert "helmcheck: error: values.yaml: operator.livenessPort" in err


def test_default_workload_images_match_the_operator_defaults(chart):
    _values(chart, workloads__registry="registry.example/kf")
    errors = _errors(helmcheck.check_deployment(chart))
    assert "KUBEFORGE_TRAINER_IMAGE renders 'registry.example/kf/trainer:0.1.0' by default" in errors


def test_rules_the_operator_grants_must_be_held(chart, monkeypatch):
    from kubeforge.controller import serving

    assert helmcheck.required_permissions()[("", "pods")] >= {"get", "list", "watch", "patch"}
    monkeypatch.setattr(serving, "router_rbac", lambda obj: [
        {"kind": "Role", "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}])
    assert "lacks ['get'] on secrets" in _errors(helmcheck.check_rbac(chart))
