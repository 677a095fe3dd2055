"""Rewards: built-in checks as tables, entrypoints, the judge's reply parser and the real judge over HTTP."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubeforge.api.kinds import RewardSpec
from kubeforge.runtime.rl import rewards


@pytest.mark.parametrize(("check", "completion", "reference", "want"), [
    ("exact_match", "42", "42", 1.0),
    ("exact_match", " 42\n", "42", 1.0),
    ("exact_match", "42.", "42", 0.0),
    ("exact_match", "42", None, 0.0),
    ("contains", "the answer is Paris.", "Paris", 1.0),
    ("contains", "the answer is paris.", "Paris", 0.0),
    ("contains", "anything", "", 0.0),
    ("math_answer", "7", "7", 1.0),
    ("math_answer", "3+4 = 7", "7", 1.0),
    ("math_answer", "so x = \\boxed{3/4}", "0.75", 1.0),
    ("math_answer", "... #### 1,234", "1234", 1.0),
    ("math_answer", "The answer is 12. Then 13", "12", 1.0),
    ("math_answer", "13", "12", 0.0),
    ("math_answer", "no number", "12", 0.0),
    ("math_answer", "-5.0", "-5", 1.0),
    ("math_answer", "x", None, 0.0),
    ("json_valid", '{"a": 1}', None, 1.0),
    ("json_valid", '{"a": 1', None, 0.0),
    ("json_valid", '{"a": 1}', '{"a": 0, "b": 0}', 0.0),
    ("json_valid", '{"a": 1, "b": [2]}', '{"a": 0, "b": 0}', 1.0),
    ("json_valid", "[1, 2]", None, 1.0),
    ("regex_match", "2024-01-31", r"\d{4}-\d{2}-\d{2}", 1.0),
    ("regex_match", "date 2024-01-31", r"\d{4}-\d{2}-\d{2}", 0.0),
    ("regex_match", "x", "(", 0.0),
    ("regex_match", "x", None, 0.0),
])
def test_builtin_checks(check: str, completion: str, reference: str | None, want: float) -> None:
    assert rewards.BUILTIN[check]("prompt", completion, reference) == want


def test_builtin_names_match_the_api() -> None:
    from kubeforge.api.kinds import BUILTIN_CHECKS

    assert set(BUILTIN_CHECKS) == set(rewards.BUILTIN)


def _raises(prompt: str, completion: str, reference: str | None) -> float:
    if completion == "boom":
        raise RuntimeError("boom")
    return float("nan") if completion == "nan" else 0.5


def test_entrypoint_scorer_counts_failures() -> None:
    spec = RewardSpec.model_validate({"verifiable": {"entrypoint": f"{__name__}:_raises"}})
    scorer = rewards.build_scorer(spec)
    s = scorer.score(["p"] * 3, ["ok", "boom", "nan"], [None] * 3)
    assert s.values == [0.5, 0.0, 0.0]
    assert s.failures == 2
    assert "boom" in s.errors[0]


def test_builtin_scorer_from_spec() -> None:
    scorer = rewards.build_scorer(RewardSpec.model_validate({"verifiable": {"check": "math_answer"}}))
    assert scorer.score(["1+1="] * 2, ["2", "3"], ["2", "2"]).values == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown check"):
        rewards.build_scorer(RewardSpec.model_validate({"verifiable": {"check": "nope"}}))


@pytest.mark.parametrize(("reply", "want"), [
    ("Score: 7", 0.7),
    ("score=10", 1.0),
    ("I'd say 8/10 overall.", 0.8),
    ("Score: 3/5", 0.6),
    ("Rating: 0", 0.0),
    ("9", 0.9),
    ("  4.5 ", 0.45),
    ("Score: 11", None),
    ("Score: -1", None),
    ("great answer!", None),
    ("", None),
    ("<|eos|>\x00\x01", None),
])
def test_parse_judge_score(reply: str, want: float | None) -> None:
    got = rewards.parse_judge_score(reply)
    assert got == pytest.approx(want) if want is not None else got is None


class _Judge(BaseHTTPRequestHandler):
    """A real OpenAI-compatible HTTP judge that answers with a score, junk, or an HTTP error depending on
    the response it is asked to judge."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send(200, {"data": [{"id": "judge"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        response = content.split("[Response]\n", 1)[1].split("\n", 1)[0]
        if response == "error":
            self._send(500, {"error": "down"})
            return
        reply = {"good": "Score: 9", "bad": "Score: 1"}.get(response, "I refuse to grade this")
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})


def test_judge_scorer_over_http_counts_junk_and_errors() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        spec = RewardSpec.model_validate({"judge": {"url": url, "rubric": "Be strict."}})
        s = rewards.build_scorer(spec).score(["q"] * 4, ["good", "bad", "junk", "error"], [None] * 4)
        assert s.values == pytest.approx([0.9, 0.1, 0.0, 0.0])
        assert s.failures == 2
    finally:
        server.shutdown()


def test_reward_model_scorer(tmp_path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from kubeforge.runtime.tinymodel import byte_tokenizer, tiny_llama_config

    cfg = tiny_llama_config()
    cfg.pop("model_type"), cfg.pop("architectures")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("llama", num_labels=1, **cfg))
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    scorer = rewards.build_scorer(RewardSpec.model_validate({"model": {"uri": "s3://bucket/rm"}}), str(tmp_path))
    s = scorer.score(["a", "a"], ["b", "bcd"], [None, None])
    assert len(s.values) == 2 and s.failures == 0
    assert s.values[0] != s.values[1]
