"""Generate the CustomResourceDefinitions from the pydantic models (the single source of truth).

`python -m kubeforge.api.crdgen [--check]` writes `crds/<plural>.kubeforge.dev.yaml` and the Helm chart's
copy; with --check it writes nothing and exits 1 when a file on disk differs (CI's drift check).

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 subset. The conversion is
hand-written because no maintained library targets structural schemas: refs are inlined, `X | None` becomes
X, numeric exclusive bounds become the boolean form, `additionalProperties: false` is dropped (pruning does
that job), and free-form dicts get x-kubernetes-preserve-unknown-fields.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from kubeforge import GROUP, VERSION

from .registry import KINDS, CelRule, Kind

REPO_ROOT = Path(__file__).resolve().parents[3]
OUTPUT_DIRS = (REPO_ROOT / "crds", REPO_ROOT / "charts" / "kubeforge" / "crds")

_DROP_KEYS = {"title", "$defs", "examples"}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [_inline(s, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, defs)
    return {k: _inline(v, defs) for k, v in schema.items()}


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one inlined JSON-Schema node (and its children) into a structural OpenAPI v3.0 node."""
    s = {k: v for k, v in schema.items() if k not in _DROP_KEYS}

    if "anyOf" in s:
        branches = [b for b in s["anyOf"] if b.get("type") != "null"]
        if s.get("x-kubernetes-int-or-string"):
            s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        elif len(branches) == 1:
            del s["anyOf"]
            inner = _structural(branches[0])
            # the outer node's description/default win over the branch's
            s = {**inner, **s}
        else:
            raise ValueError(f"unsupported union in schema: {s['anyOf']}")
    if s.get("default", 0) is None:
        del s["default"]
    if "const" in s:
        s["enum"] = [s.pop("const")]
    if "enum" in s and "type" not in s:
        s["type"] = "string"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(s.get(bound), (int, float)) and not isinstance(s.get(bound), bool):
            s[plain] = s.pop(bound)
            s[bound] = True
    if s.get("x-kubernetes-preserve-unknown-fields"):
        s["type"] = "object"
        s.pop("additionalProperties", None)
        return s
    if s.get("additionalProperties") is False:
        del s["additionalProperties"]
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if "properties" in s:
        s["type"] = "object"
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
    if "items" in s:
        s["items"] = _structural(s["items"])
    # Object and list defaults are left to the models; the API server only fills scalars.
    if isinstance(s.get("default"), (dict, list)):
        del s["default"]
    return _ordered(s)


_FIRST = ("description", "type")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """description and type first, the rest sorted, properties in declaration order: stable, readable YAML."""
    rest = sorted(k for k in node if k not in _FIRST)
    return {k: node[k] for k in (*_FIRST, *rest) if k in node}


def openapi_schema(model: Any) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    inlined = _inline({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    return _structural(inlined)


def _node_at(spec_schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = spec_schema
    for part in filter(None, path.split(".")):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


def _attach_rules(root: dict[str, Any], rules: tuple[CelRule, ...]) -> None:
    for rule in rules:
        node = root if rule.path == "/" else _node_at(root["properties"]["spec"], rule.path)
        entry = {"rule": rule.rule, "message": rule.message}
        if rule.message_expression:
            entry["messageExpression"] = rule.message_expression
        if rule.field_path:
            entry["fieldPath"] = rule.field_path
        node.setdefault("x-kubernetes-validations", []).append(entry)


def crd_for(kind: Kind) -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(kind.spec_model),
            "status": openapi_schema(kind.status_model),
        },
    }
    _attach_rules(root, kind.cel_rules)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kubeforge"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": ["kubeforge"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_crd() for c in kind.columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    header = "# Generated by `python -m kubeforge.api.crdgen` from kubeforge.api. Do not edit.\n"
    return header + yaml.safe_dump(crd_for(kind), sort_keys=False, width=120)


def file_name(kind: Kind) -> str:
    return f"{kind.plural}.{GROUP}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeforge-crdgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the files on disk differ")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for out_dir in OUTPUT_DIRS:
        expected = {file_name(k): render(k) for k in KINDS}
        if args.check:
            for name, text in expected.items():
                path = out_dir / name
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(REPO_ROOT)))
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob(f"*.{GROUP}.yaml"):
            if old.name not in expected:
                old.unlink()
        for name, text in expected.items():
            (out_dir / name).write_text(text)
    if stale:
        print("generated CRDs are out of date; run `make generate`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
