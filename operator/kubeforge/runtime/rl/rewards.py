"""Rewards: built-in verifiable checks, `module:function` entrypoints, a reward model, an LLM judge.

Every scorer turns a batch of (prompt, completion, reference) into `Scores`: one float per completion plus
the number of completions that could not be scored (a judge's junk reply, an entrypoint that raised). A
failure scores 0.0 and is counted, never raised: one bad sample must not stop a training run.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

log = logging.getLogger(__name__)

CheckFn = Callable[[str, str, "str | None"], float]


@dataclass
class Scores:
    values: list[float]
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failure reasons, for logs


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str | None]) -> Scores: ...


# ---------------------------------------------------------------------------------------------- checks


def exact_match(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the completion, stripped, equals the reference, stripped."""
    return float(reference is not None and completion.strip() == reference.strip())


def contains(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the reference occurs in the completion."""
    return float(bool(reference) and reference.strip() in completion)  # type: ignore[union-attr]


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*\$?(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> Fraction | None:
    """'1,234' / '-3.50' / '7/2' / '$12' as an exact Fraction; None when it is not a number."""
    s = text.strip().strip("$").replace(",", "").rstrip(".")
    if not s:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a worked solution: \\boxed{...}, then '#### x', then 'answer is x', then the
    last number in the text (GSM8K / MATH conventions)."""
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        found = pattern.findall(completion)
        if found:
            return found[-1]
    numbers = _ANY_NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def math_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the completion's final answer equals the reference numerically (or textually when either
    side is not a number)."""
    if reference is None:
        return 0.0
    got = extract_answer(completion)
    if got is None:
        return 0.0
    want_ref = extract_answer(reference) if parse_number(reference) is None else reference
    a, b = parse_number(got), parse_number(want_ref or reference)
    if a is not None and b is not None:
        return float(a == b)
    return float(got.strip() == reference.strip())


def json_valid(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the completion parses as JSON; when the reference is a JSON object, its keys must be present
    in the completion's object too."""
    try:
        value = json.loads(completion.strip())
    except ValueError:
        return 0.0
    if reference:
        try:
            want = json.loads(reference)
        except ValueError:
            return 1.0
        if isinstance(want, dict):
            return float(isinstance(value, dict) and all(k in value for k in want))
    return 1.0


def regex_match(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the reference, a regular expression, matches the whole stripped completion."""
    if not reference:
        return 0.0
    try:
        return float(re.fullmatch(reference, completion.strip(), flags=re.DOTALL) is not None)
    except re.error:
        return 0.0


BUILTIN: dict[str, CheckFn] = {
    "exact_match": exact_match,
    "contains": contains,
    "math_answer": math_answer,
    "json_valid": json_valid,
    "regex_match": regex_match,
}


def load_entrypoint(entrypoint: str) -> CheckFn:
    """`package.module:function` from the image's Python path."""
    module_name, _, attr = entrypoint.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{entrypoint} is not callable")
    return fn  # type: ignore[no-any-return]


class CheckScorer:
    """A per-sample function (built-in or entrypoint); a raise or a non-finite value is a counted failure."""

    def __init__(self, fn: CheckFn, name: str) -> None:
        self.fn, self.name = fn, name

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str | None]) -> Scores:
        out = Scores([])
        for p, c, r in zip(prompts, completions, references, strict=True):
            try:
                v = float(self.fn(p, c, r))
                if not math.isfinite(v):
                    raise ValueError(f"reward {v}")
            except Exception as exc:  # noqa: BLE001 - user code: count it, score 0
                v = 0.0
                out.failures += 1
                if len(out.errors) < 3:
                    out.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")
            out.values.append(v)
        return out


# ---------------------------------------------------------------------------------------------- reward model


class RewardModelScorer:
    """A Hugging Face sequence-classification model; the reward is the first logit of prompt+completion."""

    def __init__(self, path: str, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str | None]) -> Scores:
        import torch

        values: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False)
                logits = self.model(**enc).logits
                values.extend(float(x) for x in logits[:, 0])
        return Scores(values)


# ---------------------------------------------------------------------------------------------- LLM judge

JUDGE_TEMPLATE = (
    "{rubric}\n\n[Prompt]\n{prompt}\n\n[Response]\n{completion}\n\n{reference_block}"
    "Rate the response from 0 to 10. Reply with 'Score: N' and nothing else."
)

_SCORE_PATTERNS = [
    re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)"),
    re.compile(r"rating\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
]


def parse_judge_score(reply: str, scale: float = 10.0) -> float | None:
    """A judge's reply as a reward in [0, 1]: 'Score: 7' / '7/10' / 'Rating: 3' / a bare number; a value
    outside [0, scale] or no number at all is None (a failure)."""
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    for pattern in _SCORE_PATTERNS:
        m = pattern.search(text)
        if m:
            value = float(m.group(1))
            top = float(m.group(2)) if m.lastindex and m.lastindex >= 2 and m.group(2) else scale
            break
    else:
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*\.?\s*", text)
        if not m:
            return None
        value, top = float(m.group(1)), scale
    if top <= 0 or not (0.0 <= value <= top):
        return None
    return value / top


class JudgeScorer:
    """An OpenAI-compatible chat endpoint (an InferenceDeployment's Service, or any URL) scoring each
    completion against the rubric. Junk replies and HTTP errors are counted failures scoring 0."""

    def __init__(self, base_url: str, rubric: str, model: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 16, concurrency: int = 8, client: Any = None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/").removesuffix("/v1")  # an OpenAI base URL often ends in /v1
        self.rubric, self.model, self.max_tokens = rubric, model, max_tokens
        self.concurrency = concurrency
        self.client = client or httpx.Client(timeout=timeout)

    def _model(self) -> str:
        if self.model is None:
            r = self.client.get(f"{self.base_url}/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    def judge_one(self, prompt: str, completion: str, reference: str | None) -> str:
        ref = f"[Reference answer]\n{reference}\n\n" if reference else ""
        content = JUDGE_TEMPLATE.format(rubric=self.rubric, prompt=prompt, completion=completion,
                                        reference_block=ref)
        r = self.client.post(f"{self.base_url}/v1/chat/completions", json={
            "model": self._model(), "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens, "temperature": 0.0})
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"])

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str | None]) -> Scores:
        from concurrent.futures import ThreadPoolExecutor

        def one(args: tuple[str, str, str | None]) -> tuple[float | None, str]:
            try:
                reply = self.judge_one(*args)
            except Exception as exc:  # noqa: BLE001 - a failed call is one failed sample
                return None, f"judge call failed: {type(exc).__name__}: {exc}"
            value = parse_judge_score(reply)
            return value, "" if value is not None else f"unparsable judge reply {reply[:80]!r}"

        out = Scores([])
        with ThreadPoolExecutor(self.concurrency) as pool:
            for value, err in pool.map(one, zip(prompts, completions, references, strict=True)):
                if value is None:
                    out.failures += 1
                    if len(out.errors) < 3:
                        out.errors.append(err)
                out.values.append(0.0 if value is None else value)
        return out


def build_scorer(reward: Any, model_dir: str | None = None, judge_url: str | None = None) -> Scorer:
    """The scorer of a RewardSpec. `model_dir` is the fetched reward model; `judge_url` the resolved
    base URL of the judge (its InferenceDeployment's Service, or judge.url)."""
    if reward.verifiable is not None:
        v = reward.verifiable
        if v.entrypoint:
            return CheckScorer(load_entrypoint(v.entrypoint), v.entrypoint)
        if v.check not in BUILTIN:
            raise ValueError(f"unknown check {v.check!r}; one of {', '.join(BUILTIN)}")
        return CheckScorer(BUILTIN[v.check], v.check)
    if reward.model is not None:
        if model_dir is None:
            raise ValueError("the reward model was not fetched")
        return RewardModelScorer(model_dir)
    if reward.judge is not None:
        url = judge_url or reward.judge.url
        if not url:
            raise ValueError("the judge has no URL")
        return JudgeScorer(url, reward.judge.rubric)
    raise ValueError("reward: set one of verifiable, model, judge")
