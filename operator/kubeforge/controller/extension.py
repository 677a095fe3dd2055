"""ContextExtensionJob in the controller: the same gang as PretrainJob (controller.training plans it, the
runtime module differs), plus status.stages[] and the `Stage 2/3 512` column from rank 0's reports."""

from __future__ import annotations

from typing import Any

from kubeforge.api.status import JobStatus, StageStatus

RUNTIME_MODULE = "kubeforge.runtime.extend"

_KEYS = {"index": "index", "seqLen": "seq_len", "ropeTheta": "rope_theta", "ropeScaling": "rope_scaling",
         "state": "state", "steps": "steps", "stepsDone": "steps_done", "loss": "loss",
         "tokensPerSecond": "tokens_per_second", "evals": "evals"}


def merge_stages(status: JobStatus, report: dict[str, Any]) -> None:
    """Fold the runtime's per-stage records (report["stages"], report["stage"] 1-based) into the status."""
    records = report.get("stages")
    if not isinstance(records, list) or not records:
        return
    stages = []
    for r in records:
        if not isinstance(r, dict) or "index" not in r or "seqLen" not in r:
            return  # not a report this controller understands: leave the status as it is
        stages.append(StageStatus(**{field: r[key] for key, field in _KEYS.items() if r.get(key) is not None}))
    status.stages = stages
    current = report.get("stage")
    if isinstance(current, int) and 1 <= current <= len(stages):
        status.current_stage = f"{current}/{len(stages)} {stages[current - 1].seq_len}"
    settle_stages(status)


def settle_stages(status: JobStatus) -> None:
    """A failed job's running stage failed with it; a succeeded job's stages all succeeded."""
    for stage in status.stages or []:
        if status.phase == "Failed" and stage.state == "Running":
            stage.state = "Failed"
        if status.phase == "Succeeded" and stage.state != "Succeeded":
            stage.state = "Succeeded"
