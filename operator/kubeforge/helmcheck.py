"""Static checks of the Helm chart (`python -m kubeforge.helmcheck`, run by `make verify`).

Why hand-written: CI and developer machines have no `helm` binary (it is not on the package registries the
project installs from), so `helm lint` / `helm template` cannot run. These checks catch what those would,
plus what they would not (RBAC drift against the operator's code):

- Chart.yaml: apiVersion v2, name, SemVer version, appVersion equal to the package version (image tags
  default to it).
- values.yaml validates against values.schema.json (draft-07, the `jsonschema` package); every value is
  described by the schema, every property has a description, every number has bounds.
- Every `.Values.a.b` a template references exists in values.yaml, and every value is used by a template.
- Every `include "name"` refers to a `define`d template; `if/with/range/define ... end` blocks balance.
- Templates are NOT rendered (no Go-template engine here): each one is reduced to its static skeleton
  (action-only lines blanked, inline `{{ ... }}` replaced by a placeholder scalar, both branches of every
  conditional kept) and parsed as YAML. That catches indentation and syntax errors in the static parts and
  gives the ClusterRole's rules, which are written statically on purpose.
- The ClusterRole grants every resource of `kubeforge.controller.kube.RESOURCES` (plus Kueue Workloads and
  what kopf itself needs) with the verbs the operator uses, holds what the per-job Roles grant (so neither
  `bind` nor `escalate` is needed), grants no wildcard and no kopf peering, and grants webhook configuration
  access only when `webhook.enabled`.
- Every KUBEFORGE_* env var of the Deployment is a field of `kubeforge.settings.OperatorSettings` (a setting
  the chart does not expose is reported as a warning); the default workload images it renders equal the
  operator's defaults and each names a Dockerfile under images/.
- The chart's crds/ equals the repository's crds/ byte for byte (both written by kubeforge.api.crdgen).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubeforge import API_VERSION, GROUP, __version__

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubeforge"
CRD_DIR = REPO_ROOT / "crds"

PLACEHOLDER = "TEMPLATED"
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.DOTALL)
_VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
_OPENERS = ("if", "with", "range", "define", "block")

# --- what the operator must be allowed to do -------------------------------------------------------------
# Resources come from kubeforge.controller.kube.RESOURCES; only the verbs are stated here.
CHILD_VERBS = frozenset({"get", "create", "patch", "delete"})  # what Kube.create/get/merge_patch/delete use
OWN_KIND_VERBS = frozenset({"get", "list", "watch", "patch", "delete"})  # kopf watches/patches; TTL deletes
OWN_STATUS_VERBS = frozenset({"get", "patch"})
VERB_OVERRIDES: dict[str, frozenset[str]] = {
    "Pod": CHILD_VERBS | {"list", "watch"},  # listed by the reconcilers, watched by kopf
    "Deployment": CHILD_VERBS | {"list"},  # serving pools, listed by the serving reconciler
    "Event": frozenset({"create"}),
    "ResourceFlavor": frozenset({"get"}),
}
KOPF_NEEDS: dict[tuple[str, str], frozenset[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"}),
}
WEBHOOK_RESOURCE = ("admissionregistration.k8s.io", "validatingwebhookconfigurations")
PEERING_RESOURCES = {"kopfpeerings", "clusterkopfpeerings"}


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.errors += other.errors
        self.warnings += other.warnings

    @property
    def ok(self) -> bool:
        return not self.errors


# --- templates ---------------------------------------------------------------------------------------------
@dataclass
class Template:
    path: Path
    text: str
    skeleton: str = ""
    conditions: list[tuple[str, ...]] = field(default_factory=list)  # open if/with/range per line
    docs: list[Any] = field(default_factory=list)


def _keyword(action: str) -> str:
    return action.split(None, 1)[0] if action.split() else ""


def skeleton(path: Path, text: str, report: Report) -> Template:
    """Blank action-only lines, replace inline actions by a placeholder, track open blocks per line."""
    tpl = Template(path, text)
    text = _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    stack: list[tuple[str, int]] = []
    lines_out: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        tpl.conditions.append(tuple(c for c, _ in stack))
        for m in _ACTION.finditer(line):
            action = m.group(1)
            word = _keyword(action)
            if word in _OPENERS:
                stack.append((action, lineno))
            elif word == "else":
                if not stack or _keyword(stack[-1][0]) not in ("if", "with", "range"):
                    report.errors.append(f"{path}:{lineno}: `else` outside if/with/range")
                else:
                    stack[-1] = (f"{stack[-1][0]} / {action}", stack[-1][1])
            elif word == "end":
                if not stack:
                    report.errors.append(f"{path}:{lineno}: `end` without an open block")
                else:
                    stack.pop()
        if _ACTION.sub("", line).strip() == "" and _ACTION.search(line):
            lines_out.append("")  # an action-only line: its output (include/toYaml | nindent) is not known
        else:
            lines_out.append(_ACTION.sub(PLACEHOLDER, line))
    for action, lineno in stack:
        report.errors.append(f"{path}:{lineno}: `{{{{ {action} }}}}` is never closed by `end`")
    tpl.skeleton = "\n".join(lines_out)
    return tpl


def load_templates(chart: Path, report: Report) -> list[Template]:
    """Every YAML template of the chart, reduced to its skeleton and parsed."""
    out = []
    for path in sorted((chart / "templates").rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml") or path.name.startswith("_"):
            continue
        tpl = skeleton(path.relative_to(chart), path.read_text(), report)
        try:
            docs = [d for d in yaml.safe_load_all(tpl.skeleton) if d is not None]
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            report.errors.append(f"{tpl.path}{where}: static parts do not parse as YAML: "
                                 f"{getattr(e, 'problem', None) or e}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
                report.errors.append(f"{tpl.path}: a document without apiVersion, kind and metadata")
        tpl.docs = docs
        out.append(tpl)
    return out


def check_template_syntax(chart: Path) -> Report:
    """Blocks balance, includes name a define, YAML templates' static parts parse."""
    report = Report()
    defines: set[str] = set()
    includes: list[tuple[Path, str]] = []
    for path in sorted((chart / "templates").rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        rel = path.relative_to(chart)
        if path.suffix not in (".yaml", ".yml") or path.name.startswith("_"):
            skeleton(rel, text, report)  # helpers and NOTES.txt: block balance only
        defines |= set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', text))
        includes += [(rel, n) for n in re.findall(r'(?:include|template)\s+"([^"]+)"', text)]
    load_templates(chart, report)
    for rel, name in includes:
        if name not in defines:
            report.errors.append(f"{rel}: include \"{name}\" names no `define`d template")
    return report


# --- Chart.yaml, values ----------------------------------------------------------------------------------
def check_chart_yaml(chart: Path) -> Report:
    report = Report()
    path = chart / "Chart.yaml"
    if not path.is_file():
        report.errors.append(f"{path}: missing")
        return report
    meta = yaml.safe_load(path.read_text()) or {}
    if meta.get("apiVersion") != "v2":
        report.errors.append(f"Chart.yaml: apiVersion must be v2, not {meta.get('apiVersion')!r}")
    if meta.get("name") != chart.name:
        report.errors.append(f"Chart.yaml: name {meta.get('name')!r} must equal the chart folder {chart.name!r}")
    for key in ("version", "appVersion"):
        if not _SEMVER.match(str(meta.get(key, ""))):
            report.errors.append(f"Chart.yaml: {key} {meta.get(key)!r} is not SemVer")
    if str(meta.get("appVersion")) != __version__:
        report.errors.append(f"Chart.yaml: appVersion {meta.get('appVersion')!r} must equal the package "
                             f"version {__version__!r} (image tags default to it)")
    if meta.get("type", "application") != "application":
        report.errors.append("Chart.yaml: type must be application")
    if not meta.get("description"):
        report.errors.append("Chart.yaml: description is empty")
    return report


def _load_values(chart: Path) -> dict[str, Any]:
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    if not isinstance(values, dict):
        raise TypeError("values.yaml is not a mapping")
    return values


def _resolve(node: Any, root: Mapping[str, Any]) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _schema_nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            if key in ("properties", "definitions", "$defs") and isinstance(child, dict):
                for name, sub in child.items():
                    yield from _schema_nodes(sub, f"{path}.{key}.{name}" if path else f"{key}.{name}")
            elif key in ("items", "additionalProperties") and isinstance(child, dict):
                yield from _schema_nodes(child, f"{path}.{key}")


def _undescribed(value: Any, schema: Any, root: Mapping[str, Any], path: str) -> Iterator[str]:
    """Keys of values.yaml the schema does not describe (even where it allows extra keys)."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            child = f"{path}.{key}" if path else str(key)
            if key in props:
                yield from _undescribed(sub, props[key], root, child)
            elif isinstance(extra, dict):
                yield from _undescribed(sub, extra, root, child)
            else:
                yield child
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _undescribed(sub, schema["items"], root, f"{path}[{i}]")


def check_values_schema(chart: Path) -> Report:
    report = Report()
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the dev install has it
        report.errors.append("the jsonschema package is needed (pip install -e '.[dev]')")
        return report
    try:
        schema = json.loads((chart / "values.schema.json").read_text())
        values = _load_values(chart)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        report.errors.append(f"cannot read values.yaml / values.schema.json: {e}")
        return report
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        report.errors.append(f"values.schema.json is not a valid JSON Schema: {e.message}")
        return report
    for err in sorted(validator_cls(schema).iter_errors(values), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        report.errors.append(f"values.yaml: {where}: {err.message}")
    for path in _undescribed(values, schema, schema, ""):
        report.errors.append(f"values.schema.json: values.yaml's {path} is not described")
    for path, node in _schema_nodes(schema):
        if ".properties." in f".{path}" and "description" not in node:
            report.errors.append(f"values.schema.json: {path} has no description")
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if types & {"integer", "number"} and not {"minimum", "maximum"} <= node.keys():
            report.errors.append(f"values.schema.json: {path} is numeric without minimum and maximum")
    return report


def value_references(chart: Path) -> dict[str, set[str]]:
    """`.Values.a.b` path ("a.b") -> the template files that reference it."""
    refs: dict[str, set[str]] = {}
    for path in sorted((chart / "templates").rglob("*")):
        if path.is_file():
            for m in _VALUES_REF.finditer(path.read_text()):
                refs.setdefault(m.group(1).lstrip("."), set()).add(str(path.relative_to(chart)))
    return refs


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, sub in node.items():
            yield from _leaves(sub, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def _exists(values: Mapping[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_value_references(chart: Path) -> Report:
    report = Report()
    values = _load_values(chart)
    refs = value_references(chart)
    for ref, files in sorted(refs.items()):
        if not _exists(values, ref):
            report.errors.append(f"{', '.join(sorted(files))}: .Values.{ref} is not in values.yaml")
    for leaf in _leaves(values):
        if not any(leaf == r or leaf.startswith(r + ".") for r in refs):
            report.errors.append(f"values.yaml: {leaf} is used by no template")
    return report


# --- CRDs ----------------------------------------------------------------------------------------------------
def check_crds(chart: Path, crd_dir: Path = CRD_DIR) -> Report:
    report = Report()
    ours = {p.name: p for p in (chart / "crds").glob("*") if p.is_file()}
    theirs = {p.name: p for p in crd_dir.glob("*") if p.is_file()}
    for name in sorted(theirs.keys() - ours.keys()):
        report.errors.append(f"crds/{name} is missing from the chart's crds/ (run `make generate`)")
    for name in sorted(ours.keys() - theirs.keys()):
        report.errors.append(f"chart crds/{name} is not in crds/ (stale; run `make generate`)")
    for name in sorted(ours.keys() & theirs.keys()):
        if ours[name].read_bytes() != theirs[name].read_bytes():
            report.errors.append(f"chart crds/{name} differs from crds/{name} (run `make generate`)")
    if not theirs:
        report.errors.append(f"{crd_dir}: no CRDs")
    return report


# --- RBAC ----------------------------------------------------------------------------------------------------
def required_permissions(resources: Mapping[str, Any] | None = None,
                         report: Report | None = None) -> dict[tuple[str, str], frozenset[str]]:
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
            add((res.group, f"{res.plural}/status"), OWN_STATUS_VERBS)
        else:
            add((res.group, res.plural), VERB_OVERRIDES.get(kind, CHILD_VERBS))
    add((kueue.GROUP, "workloads"), CHILD_VERBS)
    add((kueue.GROUP, "workloads/status"), {"patch"})
    for key, verbs in KOPF_NEEDS.items():
        add(key, verbs)
    # what the operator grants per job must be held by the operator itself (no bind/escalate)
    for key, verbs in _granted_by_operator(report).items():
        add(key, verbs)
    return need


# functions that render the Roles the operator creates, and the arguments after the owner object
ROLE_RENDERERS = (
    ("kubeforge.controller.children", "progress_rbac", "PretrainJob", ("check-progress", ["check-worker-0"])),
    ("kubeforge.controller.serving", "router_rbac", "InferenceDeployment", ()),
)


def _granted_by_operator(report: Report | None = None) -> dict[tuple[str, str], frozenset[str]]:
    """(apiGroup, resource) -> verbs of every Role the operator renders (it must hold them itself)."""
    import importlib

    manifests: list[dict[str, Any]] = []
    for module, name, kind, args in ROLE_RENDERERS:
        obj = {"apiVersion": API_VERSION, "kind": kind,
               "metadata": {"name": "check", "namespace": "check", "uid": "00000000-0000-0000-0000-000000000000"}}
        try:
            manifests += getattr(importlib.import_module(module), name)(obj, *args)
        except (ImportError, AttributeError, TypeError) as e:
            if report is not None:
                report.warnings.append(f"cannot render the Roles of {module}.{name} to check them: {e}")
    out: dict[tuple[str, str], frozenset[str]] = {}
    for manifest in manifests:
        for rule in manifest.get("rules") or []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    out[(group, resource)] = out.get((group, resource), frozenset()) | set(rule["verbs"])
    return out


def _cluster_role(templates: list[Template]) -> tuple[Template | None, dict[str, Any] | None]:
    for tpl in templates:
        for doc in tpl.docs:
            if isinstance(doc, dict) and doc.get("kind") == "ClusterRole":
                return tpl, doc
    return None, None


def check_rbac(chart: Path, resources: Mapping[str, Any] | None = None) -> Report:
    report = Report()
    templates = load_templates(chart, report)
    tpl, role = _cluster_role(templates)
    if role is None:
        report.errors.append("templates: no ClusterRole")
        return report
    rules = role.get("rules") or []
    granted: dict[tuple[str, str], set[str]] = {}
    for i, rule in enumerate(rules):
        groups, res, verbs = rule.get("apiGroups") or [], rule.get("resources") or [], rule.get("verbs") or []
        if "*" in groups or "*" in res or "*" in verbs:
            report.errors.append(f"{tpl.path}: rule {i} grants a wildcard")
        for r in res:
            if r in PEERING_RESOURCES:
                report.errors.append(f"{tpl.path}: rule {i} grants kopf peering ({r}); the operator is standalone")
        if rule.get("resourceNames"):
            continue  # restricted rules cover no general need
        for g in groups:
            for r in res:
                granted.setdefault((g, r), set()).update(verbs)
    if resources is None:
        from kubeforge.controller.kube import RESOURCES as resources
    for kind in sorted(VERB_OVERRIDES.keys() - resources.keys()):
        report.warnings.append(f"helmcheck: VERB_OVERRIDES names {kind}, which kube.RESOURCES no longer has")
    for (group, resource), verbs in sorted(required_permissions(resources, report).items()):
        missing = verbs - granted.get((group, resource), set())
        if missing:
            report.errors.append(
                f"{tpl.path}: ClusterRole lacks {sorted(missing)} on {resource} "
                f"(apiGroup {group or 'core'!r}); the operator uses them")
    # webhook configuration rights only with the webhook on
    hits = [n for n, line in enumerate(tpl.skeleton.split("\n")) if WEBHOOK_RESOURCE[1] in line]
    if not hits:
        report.errors.append(f"{tpl.path}: no rule on {WEBHOOK_RESOURCE[1]} (kopf manages the webhook)")
    for n in hits:
        if not any(".Values.webhook.enabled" in c for c in tpl.conditions[n]):
            report.errors.append(f"{tpl.path}:{n + 1}: {WEBHOOK_RESOURCE[1]} is granted without "
                                 f"`if .Values.webhook.enabled`")
    return report


# --- Deployment ------------------------------------------------------------------------------------------------
def check_deployment(chart: Path) -> Report:
    from kubeforge.settings import OperatorSettings

    report = Report()
    templates = load_templates(chart, report)
    deployments = [(t, d) for t in templates for d in t.docs if isinstance(d, dict) and d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        report.errors.append(f"templates: expected one Deployment, found {len(deployments)}")
        return report
    tpl, dep = deployments[0]
    spec = dep.get("spec") or {}
    if spec.get("replicas") != 1:
        report.errors.append(f"{tpl.path}: replicas must be 1 (kopf runs standalone, without peering)")
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    operator = next((c for c in containers if c.get("name") == "operator"), None)
    if operator is None:
        report.errors.append(f"{tpl.path}: no container named operator")
        return report
    if (operator.get("command") or [])[:2] != ["kubeforge", "operator"]:
        report.errors.append(f"{tpl.path}: the operator container must run `kubeforge operator`")
    probe = (operator.get("livenessProbe") or {}).get("httpGet") or {}
    if probe.get("path") != "/healthz":
        report.errors.append(f"{tpl.path}: livenessProbe must GET /healthz (kopf's liveness endpoint)")
    fields = {f"{OperatorSettings.model_config.get('env_prefix', '')}{name}".upper()
              for name in OperatorSettings.model_fields}
    names = {e.get("name") for e in operator.get("env") or [] if isinstance(e, dict)}
    for name in sorted(n for n in names if isinstance(n, str) and n.startswith("KUBEFORGE_")):
        if name not in fields:
            report.errors.append(f"{tpl.path}: env {name} is no field of kubeforge.settings.OperatorSettings")
    for name in sorted(fields - names):
        report.warnings.append(f"{tpl.path}: setting {name} is not exposed by the chart")
    report.extend(_check_workload_images(chart, tpl, values := _load_values(chart), OperatorSettings))
    if "KUBEFORGE_LIVENESS_PORT" not in names:
        report.errors.append(f"{tpl.path}: KUBEFORGE_LIVENESS_PORT must be set for the liveness probe")
    sc = values.get("securityContext") or {}
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
        report.errors.append("values.yaml: securityContext must default to a read-only root, no escalation")
    if (values.get("podSecurityContext") or {}).get("runAsNonRoot") is not True:
        report.errors.append("values.yaml: podSecurityContext.runAsNonRoot must default to true")
    return report


_WORKLOAD_IMAGE = re.compile(
    r"name:\s*(KUBEFORGE_\w+)\s*\n\s*value:\s*\{\{\s*include\s+\"kubeforge.workloadImage\"\s*"
    r"\(list\s+\.\s+\"([^\"]+)\"\s+\.Values\.workloads\.(\w+)\)")


def _check_workload_images(chart: Path, tpl: Template, values: dict[str, Any], settings: type) -> Report:
    """Default workload images the chart renders equal the operator's own defaults and name an images/ dir."""
    report = Report()
    meta = yaml.safe_load((chart / "Chart.yaml").read_text()) or {}
    workloads = values.get("workloads") or {}
    prefix = str(settings.model_config.get("env_prefix", ""))
    found = _WORKLOAD_IMAGE.findall((chart / tpl.path).read_text())
    if not found:
        report.errors.append(f"{tpl.path}: no KUBEFORGE_*_IMAGE env set through kubeforge.workloadImage")
    for env, name, key in found:
        field_name = env.removeprefix(prefix).lower()
        if field_name not in settings.model_fields:
            continue  # reported as "no field" above
        rendered = workloads.get(key) or f"{workloads.get('registry')}/{name}:{meta.get('appVersion')}"
        default = settings.model_fields[field_name].default
        if rendered != default:
            report.errors.append(f"{tpl.path}: {env} renders {rendered!r} by default, the operator's default is "
                                 f"{default!r}")
        dockerfile = chart.parents[1] / "images" / name / "Dockerfile"
        if chart == CHART_DIR and not dockerfile.is_file():
            report.errors.append(f"{tpl.path}: {env} names image {name!r}, but images/{name}/Dockerfile is missing")
    return report


# --- all -------------------------------------------------------------------------------------------------------
CHECKS = (
    ("Chart.yaml", lambda chart, crds: check_chart_yaml(chart)),
    ("values schema", lambda chart, crds: check_values_schema(chart)),
    ("value references", lambda chart, crds: check_value_references(chart)),
    ("template syntax", lambda chart, crds: check_template_syntax(chart)),
    ("RBAC", lambda chart, crds: check_rbac(chart)),
    ("Deployment", lambda chart, crds: check_deployment(chart)),
    ("CRDs", lambda chart, crds: check_crds(chart, crds)),
)


def check_all(chart: Path = CHART_DIR, crd_dir: Path = CRD_DIR) -> Report:
    report = Report()
    for name, check in CHECKS:
        try:
            report.extend(check(chart, crd_dir))
        except Exception as e:  # noqa: BLE001 - a check that cannot run fails with its reason
            report.errors.append(f"{name}: check could not run: {type(e).__name__}: {e}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.helmcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--chart", type=Path, default=CHART_DIR)
    parser.add_argument("--crds", type=Path, default=CRD_DIR)
    args = parser.parse_args(argv)
    report = check_all(args.chart, args.crds)
    for w in report.warnings:
        print(f"helmcheck: warning: {w}", file=sys.stderr)
    for e in report.errors:
        print(f"helmcheck: error: {e}", file=sys.stderr)
    if report.errors:
        print(f"helmcheck: {len(report.errors)} error(s) in {args.chart}", file=sys.stderr)
        return 1
    print(f"helmcheck: {args.chart.name} ok ({len(CHECKS)} checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
