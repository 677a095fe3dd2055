"""Checks of the Helm chart with real Helm (`python -m kubeforge.helmcheck`, run by `make verify`).

Helm itself comes from helm-python-sdk (the [dev] extra: Helm v4's Go SDK as a library, no helm binary):
`helm lint --strict` and `helm template` for the default values and every documented option (VALUE_MATRIX),
then checks of what Helm rendered:

- every rendered document parses, every Deployment env var KUBEFORGE_* is an OperatorSettings field;
- the operator's RBAC (ClusterRole, or Roles per watched namespace) grants what the operator's code uses
  (kubeforge.controller.kube.RESOURCES, kopf, the Roles the operator itself grants) and no wildcard;
- the chart's crds/ equals the generated crds/ (plus kopf's peering CRDs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubeforge import API_VERSION, GROUP

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubeforge"
CRD_DIR = REPO_ROOT / "crds"
KUBE_VERSION = "v1.30.0"  # the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)
RELEASE, NAMESPACE = "kubeforge", "kubeforge-system"

# documented options, each rendered and linted (values.yaml's comments describe them)
VALUE_MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"operator": {"namespaces": ["team-a", "team-b"]}},
    "standalone": {"replicaCount": 1, "peering": {"enabled": False}},
    "no-webhook": {"webhook": {"enabled": False}},
    "webhook-cert-manager": {"webhook": {"certificate": "certManager"}},
    "webhook-own-secret": {"webhook": {"certificate": "secret", "secretName": "kubeforge-tls", "caBundle": "Zm9v"}},
    "webhook-ignore": {"webhook": {"failurePolicy": "Ignore"}},
    "digest": {"image": {"tag": "sha256:" + "0" * 64}},
    "mirror": {"workloads": {"registry": "mirror.corp/ml", "imagePullSecrets": ["corp-registry"]},
               "imagePullSecrets": [{"name": "corp-registry"}]},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "no-user-roles": {"rbac": {"userRoles": False}},
    "no-own-pod-policy": {"workloads": {"ownPodPolicy": False}},
}

CHILD_VERBS = frozenset({"get", "create", "patch", "delete"})  # Kube.create/get/merge_patch/delete
OWN_KIND_VERBS = frozenset({"get", "list", "watch", "patch", "delete"})  # kopf watches/patches; TTL deletes
VERB_OVERRIDES: dict[str, frozenset[str]] = {
    "Pod": CHILD_VERBS | {"list", "watch"},  # listed by the reconcilers, watched by kopf
    "Deployment": CHILD_VERBS | {"list"},  # listed by the serving reconciler
    "Event": frozenset({"create"}),
    "Secret": frozenset({"create"}),  # the operator creates serving tokens and reads no Secret
    "ResourceFlavor": frozenset({"get"}),
}
KOPF_NEEDS = {("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"})}


def render(values: Mapping[str, Any] | None = None, chart: Path = CHART_DIR, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """`helm template` of the chart: every rendered document, in file order."""
    import helm_python as helm

    out = helm.Chart.load(str(chart)).render(dict(values or {}), name=name, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path in sorted(out):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(out[path]) if d]
    return docs


def lint(values: Mapping[str, Any] | None = None, chart: Path = CHART_DIR) -> list[str]:
    """`helm lint --strict`: its warnings and errors."""
    import helm_python as helm

    report = helm.lint(str(chart), dict(values or {}), strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSION)
    msgs = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return msgs + list(report.get("errors") or [])


def required_permissions(resources: Mapping[str, Any] | None = None) -> dict[tuple[str, str], frozenset[str]]:
    """(apiGroup, resource) -> verbs the operator needs, from the resources its code touches."""
    if resources is None:
        from kubeforge.controller.kube import RESOURCES as resources
    from kubeforge.controller import kueue

    need: dict[tuple[str, str], frozenset[str]] = {}

    def add(key: tuple[str, str], verbs: Iterable[str]) -> None:
        need[key] = need.get(key, frozenset()) | frozenset(verbs)

    for kind, res in resources.items():
        if res.group == GROUP:
            add((res.group, res.plural), OWN_KIND_VERBS)
            add((res.group, f"{res.plural}/status"), {"get", "patch"})
            add((res.group, f"{res.plural}/finalizers"), {"update"})  # blockOwnerDeletion on children
        else:
            add((res.group, res.plural), VERB_OVERRIDES.get(kind, CHILD_VERBS))
    add((kueue.GROUP, "workloads"), CHILD_VERBS)
    add((kueue.GROUP, "workloads/status"), {"patch"})
    for key in watched_by_kopf():  # every resource a kopf handler or index watches is listed and watched
        add(key, {"list", "watch"})
    add(("", "nodes"), {"get"})  # the reconciler reads the Node of a pod that looks cut off (node loss)
    for key, verbs in KOPF_NEEDS.items():
        add(key, verbs)
    for key, verbs in granted_by_operator().items():  # held by the operator itself: no bind/escalate
        add(key, verbs)
    return need


def watched_by_kopf() -> set[tuple[str, str]]:
    """(apiGroup, plural) of every resource the operator's kopf handlers and indices watch (from kopf's
    registry, so a new watch cannot ship without its RBAC)."""
    import kopf

    import kubeforge.controller.handlers  # noqa: F401 - registers the handlers

    registry = kopf.get_default_registry()
    handlers = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    return {(h.selector.group or "", h.selector.plural or h.selector.any_name or "")
            for h in handlers if h.selector is not None}


def granted_by_operator() -> dict[tuple[str, str], frozenset[str]]:
    """(apiGroup, resource) -> verbs of every Role the operator renders for its workloads."""
    from kubeforge.controller.children import progress_rbac
    from kubeforge.controller.serving import router_rbac

    def owner(kind: str) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": kind,
                "metadata": {"name": "check", "namespace": "check", "uid": "00000000-0000-0000-0000-000000000000"}}

    manifests = [*progress_rbac(owner("PretrainJob"), "check-progress", ["check-worker-0"]),
                 *router_rbac(owner("InferenceDeployment"))]
    return rules_by_resource(m for m in manifests if m["kind"] == "Role")


def rules_by_resource(roles: Iterable[dict[str, Any]]) -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], frozenset[str]] = {}
    for role in roles:
        for rule in role.get("rules") or []:
            if rule.get("resourceNames"):
                continue  # restricted rules cover no general need
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    out[(group, resource)] = out.get((group, resource), frozenset()) | set(rule["verbs"])
    return out


def operator_rbac(docs: list[dict[str, Any]], fullname: str = f"{RELEASE}") -> dict[str, dict]:
    """The operator's own ClusterRole and Roles (not the user roles), by namespace ("" for cluster)."""
    return {d["metadata"].get("namespace", ""): d for d in docs
            if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] == fullname}


def check_rbac(docs: list[dict[str, Any]], namespaces: list[str]) -> list[str]:
    errors = []
    roles = operator_rbac(docs)
    for role in roles.values():
        for i, rule in enumerate(role.get("rules") or []):
            if any("*" in (rule.get(k) or []) for k in ("apiGroups", "resources", "verbs")):
                errors.append(f"{role['kind']} {role['metadata']['name']}: rule {i} grants a wildcard")
    cluster = rules_by_resource([roles[""]]) if "" in roles else {}
    scopes = namespaces or [""]
    for ns in scopes:
        granted = dict(cluster)
        if ns:
            for key, verbs in rules_by_resource([roles[ns]] if ns in roles else []).items():
                granted[key] = granted.get(key, frozenset()) | verbs
        for (group, resource), verbs in sorted(required_permissions().items()):
            missing = verbs - granted.get((group, resource), frozenset())
            if missing:
                errors.append(f"RBAC{' in ' + ns if ns else ''} lacks {sorted(missing)} on {resource} "
                              f"(apiGroup {group or 'core'!r}); the operator uses them")
    return errors


def check_deployment(docs: list[dict[str, Any]]) -> list[str]:
    from kubeforge.settings import OperatorSettings

    deps = [d for d in docs if d["kind"] == "Deployment"]
    if len(deps) != 1:
        return [f"expected one Deployment, found {len(deps)}"]
    operator = next((c for c in deps[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"), None)
    if operator is None:
        return ["no container named operator"]
    fields = {f"KUBEFORGE_{name}".upper() for name in OperatorSettings.model_fields}
    return [f"env {e['name']} is no field of kubeforge.settings.OperatorSettings"
            for e in operator.get("env") or [] if e["name"].startswith("KUBEFORGE_") and e["name"] not in fields]


def check_crds(chart: Path = CHART_DIR, crd_dir: Path = CRD_DIR) -> list[str]:
    ours = {p.name: p for p in (chart / "crds").glob("*.yaml") if not p.name.endswith(".kopf.dev.yaml")}
    theirs = {p.name: p for p in crd_dir.glob("*.yaml")}
    errors = [f"chart crds/ lacks {n} (run `make generate`)" for n in sorted(theirs.keys() - ours.keys())]
    errors += [f"chart crds/{n} is not generated (stale?)" for n in sorted(ours.keys() - theirs.keys())]
    errors += [f"chart crds/{n} differs from crds/{n} (run `make generate`)"
               for n in sorted(ours.keys() & theirs.keys()) if ours[n].read_bytes() != theirs[n].read_bytes()]
    return errors


def check_all(chart: Path = CHART_DIR) -> list[str]:
    errors = [f"crds: {e}" for e in check_crds(chart)]
    for case, values in VALUE_MATRIX.items():
        errors += [f"{case}: helm lint: {m}" for m in lint(values, chart)]
        try:
            docs = render(values, chart)
        except Exception as e:  # noqa: BLE001 - Helm's render error is the finding
            errors.append(f"{case}: helm template: {e}")
            continue
        namespaces = (values.get("operator") or {}).get("namespaces") or []
        errors += [f"{case}: {m}" for m in check_rbac(docs, namespaces) + check_deployment(docs)]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.helmcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--chart", type=Path, default=CHART_DIR)
    args = parser.parse_args(argv)
    errors = check_all(args.chart)
    for e in errors:
        print(f"helmcheck: error: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"helmcheck: {args.chart.name} ok (helm lint + template, {len(VALUE_MATRIX)} value sets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
