"""Objects as the API server stores them: the CRD's structural defaults applied, unknown fields pruned.

Render tests start from these, not from what a test wrote, because the operator only ever sees stored
objects: a field the CRD defaults is always set by the time a handler runs. The rules are those of
apiextensions-apiserver's structural defaulting: a `default` fills an absent (or null, when the field is
not nullable) property of an object that is present; defaults apply recursively, also inside a default
just applied; properties the schema does not know are dropped unless preserve-unknown-fields says keep.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"


def crd_schema(kind: str) -> dict[str, Any]:
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def _default(node: Any, schema: dict[str, Any]) -> Any:
    if isinstance(node, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        out = {}
        for key, value in node.items():
            if key in props:
                out[key] = value
            elif schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
                out[key] = value
        for key, sub in props.items():
            if "default" in sub and out.get(key) is None and not (key in out and sub.get("nullable")):
                out[key] = copy.deepcopy(sub["default"])
        for key, value in list(out.items()):
            if key in props:
                out[key] = _default(value, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                out[key] = _default(value, schema["additionalProperties"])
        return out
    if isinstance(node, list) and isinstance(schema.get("items"), dict):
        return [_default(item, schema["items"]) for item in node]
    return node


def as_stored(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its CRD's defaults applied, as a create would store it (metadata kept as it is)."""
    schema = crd_schema(obj["kind"])
    out = copy.deepcopy(obj)
    for part in ("spec", "status"):
        if part in out:
            out[part] = _default(out[part], schema["properties"][part])
    return out
