"""RLJob runtime: `torchrun ... -m kubeforge.runtime.rl.learner` in every pod of the learner gang.

One learner step (colocated placement: every rank samples with its own copy of the current weights):
1. each rank takes its share of promptsPerStep prompts and samples groupSize completions of each, every
   completion stamped with the policy version that produced it;
2. the reward scores them (a counted failure scores 0, never stops the run);
3. advantages: grpo/dapo group-normalised, rloo leave-one-out, ppo GAE over a value head; dapo drops groups
   whose rewards are all equal (dynamic sampling) and draws more prompts to fill the batch;
4. old log-probabilities (and the reference's when klCoef > 0) from one forward pass, then the clipped
   token-mean loss, one optimizer step (gradients averaged over the gang by DDP/FSDP), version + 1.
Completions carry the policy version that sampled them; `admit` decides per completion: a lag past
weightSync.maxLag (default intervalSteps - 1) or an engine that changed mid-batch (-1) is dropped and counted;
a lag within it is kept with truncated importance weights (offPolicy tis) or dropped (drop).

Checkpoints, resume, SIGTERM, the progress report and the final export are PretrainJob's machinery
(kubeforge.runtime.checkpointing / report / pretrain): the train state adds the policy version, the prompt
cursor and the reward curve. Exit codes as kubeforge.runtime.pretrain.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ... import contract
from ...api.common import OptimizerSpec
from ...api.kinds import RLJobSpec
from ...storage import CheckpointStore, make_client
from ...storage import s3 as s3mod
from .. import dist as kdist
from ..checkpointing import AppState, Checkpointer, rng_state, set_rng_state
from ..pretrain import Preempted, StopFlag, load_model, load_tokenizer, scoped_client, workdir_for
from ..report import Progress, Reporter, now_rfc3339, sink_from_env, write_termination_message
from ..training import InvalidSpec, build_optimizer, build_scheduler
from . import algorithms as alg
from . import rewards
from .policy import Completion, completion_logprobs, model_device, pack, sample

log = logging.getLogger("kubeforge.rl")

JUDGE_URL_ENV = "KUBEFORGE_JUDGE_URL"  # a judge URL overriding reward.judge.url
ROLLOUT_URLS_ENV = "KUBEFORGE_ROLLOUT_URLS"  # comma-separated base URLs of the rollout engines (disaggregated)
WEIGHT_SYNC_PORT_ENV = "KUBEFORGE_WEIGHT_SYNC_PORT"  # rank 0's port of the nccl weight-sync group's store
CURVE_POINTS = 32


# ---------------------------------------------------------------------------------------------- job


def load_job(path: str | None = None) -> tuple[dict[str, Any], RLJobSpec]:
    from kubeforge.runtime.pretrain import load_job_as

    job, spec = load_job_as(RLJobSpec, path)
    return job, spec


def check_spec(spec: RLJobSpec, world_size: int) -> None:
    a = spec.algorithm
    if spec.model.uri is None and spec.model.config is None:
        raise InvalidSpec("model.from was not resolved to model.uri by the operator", "spec.model")
    if a.prompts_per_step % world_size:
        raise InvalidSpec(f"promptsPerStep {a.prompts_per_step} is not a multiple of the {world_size} learner "
                          "processes", "spec.algorithm.promptsPerStep")
    if a.name in ("grpo", "rloo", "dapo") and a.group_size < 2:
        raise InvalidSpec(f"{a.name} needs groupSize >= 2", "spec.algorithm.groupSize")
    if spec.rollout.placement == "disaggregated" and not os.environ.get(ROLLOUT_URLS_ENV):
        raise InvalidSpec(f"rollout.placement disaggregated needs the rollout engines' URLs in {ROLLOUT_URLS_ENV} "
                          "(the operator sets it on the learner pods)", "spec.rollout.placement")


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptRecord:
    prompt: str
    reference: str | None


@dataclass
class PromptSet:
    """The prompts in a seeded order per epoch; `cursor` counts prompts handed out (the resume point)."""

    records: list[PromptRecord]
    seed: int
    cursor: int = 0
    _order: list[int] = field(default_factory=list)
    _epoch: int = -1

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, len(self.records))
        if epoch != self._epoch:
            self._order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order[pos]

    def take(self, n: int, rank: int, world: int) -> list[PromptRecord]:
        """The next n x world prompts of the gang; this rank's n of them."""
        mine = [self.records[self._index(self.cursor + rank * n + i)] for i in range(n)]
        self.cursor += n * world
        return mine


def parse_prompts(lines: list[str], text_field: str) -> list[PromptRecord]:
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise InvalidSpec(f"prompt line {i + 1} is not JSON: {exc}", "spec.data.uri") from exc
        prompt = rec.get(text_field, rec.get("prompt")) if isinstance(rec, dict) else None
        if not isinstance(prompt, str):
            raise InvalidSpec(f"prompt line {i + 1} has no string {text_field!r} or 'prompt'", "spec.data.uri")
        ref = rec.get("reference", rec.get("answer"))
        out.append(PromptRecord(prompt, None if ref is None else str(ref)))
    if not out:
        raise InvalidSpec("no prompts found", "spec.data.uri")
    return out


def read_prompts(client: Any, uri: str, text_field: str) -> list[PromptRecord]:
    base = s3mod.S3Uri.parse(uri)
    keys = sorted(o["Key"] for o in s3mod.list_objects(client, base) if "Key" in o and not o["Key"].endswith("/"))
    if not keys:  # a single object named by the URI
        keys = [base.key]
    lines: list[str] = []
    for key in keys:
        data = s3mod.get_bytes(client, s3mod.S3Uri(base.bucket, key))
        lines.extend(data.decode("utf-8").splitlines())
    return parse_prompts(lines, text_field)


# ---------------------------------------------------------------------------------------------- ppo critic


class ValueHead:
    """ppo: a linear value head on the policy's last hidden state (shared trunk), built lazily so the
    critic-free algorithms carry no extra parameters."""

    @staticmethod
    def attach(model: Any) -> None:
        import torch

        model.kf_value_head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(model.kf_value_head.weight)
        torch.nn.init.zeros_(model.kf_value_head.bias)


def logprobs_and_values(model: Any, batch: Any, temperature: float) -> tuple[Any, Any]:
    """Completion log-probabilities and, with a value head, per-token values [N, T]."""
    import torch

    base = kdist.unwrap(model)
    if not hasattr(base, "kf_value_head"):
        return completion_logprobs(model, batch, temperature), None
    pos = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                use_cache=False, output_hidden_states=True)
    logits = out.logits[:, batch.prompt_len - 1:-1].float()
    if temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids[:, batch.prompt_len:]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
    hidden = out.hidden_states[-1][:, batch.prompt_len - 1:-1]
    values = base.kf_value_head(hidden.float()).squeeze(-1) * batch.completion_mask
    return lp, values


def torch_randint(generator: Any) -> int:
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


# ---------------------------------------------------------------------------------------------- one step


def max_lag(spec: RLJobSpec) -> int:
    ws = spec.weight_sync
    return ws.max_lag if ws.max_lag is not None else ws.interval_steps - 1


def admit(comps: list[Completion], learner_version: int, lag_limit: int, off_policy: str) -> list[bool]:
    """Which completions the learner may train on. Sampled by the learner's own version: yes. By an older one
    within `lag_limit`: with offPolicy tis, if the sampler's log-probabilities of its tokens are known (the
    importance weights need them); with drop, no. Older, or from an engine that changed mid-batch (-1): no."""
    out = []
    for c in comps:
        lag = learner_version - c.version
        if c.version < 0 or lag < 0 or lag > lag_limit:
            out.append(False)
        elif lag == 0:
            out.append(True)
        else:
            out.append(off_policy == "tis" and len(c.logprobs) == len(c.completion_ids))
    return out


def sampler_logprobs(comps: list[Completion], width: int, device: Any = None) -> tuple[Any, Any]:
    """The sampler's log-probabilities [N, width] (0 where unknown) and which completions have them [N]."""
    import torch

    lp = torch.zeros((len(comps), width), dtype=torch.float32)
    has = torch.zeros(len(comps), dtype=torch.bool)
    for i, c in enumerate(comps):
        if c.logprobs and len(c.logprobs) == len(c.completion_ids):
            lp[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
            has[i] = True
    return (lp.to(device), has.to(device)) if device is not None else (lp, has)


@dataclass
class StepResult:
    loss: float
    rewards: list[float]
    kl: float
    response_length: float
    failures: int
    stale: int
    skipped_groups: int
    errors: list[str]
    corrected: int = 0  # completions of an older version kept with importance weights


class Learner:
    """The per-rank RL step; everything around it (gang, checkpoints, reports) is in `run`."""

    def __init__(self, spec: RLJobSpec, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any,
                 scorer: rewards.Scorer, reference: Any, denv: kdist.DistEnv, choice: kdist.Choice,
                 eos_id: int, pad_id: int, seed: int) -> None:
        import torch

        self.spec, self.model, self.optimizer, self.scheduler = spec, model, optimizer, scheduler
        self.tokenizer, self.scorer, self.reference = tokenizer, scorer, reference
        self.denv, self.choice = denv, choice
        self.eos_id, self.pad_id = eos_id, pad_id
        self.version = 0
        self.published = 0  # the version the rollout engines serve (colocated: always self.version)
        self.generator = torch.Generator().manual_seed(seed * 7919 + denv.rank)
        self.remote: Any = None  # HttpRollout when disaggregated
        self.engines: list[Any] = []
        self.broadcaster: Any = None  # NcclWeightSync on rank 0 with weightSync.method nccl

    def use_engines(self, urls: str) -> None:
        """The rollout engines: reference engines take weights over http; with weightSync.method nccl (vLLM
        engines with kubeforge's worker extension) rank 0 broadcasts them over a group of its own (NCCL on
        GPU, gloo on CPU) and the engines' versions are read through /collective_rpc."""
        from .rollout import HttpRollout, engines_from

        self.engines = engines_from(urls)
        if self.spec.weight_sync.method == "nccl":
            import torch

            from .. import localrun
            from .vllm_sync import NcclWeightSync, RpcEngineClient

            self.engines = [RpcEngineClient(e.url) for e in self.engines]
            if self.denv.is_main:
                host = os.environ.get(contract.ENV_POD_IP) or "127.0.0.1"
                port = int(os.environ.get(WEIGHT_SYNC_PORT_ENV) or 0) or localrun.free_port()
                self.broadcaster = NcclWeightSync(self.engines, host, port,
                                                  "nccl" if torch.cuda.is_available() else "gloo")
        for e in self.engines:
            e.wait_ready()
        self.remote = HttpRollout(self.engines, self.engine_model_name(), self.encode_text, self.eos_id)

    def engine_model_name(self) -> str:
        import httpx

        r = httpx.get(self.engines[0].url + "/v1/models", timeout=60)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def sync_weights(self, force: bool = False) -> bool:
        """Push the policy to the engines every weightSync.intervalSteps (rank 0 pushes; all learn the new
        published version). Returns whether a push happened."""
        if self.remote is None:
            self.published = self.version
            return False
        if not force and self.version - self.published < self.spec.weight_sync.interval_steps:
            return False
        if self.spec.weight_sync.method == "nccl":
            from .vllm_sync import full_named_tensors

            # FSDP2 shards are gathered by every rank; DDP's replica on rank 0 is whole already
            tensors = full_named_tensors(kdist.unwrap(self.model)) \
                if self.denv.is_main or self.choice.strategy == "fsdp" else []
            if self.denv.is_main:
                self.broadcaster.push(tensors, self.version)
        elif self.denv.is_main:
            from .weightsync import push_weights

            push_weights(kdist.unwrap(self.model), self.engines, self.version)
        self.published = self.version
        return True

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None else list(ids)

    def rollout(self, records: list[PromptRecord]) -> list[Completion]:
        r = self.spec.rollout
        if self.remote is not None:
            seed = int(torch_randint(self.generator))
            # the sampler's log-probabilities are needed for the importance weights of a lagging engine's batch
            want = self.spec.weight_sync.off_policy == "tis" and self.published < self.version
            return self.remote.sample([self.encode(x.prompt) for x in records], self.spec.algorithm.group_size,
                                      r.max_new_tokens, r.temperature, self.published, seed, want)
        return sample(kdist.unwrap(self.model), [self.encode(x.prompt) for x in records],
                      self.spec.algorithm.group_size, r.max_new_tokens, r.temperature, self.eos_id, self.pad_id,
                      self.version, self.generator, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    def step(self, prompts: PromptSet) -> StepResult:
        import torch

        a = self.spec.algorithm
        g = a.group_size
        per_rank = a.prompts_per_step // self.denv.world_size
        temperature = self.spec.rollout.temperature
        kept_records: list[PromptRecord] = []
        kept: list[Completion] = []
        kept_rewards: list[float] = []
        all_rewards: list[float] = []
        failures = stale = skipped = 0
        errors: list[str] = []
        # dapo draws up to 3 extra rounds of prompts to replace groups without signal
        for _round in range(4 if a.name == "dapo" else 1):
            need = per_rank - len(kept_records)
            if need <= 0:
                break
            records = prompts.take(need, self.denv.rank, self.denv.world_size)
            comps = self.rollout(records)
            fresh = admit(comps, self.version, max_lag(self.spec), self.spec.weight_sync.off_policy)
            stale += fresh.count(False)
            texts = [c.text for c in comps]
            scores = self.scorer.score([records[c.prompt_index].prompt for c in comps], texts,
                                       [records[c.prompt_index].reference for c in comps])
            failures += scores.failures
            errors.extend(scores.errors)
            values = [v if ok else 0.0 for v, ok in zip(scores.values, fresh, strict=True)]
            all_rewards.extend(values)
            rt = torch.tensor(values)
            informative = alg.informative_groups(rt, g) if a.name == "dapo" else torch.ones(len(records), dtype=torch.bool)
            for gi, rec in enumerate(records):
                group = comps[gi * g:(gi + 1) * g]
                if not informative[gi] or not all(fresh[gi * g:(gi + 1) * g]):
                    skipped += 1
                    continue
                if len(kept_records) < per_rank:
                    kept_records.append(rec)
                    kept.extend(group)
                    kept_rewards.extend(values[gi * g:(gi + 1) * g])

        lengths = [len(c.completion_ids) for c in kept] or [0]
        corrected = 0
        stats_kl = 0.0
        loss_value = 0.0
        self.model.train()
        if kept:
            dev = model_device(self.model)
            rewards_t = torch.tensor(kept_rewards, device=dev)
            batch = pack([c.prompt_ids for c in kept], [c.completion_ids for c in kept], self.pad_id, dev)
            with torch.no_grad():
                old_lp, old_values = logprobs_and_values(self.model, batch, temperature)
                ref_lp = completion_logprobs(self.reference, batch, temperature) if self.reference is not None \
                    else None
            if a.name == "ppo":
                token_r = alg.outcome_token_rewards(rewards_t, batch.completion_mask)
                adv, returns = alg.gae(token_r, old_values, batch.completion_mask, a.gamma, a.gae_lambda)
                adv = alg.whiten(adv, batch.completion_mask)
            else:
                adv = alg.advantages_for(a.name, rewards_t, g, a.scale_rewards)
            is_weights = None
            corrected = sum(1 for c in kept if c.version != self.version)
            if self.spec.weight_sync.off_policy == "tis" and corrected:
                # truncated importance sampling: the learner's old policy over the sampler's, per token
                beh, has = sampler_logprobs(kept, old_lp.size(1), dev)
                lagging = torch.tensor([c.version != self.version for c in kept], device=dev)
                is_weights = alg.truncated_is_weights(old_lp, beh, has & lagging, self.spec.weight_sync.tis_cap)
            lp, new_values = logprobs_and_values(self.model, batch, temperature)
            loss, st = alg.policy_loss(lp, old_lp, adv, batch.completion_mask, a.clip_range, a.clip_range_high,
                                       ref_lp, a.kl_coef, a.kl_estimator, is_weights)
            if a.name == "ppo":
                loss = loss + 0.5 * alg.value_loss(new_values, old_values, returns, batch.completion_mask,
                                                   a.clip_range)
            stats_kl = st.kl
            loss_value = float(loss.detach())
        else:
            # nothing to learn from on this rank; a zero loss keeps the gang's collectives in step
            loss = sum(p.sum() for p in self.model.parameters()) * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        return StepResult(loss_value, all_rewards, stats_kl, float(sum(lengths)) / len(lengths), failures, stale,
                          skipped, errors[:3], corrected)


# ---------------------------------------------------------------------------------------------- run


def run(job: dict[str, Any], spec: RLJobSpec, stop: StopFlag) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist

    denv = kdist.DistEnv.from_env()
    check_spec(spec, denv.world_size)
    a = spec.algorithm
    choice = kdist.choose(spec.parallelism.strategy, spec.parallelism.precision, torch.cuda.is_available())
    device = kdist.init(choice, denv)
    if choice.device_type != "cpu":
        log.warning("the colocated learner samples on %s with the training copy of the weights", device)
    workdir = workdir_for(job, denv)
    workdir.mkdir(parents=True, exist_ok=True)
    client = make_client(endpoint=spec.checkpoint.endpoint, max_pool_connections=64)
    store = CheckpointStore(spec.checkpoint.uri, client=client)
    reporter = Reporter(sink_from_env() if denv.is_main else None)

    mclient = scoped_client(contract.MODEL_CREDENTIALS_PREFIX, spec, client)  # type: ignore[arg-type]
    model, model_dir = load_model(spec, mclient, workdir, denv, a.seed)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(spec, mclient, workdir, denv, model_dir)  # type: ignore[arg-type]
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    if eos_id is None:
        raise InvalidSpec("neither the tokenizer nor the model config defines an EOS token", "spec.model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    reference = copy.deepcopy(model).eval().requires_grad_(False) if a.kl_coef > 0 else None
    if a.name == "ppo":
        ValueHead.attach(model)

    reward_dir: str | None = None
    if spec.reward.model is not None:
        if spec.reward.model.uri is None:
            raise InvalidSpec("reward.model.from was not resolved to a uri by the operator", "spec.reward.model")
        from ..pretrain import fetch_dir

        reward_dir = str(fetch_dir(mclient, spec.reward.model.uri, workdir / "reward-model", denv,
                                   "spec.reward.model.uri"))
    try:
        scorer = rewards.build_scorer(spec.reward, reward_dir, os.environ.get(JUDGE_URL_ENV))
    except (ValueError, ImportError, AttributeError, TypeError) as exc:
        raise InvalidSpec(f"cannot build the reward: {exc}", "spec.reward") from exc

    dclient = scoped_client(contract.DATA_CREDENTIALS_PREFIX, spec, client)  # type: ignore[arg-type]
    prompts = PromptSet(read_prompts(dclient, spec.data.uri, spec.data.text_field), spec.data.shuffle_seed)

    model = kdist.wrap(model, choice, device, denv)
    opt_spec = OptimizerSpec(lr=a.lr, weight_decay=0.0, warmup_steps=0, schedule="constant", beta2=0.999)
    optimizer = build_optimizer(model, opt_spec, choice.device_type)
    scheduler = build_scheduler(optimizer, opt_spec, a.steps)
    learner = Learner(spec, model, optimizer, scheduler, tokenizer, scorer, reference, denv, choice, int(eos_id),
                      int(pad_id), a.seed)

    if spec.rollout.placement == "disaggregated":
        learner.use_engines(os.environ[ROLLOUT_URLS_ENV])
    app = AppState(model, optimizer, scheduler)
    ckpt = Checkpointer(store, workdir, denv, choice, spec.checkpoint.keep,
                        meta={"job": (job.get("metadata") or {}).get("name"), "totalSteps": a.steps, "kind": "RLJob"})
    step, tokens = 0, 0
    curve: list[dict[str, Any]] = []
    totals: dict[str, Any] = {"failures": 0, "stale": 0}
    train = ckpt.restore(app)
    if train:
        step, tokens = int(train["step"]), int(train["tokens"])
        prompts.cursor = int(train["promptCursor"])
        learner.version = int(train["policyVersion"])
        curve = list(train.get("curve", []))
        totals.update(train.get("totals", {}))
        ranks = train.get("ranks", {})
        if str(denv.rank) in ranks and int(train.get("worldSize", 0)) == denv.world_size:
            set_rng_state(ranks[str(denv.rank)]["rng"])
            learner.generator.set_state(torch.tensor(ranks[str(denv.rank)]["sampler"], dtype=torch.uint8))
        log.info("resumed at step %d (policy version %d)", step, learner.version)
    else:
        torch.manual_seed(a.seed + denv.rank)

    last: dict[str, Any] = {}

    def progress(**kw: Any) -> Progress:
        rl = {"policyVersion": learner.version, "engineVersions": [learner.published] * len(learner.engines), "rewardCurve": curve[-CURVE_POINTS:],
              "rewardFailures": totals["failures"], "droppedStale": totals["stale"],
              "importanceCorrected": totals.get("corrected", 0),
              "initialReward": totals.get("initialReward"), **last.get("rl", {})}
        return Progress(step=step, total_steps=a.steps, tokens=tokens, loss=last.get("loss"),
                        tokens_per_second=last.get("tps"), last_checkpoint=ckpt.last_ref, time=now_rfc3339(),
                        reward=last.get("reward"), rl=rl, **kw)

    def checkpoint_now() -> None:
        mine = {"rng": rng_state(), "sampler": learner.generator.get_state().tolist()}
        gathered: list[Any] = [None] * denv.world_size
        tdist.all_gather_object(gathered, mine)
        app.train = {"step": step, "tokens": tokens, "policyVersion": learner.version,
                     "promptCursor": prompts.cursor, "curve": curve[-CURVE_POINTS:], "totals": totals,
                     "worldSize": denv.world_size, "ranks": {str(r): x for r, x in enumerate(gathered)}}
        ckpt.save(app, step, tokens)

    learner.sync_weights(force=True)  # the engines start from the (resumed) policy
    tdist.barrier()
    reporter.report(progress(), force=True)
    interval = spec.checkpoint.interval_steps
    try:
        while step < a.steps:
            t0 = time.monotonic()
            res = learner.step(prompts)
            step += 1
            if learner.sync_weights():
                tdist.barrier()  # no rank samples before the push is done
            n_tok = sum(1 for _ in res.rewards) * res.response_length
            tokens += int(n_tok * denv.world_size)
            r = torch.tensor(res.rewards or [0.0], dtype=torch.float64)
            flags = torch.tensor([float(r.sum()), float((r ** 2).sum()), float(len(res.rewards)), res.kl,
                                  res.response_length, float(res.failures), float(res.stale), res.loss,
                                  float(stop.set), float(ckpt.local_done()), float(res.corrected)],
                                 dtype=torch.float64)
            tdist.all_reduce(flags)
            n = max(1.0, float(flags[2]))
            mean = float(flags[0]) / n
            std = math.sqrt(max(0.0, float(flags[1]) / n - mean ** 2))
            totals["failures"] += int(flags[5])
            totals["stale"] += int(flags[6])
            totals["corrected"] = totals.get("corrected", 0) + int(flags[10])
            curve.append({"step": step, "reward": round(mean, 4)})
            if step == 1:
                totals["initialReward"] = round(mean, 4)
            dt = max(1e-9, time.monotonic() - t0)
            last.update(loss=float(flags[7]) / denv.world_size, reward=mean, tps=n_tok * denv.world_size / dt,
                        rl={"rewardStd": round(std, 4), "kl": round(float(flags[3]) / denv.world_size, 6),
                            "responseLength": round(float(flags[4]) / denv.world_size, 2)})
            if res.errors and denv.is_main:
                log.warning("reward failures at step %d: %s", step, "; ".join(res.errors))
            if ckpt.pending is not None and int(flags[9]) == denv.world_size:
                ckpt.finalize()
            reporter.report(progress(), force=step == 1 or step == a.steps)
            if denv.is_main and (step % 10 == 0 or step == 1):
                log.info("step %d/%d reward %.3f +- %.3f kl %.4f len %.1f (%.2fs)", step, a.steps, mean, std,
                         last["rl"]["kl"], last["rl"]["responseLength"], dt)
            if float(flags[8]) > 0:
                checkpoint_now()
                ckpt.wait()
                reporter.report(progress(), force=True)
                raise Preempted(f"stopped at step {step}")
            if step % interval == 0 and step < a.steps:
                checkpoint_now()
        ckpt.wait()
        if ckpt.last_step != step:
            checkpoint_now()
            ckpt.wait()
        base = kdist.unwrap(model)
        if hasattr(base, "kf_value_head"):
            del base.kf_value_head  # the exported policy is a plain causal LM
        from .. import provenance as prov
        from ..pretrain import export

        rw = spec.reward
        reward_kind = (f"verifiable:{rw.verifiable.check or rw.verifiable.entrypoint}" if rw.verifiable is not None
                       else "model" if rw.model is not None else "judge")
        provenance = prov.record(
            job, source_uri=spec.model.uri, source_dir=model_dir, data=[spec.data.uri], steps=step, tokens=tokens,
            metrics={"reward": last.get("reward"), "initialReward": totals.get("initialReward"),
                     "policyVersion": learner.version},
            evals={"rewardCurve": curve[-CURVE_POINTS:], "algorithm": a.name, "reward": reward_kind})
        output_uri = export(model, tokenizer, store, workdir, denv, provenance)
        result = {"outputUri": output_uri, "step": step, "reward": last.get("reward"), "policyVersion": learner.version}
        if denv.is_main:
            write_termination_message(result)
            reporter.report(progress(output_uri=output_uri), force=True)
            if learner.broadcaster is not None:
                learner.broadcaster.close()
            for e in learner.engines:
                e.shutdown()
        tdist.barrier()
        return result
    finally:
        reporter.close(timeout=3.0)


def main(argv: list[str] | None = None) -> int:
    from ..pretrain import _shutdown

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    stop = StopFlag()
    stop.install()
    code = contract.EXIT_OK
    try:
        job, spec = load_job(argv[0] if argv else None)
        run(job, spec, stop)
    except InvalidSpec as exc:
        log.error("invalid spec: %s", exc)
        write_termination_message({"reason": "InvalidSpec", "message": str(exc), "field": exc.field})
        code = contract.EXIT_INVALID_SPEC
    except Preempted as exc:
        log.warning("%s; exiting with %d", exc, contract.EXIT_PREEMPTED)
        if rank == "0":
            write_termination_message({"reason": "Preempted", "message": str(exc)})
        code = contract.EXIT_PREEMPTED
    except BaseException as exc:  # noqa: BLE001 - a crash: the gang is restarted and resumes
        log.exception("RL training failed: %s", exc)
        write_termination_message({"reason": "Error", "message": f"{type(exc).__name__}: {exc}"})
        logging.shutdown()
        os._exit(1)
    _shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
