"""The generated CRDs: structural, documented, and identical to what is committed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeforge.api import crdgen
from kubeforge.api.registry import KINDS

REPO = Path(__file__).parents[2]


def _walk(node, path="spec"):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module", params=KINDS, ids=[k.kind for k in KINDS])
def crd(request):
    return request.param, crdgen.crd_for(request.param)


def test_committed_crds_match_the_models():
    assert crdgen.main(["--check"]) == 0, "run `make generate`"
    for kind in KINDS:
        text = (REPO / "crds" / crdgen.file_name(kind)).read_text()
        assert text == (REPO / "charts/kubeforge/crds" / crdgen.file_name(kind)).read_text()


def test_names_short_names_and_category(crd):
    kind, doc = crd
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == f"{kind.plural}.kubeforge.dev"
    assert names["shortNames"] == [{"PretrainJob": "ptj", "ContextExtensionJob": "cej", "RLJob": "rlj",
                                    "InferenceDeployment": "infd"}[kind.kind]]
    assert names["categories"] == ["kubeforge"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_schema_is_structural_and_every_field_documented(crd):
    _, doc = crd
    root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(root)
    assert "$ref" not in text and "$defs" not in text and "null" not in text
    for section in ("spec", "status"):
        for path, node in _walk(root["properties"][section], section):
            assert "type" in node or node.get("x-kubernetes-int-or-string"), path
            if path != section and not path.endswith(("[]", "{}")):
                assert node.get("description"), f"{path} has no description"
            if "anyOf" in node:
                assert node.get("x-kubernetes-int-or-string") and node["anyOf"] == [
                    {"type": "integer"}, {"type": "string"}], path
            assert node.get("additionalProperties") is not False, path


def test_preserve_unknown_fields_only_on_free_form_config(crd):
    _, doc = crd
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    free_form = [p for p, n in _walk(spec) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert free_form == ["spec.model.config"]


def test_bounds_enums_and_defaults_reach_the_schema():
    spec = crdgen.crd_for(KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    nodes = spec["properties"]["resources"]["properties"]["numNodes"]
    assert nodes == {"description": "Number of worker pods (one per node).", "type": "integer",
                     "default": 1, "maximum": 4096, "minimum": 1}
    lr = spec["properties"]["optimizer"]["properties"]["lr"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert spec["properties"]["parallelism"]["properties"]["strategy"]["enum"] == ["ddp", "fsdp"]
    assert spec["required"] == ["model", "data", "training", "checkpoint"]


def test_printer_columns():
    by_kind = {k.kind: crdgen.crd_for(k)["spec"]["versions"][0]["additionalPrinterColumns"] for k in KINDS}
    visible = {kind: [c["name"] for c in cols if not c.get("priority")] for kind, cols in by_kind.items()}
    assert visible["PretrainJob"] == ["Phase", "Progress", "Step", "Loss", "Restarts", "Age"]
    assert visible["InferenceDeployment"] == ["Phase", "Mode", "Ready", "Endpoint", "Age"]


def test_cel_rules_sit_where_they_apply():
    by_kind = {k.kind: crdgen.crd_for(k)["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for k in KINDS}
    cej = by_kind["ContextExtensionJob"]["properties"]["spec"]
    assert any("isSorted" in r["rule"] for r in cej["properties"]["stages"]["x-kubernetes-validations"])
    assert any("zigzag" in r["rule"] for r in cej["x-kubernetes-validations"])
    infd = by_kind["InferenceDeployment"]["properties"]["spec"]
    assert any("NixlConnector" in r["rule"] for r in infd["x-kubernetes-validations"])
    auto = infd["properties"]["decode"]["properties"]["autoscaling"]
    assert auto["x-kubernetes-validations"] == [
        {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must be <= maxReplicas"}]
    model = by_kind["PretrainJob"]["properties"]["spec"]["properties"]["model"]
    immutable = [r for r in model["x-kubernetes-validations"] if r["message"] == "is immutable"]
    assert len(immutable) == 1 and "oldSelf.uri" in immutable[0]["rule"]
    # Whole-object equality would compare model.config's JSON numbers by type (10000.0 != 10000).
    assert "self == oldSelf" not in immutable[0]["rule"]
