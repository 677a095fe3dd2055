"""vLLM: every rendered `vllm serve` command line against the pinned release's own parser, one vLLM
version across the image, the extra and the operator, and the versions inside the other images; what vLLM
would refuse or kubeforge's router cannot drive is refused at admission."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_workload_pods import URI, _stored, serving_pod_specs

from builders import inference_deployment, with_
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller import vllm

ROOT = Path(__file__).resolve().parents[2]
VLLM_PD = inference_deployment("llm")


# --- the pinned release's own parser ------------------------------------------------------------------
def vllm_cli() -> dict[str, Any]:
    return json.loads((ROOT / "tests" / "data" / f"vllm-serve-{vllm.VLLM_VERSION}.json").read_text())


def vllm_parser() -> argparse.ArgumentParser:
    """`vllm serve`'s parser rebuilt from the pinned release's dump (scripts/vllm_cli_spec.py): the same
    option strings, arities and choices, exact matching (no abbreviations), unknown options refused."""
    parser = argparse.ArgumentParser(prog="vllm serve", allow_abbrev=False, add_help=False, exit_on_error=False)
    parser.add_argument("model_tag", nargs="?")
    for o in vllm_cli()["serve_options"]:
        if o["dest"] == "model_tag":
            continue
        kw: dict[str, Any] = {"dest": o["dest"]}
        if not o["takes_value"]:
            kw["action"] = "store_true"
        else:
            if o["nargs"] not in (None, "None"):
                kw["nargs"] = o["nargs"]
            if o["choices"]:
                kw["choices"] = o["choices"]
        parser.add_argument(*o["options"], **kw)
    return parser


def test_the_dump_is_of_the_pinned_release():
    assert vllm_cli()["version"] == vllm.VLLM_VERSION


VLLM_CASES = {
    "disaggregated": VLLM_PD,
    "aggregated": {**inference_deployment("agg"), "spec": {"model": {"uri": URI}, "mode": "aggregated",
                                                           "pool": {"tensorParallel": 4}}},
    "every-option": with_(with_(with_(with_(VLLM_PD, "spec.maxModelLen", 8192), "spec.blockSize", 32),
                                "spec.model.tokenizer", {"builtin": "byte"}),
                          "spec.kvTransfer", {"failurePolicy": "fail", "bufferDevice": "cpu"}),
}


@pytest.mark.parametrize("case", sorted(VLLM_CASES))
def test_rendered_vllm_commands_parse_with_the_pinned_vllm(case):
    parser, cli = vllm_parser(), vllm_cli()
    for name, spec in serving_pod_specs(_stored(VLLM_CASES[case])).items():
        if name.endswith("-router"):
            continue
        argv = spec["containers"][0]["command"]
        assert argv[:2] == ["vllm", "serve"]
        args = parser.parse_args(argv[2:])  # raises on an option the release does not have
        assert args.model_tag == argv[2]
        if args.kv_transfer_config is not None:
            cfg = json.loads(args.kv_transfer_config)
            fields = cli["kv_transfer_config_fields"]
            assert set(cfg) <= set(fields), set(cfg) - set(fields)
            for key, value in cfg.items():
                assert fields[key] is None or value in fields[key], (key, value)
            assert cfg["kv_connector"] in cli["kv_connectors"]


def test_every_connector_the_api_accepts_is_registered_in_the_pinned_vllm():
    schema = parse_spec(VLLM_PD).kv_transfer.model_json_schema(by_alias=True)
    accepted = set(schema["properties"]["connector"]["enum"]) - {"Reference"}
    assert accepted <= set(vllm_cli()["kv_connectors"])


# --- versions inside the images ---------------------------------------------------------------------------
def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise KeyError(name)


def test_vllm_serve_image_pyproject_and_the_operator_pin_one_vllm():
    docker = (ROOT / "images" / "vllm-serve" / "Dockerfile").read_text()
    tag = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)$", docker, re.M)
    assert tag and tag.group(1) == vllm.VLLM_VERSION
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["serve"] == [f"vllm=={vllm.VLLM_VERSION}"]


def test_trainer_image_torch_and_transformers_are_the_tested_ones():
    docker = (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    tag = re.search(r"^ARG PYTORCH_IMAGE=pytorch/pytorch:([0-9.]+)-", docker, re.M)
    assert tag and tag.group(1) == _constraint("torch")
    # transformers (and the rest of [train]) come from constraints.txt, torch lines dropped
    assert "-c /dist/constraints-gpu.txt" in docker and "grep -v -E '^(torch|triton|nvidia-)'" in docker
    assert _constraint("transformers")


def test_one_vllm_dump_and_it_is_of_the_pinned_release():
    """A dump left behind from an older vLLM would be a parser nobody checks against."""
    dumps = sorted(p.name for p in (ROOT / "tests" / "data").glob("vllm-serve-*.json"))
    assert dumps == [f"vllm-serve-{vllm.VLLM_VERSION}.json"]


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_trainer_pins_are_what_the_tests_run_and_the_train_extra_admits(name):
    """The trainer image installs constraints.txt's torch (its base tag) and transformers: the same versions
    the CPU suite runs, inside the [train] extra's ranges (else pip refuses to build the image)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    pin = _constraint(name)
    assert Version(version(name)).base_version == Version(pin).base_version, (name, version(name), pin)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["train"] if Requirement(r).name == name]
    assert req.specifier.contains(pin), (name, str(req.specifier), pin)


def test_operator_and_router_images_install_with_the_constraints():
    for path in (ROOT / "Dockerfile", ROOT / "images" / "router" / "Dockerfile"):
        assert "pip install -c /constraints.txt" in path.read_text(), path


# --- admission: what vLLM would refuse or the router cannot drive ------------------------------------------
@pytest.mark.parametrize("size", [0, 2, 24, 512, 1024])
def test_block_sizes_vllm_refuses_are_refused(size):
    errors = validate(with_(VLLM_PD, "spec.blockSize", size))
    assert any("spec.blockSize" in str(e) for e in errors), errors


@pytest.mark.parametrize("connector", ["P2pNcclConnector", "LMCacheConnectorV1", "MooncakeConnector"])
def test_connectors_the_router_cannot_drive_are_refused(connector):
    errors = validate(with_(VLLM_PD, "spec.kvTransfer.connector", connector))
    assert any("spec.kvTransfer.connector" in str(e) for e in errors), errors
