"""The demo's live view: one line per object from the status the API server stores, rewritten in place."""

from __future__ import annotations

import io

from kubeforge.demo import LiveView, status_line


def test_lines_say_what_matters_per_kind() -> None:
    waiting = {"status": {"phase": "Pending", "conditions": [
        {"type": "Reconciling", "status": "True", "reason": "WaitingForSource",
         "message": "waiting for PretrainJob base to succeed (model.from; now Running)"}]}}
    assert status_line("ContextExtensionJob", "ext", waiting).endswith(
        "waiting for PretrainJob base to succeed (model.from; now Running)")
    assert "(not created)" in status_line("RLJob", "rl", None)
    pre = {"status": {"phase": "Running", "progress": {"step": 12, "totalSteps": 40, "loss": 2.5,
                                                        "tokensPerSecond": 1234.4}, "restarts": 1}}
    line = status_line("PretrainJob", "base", pre)
    assert "Running" in line and "step 12/40" in line and "loss 2.500" in line and "1234 tok/s" in line
    assert "restarts 1" in line
    ext = {"status": {"phase": "Running", "currentStage": "2/2 512", "progress": {"step": 9, "totalSteps": 16},
                      "stages": [{"index": 0, "seqLen": 256, "evals": {"needleScore": 0.5}}]}}
    line = status_line("ContextExtensionJob", "ext", ext)
    assert "stage 2/2 512" in line and "needle 0.50" in line
    rl = {"status": {"phase": "Running", "progress": {"step": 30, "totalSteps": 60, "reward": 0.61},
                     "rl": {"initialReward": 0.12, "kl": 0.0123}}}
    line = status_line("RLJob", "rl", rl)
    assert "reward 0.61 (from 0.12)" in line and "kl 0.0123" in line
    inf = {"status": {"phase": "Ready", "readyPools": "1/1", "endpoint": "http://serve.default.svc:8000"}}
    assert status_line("InferenceDeployment", "serve", inf).endswith("pools 1/1  http://serve.default.svc:8000")


def test_pipe_prints_only_changed_lines() -> None:
    out = io.StringIO()
    view = LiveView([("PretrainJob", "a"), ("RLJob", "b")], out)
    view.update({("PretrainJob", "a"): "a1", ("RLJob", "b"): "b1"}, 1)
    view.update({("PretrainJob", "a"): "a2", ("RLJob", "b"): "b1"}, 2)
    assert out.getvalue().splitlines() == ["00:01 a1", "00:01 b1", "00:02 a2"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_rewrites_the_block_in_place() -> None:
    out = _Tty()
    view = LiveView([("PretrainJob", "a"), ("RLJob", "b")], out)
    view.update({("PretrainJob", "a"): "a1", ("RLJob", "b"): "b1"}, 0)
    first = out.getvalue()
    view.update({("PretrainJob", "a"): "a2", ("RLJob", "b"): "b1"}, 61)
    second = out.getvalue()[len(first):]
    assert "\x1b[" not in first.split("\x1b[2K", 1)[0]  # nothing to move over the first time
    assert second.startswith("\x1b[2F")  # back to the first of the two lines, then both rewritten
    assert second.count("\x1b[2K") == 2 and "01:01 a2" in second and "01:01 b1" in second
