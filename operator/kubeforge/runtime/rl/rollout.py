"""Disaggregated rollouts: completions sampled by a pool of reference engines over their OpenAI API.

Every engine is checked to serve the learner's policy version before and after a batch (the version fence of
kubeforge.runtime.rl.weightsync): completions from an engine that changed or lagged are stale and dropped.
Token ids: vLLM returns the sampled ids (`return_token_ids`); the reference engine's come back by re-encoding
the text, which is exact for byte-level tokenizers on valid UTF-8. The learner recomputes the old
log-probabilities itself; the sampler's own log-probabilities (the behaviour policy of the off-policy
correction) are asked for only when `want_logprobs`: vLLM returns them with the completion (`logprobs: 0`,
`--logprobs-mode processed_logprobs`), the reference engine scores the tokens teacher-forced under the same,
version-fenced weights (`POST /kubeforge/v1/logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from .policy import Completion
from .weightsync import EngineClient, StaleEngine


class HttpRollout:
    def __init__(self, engines: list[EngineClient], model_name: str, encode: Callable[[str], list[int]],
                 eos_id: int, concurrency: int = 16) -> None:
        import httpx

        self.engines, self.model_name, self.encode, self.eos_id = engines, model_name, encode, eos_id
        self.http = httpx.Client(timeout=300.0, limits=httpx.Limits(max_connections=concurrency * 2))
        self.pool = ThreadPoolExecutor(concurrency)
        self.stale_batches = 0

    def _one(self, engine: EngineClient, prompt_ids: list[int], max_new_tokens: int, temperature: float,
             seed: int, want_logprobs: bool) -> tuple[str, str, list[int] | None, list[float] | None]:
        body = {"model": self.model_name, "prompt": prompt_ids, "max_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed, "return_token_ids": True}
        if want_logprobs:
            body["logprobs"] = 0  # the sampled token's own log-probability only
        r = self.http.post(engine.url + "/v1/completions", json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        ids = choice.get("token_ids")
        lps = (choice.get("logprobs") or {}).get("token_logprobs") if isinstance(choice.get("logprobs"), dict) \
            else None
        return (choice["text"], choice.get("finish_reason") or "length",
                [int(t) for t in ids] if isinstance(ids, list) else None,
                [float(x) for x in lps] if isinstance(lps, list) and None not in lps else None)

    def _complete(self, engine: EngineClient, i: int, prompt: list[int], max_new_tokens: int, temperature: float,
                  seed: int, version: int, want_logprobs: bool) -> Completion:
        text, finish, ids, lps = self._one(engine, prompt, max_new_tokens, temperature, seed, want_logprobs)
        finished = finish == "stop"
        if ids is None:
            # invalid UTF-8 comes back as U+FFFD (3 bytes): never more tokens than were sampled
            ids = self.encode(text)[:max_new_tokens]
            lps = None
        if finished and (not ids or ids[-1] != self.eos_id):
            ids = [*ids, self.eos_id]
            lps = None  # the engine did not report the EOS it stopped on
        if lps is not None and len(lps) != len(ids):
            lps = None
        if want_logprobs and lps is None:
            try:  # the reference engine scores them teacher-forced; StaleEngine when it moved on
                lps = engine.logprobs(list(prompt), ids, version, temperature)
            except httpx.HTTPStatusError:
                lps = None  # an engine without that endpoint: the completion cannot be weighted
        return Completion(i, list(prompt), ids, text, version, finished, lps or [])

    def sample(self, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
               version: int, seed: int, want_logprobs: bool = False) -> list[Completion]:
        """group_size completions per prompt, spread round-robin over the engines, stamped with `version`
        when every engine served that version throughout the batch; else stamped -1 (stale). With
        `want_logprobs` each carries the sampler's log-probabilities of its tokens."""
        try:
            for e in self.engines:
                e.check(version)
        except StaleEngine:
            stamp = -1
        else:
            stamp = version
        jobs = []
        for i, p in enumerate(prompts):
            for j in range(group_size):
                k = i * group_size + j
                engine = self.engines[k % len(self.engines)]
                jobs.append(self.pool.submit(self._complete, engine, i, p, max_new_tokens, temperature,
                                             seed * 1_000_003 + k, version, want_logprobs))
        out: list[Completion] = []
        for fut in jobs:
            try:
                c = fut.result()
            except StaleEngine:
                stamp = -1
                continue
            out.append(c)
        if stamp == -1 or len(out) != len(jobs):
            self.stale_batches += 1
            return [Completion(c.prompt_index, c.prompt_ids, c.completion_ids, c.text, -1, c.finished)
                    for c in out] if len(out) == len(jobs) else self._all_stale(prompts, group_size)
        for c in out:
            c.version = stamp
        try:
            for e in self.engines:
                e.check(version)
        except StaleEngine:
            self.stale_batches += 1
            for c in out:
                c.version = -1
        return out

    @staticmethod
    def _all_stale(prompts: list[list[int]], group_size: int) -> list[Completion]:
        """A batch an engine's version changed under: every completion stale (and empty: nobody trains on it)."""
        return [Completion(i, list(p), [], "", -1, False) for i, p in enumerate(prompts) for _ in range(group_size)]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()


def engines_from(urls: str | list[str]) -> list[EngineClient]:
    items = urls.split(",") if isinstance(urls, str) else urls
    return [EngineClient(u.strip()) for u in items if u.strip()]


__all__ = ["HttpRollout", "engines_from"]
