"""ContextExtensionJob in the controller: one torchrun gang running the extend runtime, waiting for
model.from, status.stages[] and the Stage column from rank 0's report, and admission checks."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from builders import context_extension_job, with_
from kubeforge import contract
from kubeforge.api.validation import parse_spec, validate
from kubeforge.controller.extension import RUNTIME_MODULE
from kubeforge.controller.torchrun import TorchrunGang
from kubeforge.controller.training import JobContext, Observed, Source, plan

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def cej(status: dict | None = None) -> dict:
    obj = context_extension_job("cej", resources={"numNodes": 2, "processesPerNode": 1},
                                sequenceParallel={"impl": "zigzag", "degree": 2},
                                stages=[{"seqLen": 256, "steps": 3, "batchTokens": 512},
                                        {"seqLen": 512, "steps": 3, "batchTokens": 512},
                                        {"seqLen": 1024, "steps": 2, "batchTokens": 1024}])
    obj["metadata"].update(namespace="ns1", uid="uid-1", generation=1)
    if status is not None:
        obj["status"] = status
    return obj


def ctx(obj: dict) -> JobContext:
    spec = parse_spec(obj)
    builder = TorchrunGang(obj=obj, resources=spec.resources, scheduling=spec.scheduling, module=RUNTIME_MODULE,
                           resolved_spec=spec.to_wire(), secret_name=None, s3_endpoint=None)
    return JobContext(obj=obj, spec=spec, builder=builder)


def test_waits_for_the_source_pretrain_job_like_serving_does() -> None:
    p = plan(ctx(cej()), Observed(source=Source(waiting="waiting for PretrainJob ptj to succeed")), T0)
    assert p.status.phase == "Pending" and p.create == [] and "PretrainJob ptj" in p.status.message
    failed = plan(ctx(cej()), Observed(source=Source(failed="PretrainJob ptj failed")), T0)
    assert failed.status.phase == "Failed"


def test_one_gang_runs_the_extend_runtime() -> None:
    p = plan(ctx(cej()), Observed(source=Source(uri="s3://kubeforge/checkpoints/ptj/final")), T0)
    pods = [m for m in p.create if m["kind"] == "Pod"]
    assert len(pods) == 2 and p.status.resolved_model_uri == "s3://kubeforge/checkpoints/ptj/final"
    command = " ".join(pods[0]["spec"]["containers"][0]["command"] + pods[0]["spec"]["containers"][0].get("args", []))
    assert f"-m {RUNTIME_MODULE}" in command


def _running_pod(rank: int, report: dict) -> dict:
    return {"metadata": {"name": f"cej-worker-{rank}",
                         "labels": {contract.LABEL_REPLICA_INDEX: str(rank), contract.LABEL_ATTEMPT: "0"},
                         "annotations": {contract.PROGRESS_ANNOTATION: json.dumps(report)} if rank == 0 else {}},
            "status": {"phase": "Running"}}


REPORT = {
    "step": 4, "totalSteps": 8, "tokens": 3072, "loss": 2.5, "tokensPerSecond": 900.0, "time": "2026-11-23T12:00:00Z",
    "stage": 2, "stageCount": 3, "seqLen": 512,
    "stages": [
        {"index": 0, "seqLen": 256, "steps": 3, "stepsDone": 3, "state": "Succeeded", "ropeTheta": 19950.1,
         "loss": 2.6, "tokensPerSecond": 1000.0, "evals": {"perplexity": {"256": 13.1}, "needleScore": 0.5}},
        {"index": 1, "seqLen": 512, "steps": 3, "stepsDone": 1, "state": "Running", "ropeTheta": 36000.2,
         "loss": 2.5, "tokensPerSecond": 900.0},
        {"index": 2, "seqLen": 1024, "steps": 2, "stepsDone": 0, "state": "Pending", "ropeTheta": 63000.3},
    ],
}


def test_status_stages_and_current_stage_from_rank_zeros_report() -> None:
    status = {"phase": "Running", "attempt": 0, "gangCreatedAt": "2026-11-23T11:59:00Z"}
    p = plan(ctx(cej(status)), Observed(pods=[_running_pod(0, REPORT), _running_pod(1, {})],
                                        source=Source(uri="s3://x/final")), T0)
    wire = p.status.to_wire()
    assert wire["currentStage"] == "2/3 512"
    assert [s["state"] for s in wire["stages"]] == ["Succeeded", "Running", "Pending"]
    assert wire["stages"][0]["evals"]["needleScore"] == 0.5 and wire["stages"][1]["ropeTheta"] == 36000.2
    assert wire["progress"]["stage"] == 2


def test_a_failed_job_fails_its_running_stage() -> None:
    status = {"phase": "Running", "attempt": 0, "gangCreatedAt": "2026-11-23T11:59:00Z"}
    dead = _running_pod(0, REPORT)
    dead["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": contract.EXIT_INVALID_SPEC, "message": "x"}}}]}
    p = plan(ctx(cej(status)), Observed(pods=[dead, _running_pod(1, {})], source=Source(uri="s3://x/final")), T0)
    assert p.status.phase == "Failed"
    assert [s.state for s in p.status.stages] == ["Succeeded", "Failed", "Pending"]


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.stages[0].batchTokens", 8192 * 2,  # 2 sequences over 8 / 4 = 2 replicas is fine; 1 is not
     None),
    ("spec.stages[1].batchTokens", 65536,
     "spec.stages[1].batchTokens: 1 sequences per step do not split over 2 data-parallel replicas"),
    ("spec.stages[0].ropeTheta", 1000,
     "spec.stages[0].ropeTheta: 1000 cannot address seqLen 8192 (2π x ropeTheta must be at least seqLen)"),
    ("spec.scaling", {"method": "yarn"},
     "spec.stages[0].ropeTheta: only scaling method theta takes a ropeTheta (method is yarn)"),
    ("spec.eval", {"perplexityLengths": [8190]},
     "spec.eval.perplexityLengths[0]: evals split sequences like training: must be a multiple of 4"),
])
def test_admission_refuses_what_would_fail_at_step_zero(path: str, value: object, expected: str | None) -> None:
    errors = [str(e) for e in validate(with_(context_extension_job(), path, value))]
    if expected is None:
        assert errors == []
    else:
        assert any(e.startswith(expected) for e in errors), errors
