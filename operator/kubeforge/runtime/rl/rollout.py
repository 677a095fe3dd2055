"""Disaggregated rollouts: completions sampled by a pool of reference engines over their OpenAI API.

Every engine is checked to serve the learner's policy version before and after a batch (the version fence of
kubeforge.runtime.rl.weightsync): completions from an engine that changed or lagged are stale and dropped.
Token ids come back by re-encoding the text, which is exact for byte-level tokenizers on valid UTF-8; the
learner recomputes the old log-probabilities itself, so sampler/learner numerics never enter the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
             seed: int) -> tuple[str, str]:
        r = self.http.post(engine.url + "/v1/completions", json={
            "model": self.model_name, "prompt": prompt_ids, "max_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed})
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["text"], choice.get("finish_reason") or "length"

    def sample(self, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
               version: int, seed: int) -> list[Completion]:
        """group_size completions per prompt, spread round-robin over the engines, stamped with `version`
        when every engine served that version throughout the batch; else stamped -1 (stale)."""
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
                jobs.append((i, p, self.pool.submit(self._one, engine, p, max_new_tokens, temperature,
                                                    seed * 1_000_003 + k)))
        out: list[Completion] = []
        for i, p, fut in jobs:
            text, finish = fut.result()
            # invalid UTF-8 comes back as U+FFFD (3 bytes): never more tokens than were sampled
            ids = self.encode(text)[:max_new_tokens]
            finished = finish == "stop"
            if finished:
                ids = [*ids, self.eos_id]
            out.append(Completion(i, list(p), ids, text, stamp, finished))
        try:
            for e in self.engines:
                e.check(version)
        except StaleEngine:
            self.stale_batches += 1
            for c in out:
                c.version = -1
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()


def engines_from(urls: str | list[str]) -> list[EngineClient]:
    items = urls.split(",") if isinstance(urls, str) else urls
    return [EngineClient(u.strip()) for u in items if u.strip()]


__all__ = ["HttpRollout", "engines_from"]
