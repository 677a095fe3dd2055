"""What an RLJob adds to the training-job reconcile: the LLM judge it waits for and calls.

The learner gang itself is PretrainJob's (controller/training.py + torchrun.py, runtime module
kubeforge.runtime.rl.learner). When `reward.judge.inferenceDeployment` is set, the job stays Pending until that
InferenceDeployment's Ready condition is True, and the runtime receives the deployment's in-cluster endpoint
as `reward.judge.url` in its resolved spec.
"""

from __future__ import annotations

from typing import Any

from .kube import RESOURCES

RUNTIME_MODULE = "kubeforge.runtime.rl.learner"


def judge_endpoint(kube: Any, obj: dict[str, Any], spec: Any) -> tuple[str | None, str | None]:
    """(endpoint, None) when the judge is ready to call or none is needed; (None, why) while waiting."""
    judge = getattr(spec.reward, "judge", None)
    if judge is None or not judge.inference_deployment:
        return None, None
    name = judge.inference_deployment
    infd = kube.get(RESOURCES["InferenceDeployment"], obj["metadata"]["namespace"], name)
    if infd is None:
        return None, f"waiting for InferenceDeployment {name} to exist (reward.judge)"
    status = infd.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ready or not status.get("endpoint"):
        return None, f"waiting for InferenceDeployment {name} to be Ready (reward.judge; now " \
                     f"{status.get('phase') or 'Pending'})"
    return str(status["endpoint"]), None


def with_judge_url(wire: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    """The resolved spec the runtime reads: the judge by URL."""
    if not endpoint:
        return wire
    reward = dict(wire.get("reward") or {})
    judge = {k: v for k, v in (reward.get("judge") or {}).items() if k != "inferenceDeployment"}
    judge["url"] = endpoint
    reward["judge"] = judge
    return {**wire, "reward": reward}
