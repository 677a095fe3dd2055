"""ContextExtensionJob runtime: `torchrun ... -m kubeforge.runtime.extend` in every pod of the gang.

The PretrainJob runtime's machinery (process group, DCP checkpoints with the manifest-last commit, resume,
progress reports, termination message, Hugging Face export) runs every stage, one after another in this
process:

    for each stage: RoPE for its length into the config -> model built from it (weights from the source
    model, or carried from the previous stage) -> train `steps` on sequences of `seqLen`, each sequence
    split over a sequence-parallel group -> evals -> checkpoint committed (a stage boundary is a commit)

Steps are numbered over the whole job (stage 2 continues where stage 1 ended), so the newest committed
checkpoint says in which stage and at which step a restarted gang resumes. A checkpoint at a stage's last
step carries its evals; resuming from it starts the next stage with fresh optimizer state and data.

Exit codes as the PretrainJob runtime's (kubeforge.contract).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import contract
from ...api.kinds import ContextExtensionJobSpec
from ...storage import CheckpointStore, make_client
from ...storage import s3 as s3mod
from .. import dist as kdist
from .. import pretrain
from .. import provenance as prov
from ..checkpointing import AppState, Checkpointer, rng_state, set_rng_state
from ..data import PackedStream, Prefetcher, S3Objects
from ..report import Progress, Reporter, now_rfc3339, sink_from_env, write_termination_message
from ..training import InvalidSpec, build_optimizer, build_scheduler
from . import attention as sp
from . import evals as ev
from . import rope
from .sequence import Mesh, build_mesh, forward_backward

log = logging.getLogger("kubeforge.extend")

EVAL_SEQUENCES = 2  # held-back sequences per perplexity length


@dataclass(frozen=True)
class StagePlan:
    """One stage's arithmetic over the whole job."""

    index: int
    seq_len: int
    steps: int
    start_step: int  # global step before the stage's first step
    lr: float
    rope: dict[str, Any]
    sequences_per_step: int  # over the whole gang
    grad_accum: int  # sequences per data-parallel replica per step

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def record(self) -> dict[str, Any]:
        """The stage as status.stages[] shows it before it runs."""
        r: dict[str, Any] = {"index": self.index, "seqLen": self.seq_len, "steps": self.steps,
                             "stepsDone": 0, "state": "Pending",
                             "ropeTheta": round(float(self.rope["rope_theta"]), 1)}
        if self.rope.get("rope_type", "default") != "default":
            r["ropeScaling"] = {k: v for k, v in self.rope.items() if k != "rope_theta"}
        return r


def plan_stages(spec: ContextExtensionJobSpec, base: rope.BaseRope, world_size: int) -> list[StagePlan]:
    """Every stage's plan; everything the spec can get wrong for this model and gang raises InvalidSpec."""
    degree = spec.sequence_parallel.degree
    if world_size % degree:
        raise InvalidSpec(f"degree {degree} does not divide the {world_size} processes of the gang",
                          "spec.sequenceParallel.degree")
    dp = world_size // degree
    plans, start, prev = [], 0, 0
    for i, st in enumerate(spec.stages):
        field = f"spec.stages[{i}]"
        if st.seq_len <= prev:
            raise InvalidSpec(f"seqLen {st.seq_len} does not grow over the previous stage's {prev}",
                              f"{field}.seqLen")
        prev = st.seq_len
        check_divisible(st.seq_len, spec.sequence_parallel.impl, degree, f"{field}.seqLen")
        if st.batch_tokens % st.seq_len:
            raise InvalidSpec(f"batchTokens {st.batch_tokens} is not a multiple of seqLen {st.seq_len}",
                              f"{field}.batchTokens")
        seqs = st.batch_tokens // st.seq_len
        if seqs % dp:
            raise InvalidSpec(f"{seqs} sequences per step do not split over {dp} data-parallel replicas "
                              f"({world_size} processes / degree {degree})", f"{field}.batchTokens")
        try:
            params = rope.stage_rope(base, spec.scaling.method, st.seq_len, st.rope_theta)
        except ValueError as exc:
            raise InvalidSpec(str(exc), f"{field}.ropeTheta") from exc
        reach = rope.longest_wavelength(params, base.head_dim)
        if spec.scaling.method in ("theta", "ntk") and reach < st.seq_len:
            raise InvalidSpec(f"RoPE θ {params['rope_theta']:.4g} turns its slowest pair every {reach:.0f} "
                              f"tokens, fewer than seqLen {st.seq_len}: positions would alias",
                              f"{field}.ropeTheta")
        plans.append(StagePlan(index=i, seq_len=st.seq_len, steps=st.steps, start_step=start, lr=st.lr,
                               rope=params, sequences_per_step=seqs, grad_accum=seqs // dp))
        start += st.steps
    return plans


def check_divisible(length: int, impl: str, degree: int, field: str) -> None:
    unit = 2 * degree if impl == "zigzag" else degree
    if length % unit:
        raise InvalidSpec(f"{length} is not a multiple of {unit} ({impl} over degree {degree})", field)


def check_heads(config: dict[str, Any], impl: str, degree: int) -> None:
    """Ulysses splits heads: what admission cannot know without the model config."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    if impl != "ulysses" or degree == 1:
        return
    if heads % degree:
        raise InvalidSpec(f"ulysses needs the model's {heads} attention heads divisible by degree {degree}",
                          "spec.sequenceParallel.degree")
    if kv % degree and degree % kv:
        raise InvalidSpec(f"ulysses needs the model's {kv} key/value heads and degree {degree} to divide one "
                          "another", "spec.sequenceParallel.degree")


def resume_point(step: int | None, stages: list[StagePlan]) -> tuple[int, bool]:
    """(stage index to run, whether it resumes inside that stage) for a committed global step."""
    if step is None or step == 0:
        return 0, False
    for st in stages:
        if st.start_step <= step < st.end_step:
            return st.index, step > st.start_step
    return len(stages) - 1, True  # every stage done: only the export is left


def carried_records(saved: list[dict[str, Any]] | None, planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage records of a checkpoint where they describe the same stages as the plan, the plan's elsewhere
    (a spec that gained stages after its first ones ran keeps their results)."""
    out = list(planned)
    for i, rec in enumerate(saved or []):
        if i < len(out) and rec.get("seqLen") == out[i]["seqLen"]:
            out[i] = rec
    return out


def load_job(path: str | None = None) -> tuple[dict[str, Any], ContextExtensionJobSpec]:
    from kubeforge.runtime.pretrain import load_job_as

    job, spec = load_job_as(ContextExtensionJobSpec, path)
    if spec.model.uri is None:
        raise InvalidSpec("model.uri (or model.from, resolved by the operator) is required", "spec.model")
    return job, spec


def build_stage_model(stage: StagePlan, source_cfg: dict[str, Any], model_dir: Path, previous: Any,
                      attn: str) -> Any:
    """The model of a stage: its RoPE in the config *before* the model exists (changing the config of a
    built model leaves inv_freq as it was), weights from the previous stage or the source model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = rope.apply_to_config(source_cfg, stage.rope, stage.seq_len)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",
                                                                               "transformers_version")})
    config.architectures = cfg.get("architectures")
    if previous is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32,
                                                     attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        model.load_state_dict(kdist.unwrap(previous).state_dict())
    return model


def run(job: dict[str, Any], spec: ContextExtensionJobSpec, stop: pretrain.StopFlag) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist

    denv = kdist.DistEnv.from_env()
    choice = kdist.choose("ddp", "auto", torch.cuda.is_available())
    device = kdist.init(choice, denv)
    sp.register()
    spc = spec.sequence_parallel
    mesh: Mesh = build_mesh(spc.impl, spc.degree)
    attn = sp.attn_implementation(spc.impl) if spc.degree > 1 else "sdpa"
    workdir = pretrain.workdir_for(job, denv)
    workdir.mkdir(parents=True, exist_ok=True)
    client = make_client(endpoint=spec.checkpoint.endpoint, max_pool_connections=64)
    store = CheckpointStore(spec.checkpoint.uri, client=client)
    reporter = Reporter(sink_from_env() if denv.is_main else None)

    mclient = pretrain.scoped_client(contract.MODEL_CREDENTIALS_PREFIX, spec, client)  # type: ignore[arg-type]
    model_dir = pretrain.fetch_dir(mclient, str(spec.model.uri), workdir / "model", denv, "spec.model.uri")
    try:
        source_cfg = json.loads((model_dir / "config.json").read_text())
        base = rope.BaseRope.from_config(source_cfg, spec.scaling.original_max_position_embeddings)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidSpec(f"{spec.model.uri}: {exc}", "spec.model.uri") from exc
    check_heads(source_cfg, spc.impl, spc.degree)
    stages = plan_stages(spec, base, denv.world_size)
    total_steps = stages[-1].end_step
    for length in [*spec.eval.perplexity_lengths, *spec.eval.needle.lengths]:
        check_divisible(length, spc.impl, spc.degree, "spec.eval")
    tokenizer = pretrain.load_tokenizer(spec, mclient, workdir, denv, model_dir)  # type: ignore[arg-type]
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else source_cfg.get("eos_token_id")
    if eos_id is None:
        raise InvalidSpec("neither the tokenizer nor the model config defines an EOS token", "spec.model")
    tokenize = pretrain.tokenizer_fn(tokenizer)
    dclient = pretrain.scoped_client(contract.DATA_CREDENTIALS_PREFIX, spec, client)  # type: ignore[arg-type]
    log.info("rank %d/%d: %d stages %s, %s degree %d (data parallel %d), θ/scaling %s", denv.rank,
             denv.world_size, len(stages), [s.seq_len for s in stages], spc.impl, spc.degree, mesh.dp_size,
             [s.rope for s in stages])

    # where to resume: the newest committed step says the stage
    peek: list[Any] = [None]
    if denv.is_main:
        latest = store.latest_committed_checkpoint()
        peek[0] = latest.step if latest else None
    tdist.broadcast_object_list(peek, src=0)
    first, inside = resume_point(peek[0], stages)
    records = [s.record() for s in stages]
    ckpt = Checkpointer(store, workdir, denv, choice, spec.checkpoint.keep,
                        meta={"job": (job.get("metadata") or {}).get("name"), "totalSteps": total_steps,
                              "kind": "ContextExtensionJob"})
    step, tokens, loss_value = 0, 0, None
    last_tps: list[float | None] = [None]
    model: Any = None

    def progress(stage: StagePlan, **kw: Any) -> Progress:
        kw.setdefault("tokens_per_second", last_tps[0])
        return Progress(step=step, total_steps=total_steps, tokens=tokens, loss=loss_value,
                        last_checkpoint=ckpt.last_ref, time=now_rfc3339(),
                        extra={"stage": stage.index + 1, "stageCount": len(stages), "seqLen": stage.seq_len,
                               "stages": records}, **kw)

    def checkpoint_now(stage: StagePlan, prefetch: Prefetcher, app: AppState) -> None:
        """Collective: every rank's data position and RNG, the stage records, and a checkpoint of `step`."""
        mine = {"data": prefetch.state_dict(), "rng": rng_state()}
        gathered: list[Any] = [None] * denv.world_size
        tdist.all_gather_object(gathered, mine)
        app.train = {"step": step, "tokens": tokens, "loss": loss_value, "worldSize": denv.world_size,
                     "stage": stage.index, "stages": records,
                     "ranks": {str(r): g for r, g in enumerate(gathered)}}
        ckpt.save(app, step, tokens)

    try:
        for stage in stages[first:]:
            model = build_stage_model(stage, source_cfg, model_dir, model, attn)
            model = kdist.wrap(model, choice, device, denv)
            opt_spec = spec.optimizer.model_copy(update={"lr": stage.lr})
            optimizer = build_optimizer(model, opt_spec, choice.device_type)
            scheduler = build_scheduler(optimizer, opt_spec, stage.steps)
            app = AppState(model, optimizer, scheduler)
            stream = PackedStream(S3Objects(dclient, spec.data.uri), tokenize, int(eos_id), stage.seq_len,
                                  mesh.dp_rank, mesh.dp_size, spec.data.shuffle_seed + stage.index,
                                  spec.data.format, spec.data.text_field)
            if stage.index == first and peek[0]:
                train = ckpt.restore(app)
                if train is None or int(train["step"]) != peek[0]:
                    raise RuntimeError(f"checkpoint step {peek[0]} could not be restored; restarting")
                step, tokens, loss_value = int(train["step"]), int(train["tokens"]), train.get("loss")
                records = carried_records(train.get("stages"), records)
                if inside:
                    ranks = {int(r): s for r, s in train.get("ranks", {}).items()}
                    stream.load_gang_state({r // spc.degree: s["data"] for r, s in ranks.items()
                                            if r % spc.degree == 0})
                    if denv.rank in ranks and int(train.get("worldSize", 0)) == denv.world_size:
                        set_rng_state(ranks[denv.rank]["rng"])
                else:  # a stage boundary: the weights carry over, the optimizer starts afresh
                    optimizer = build_optimizer(model, opt_spec, choice.device_type)
                    scheduler = build_scheduler(optimizer, opt_spec, stage.steps)
                    app = AppState(model, optimizer, scheduler)
                log.info("resumed at step %d, stage %d/%d", step, stage.index + 1, len(stages))
            else:
                torch.manual_seed(spec.data.shuffle_seed + stage.index * 1000 + denv.rank)
            if step >= stage.end_step:  # everything trained: straight to the export
                break
            prefetch = Prefetcher(stream, 1)

            rec = records[stage.index]
            rec.update(state="Running", stepsDone=step - stage.start_step)
            reporter.report(progress(stage), force=True)
            window_tokens, window_start, window_losses = 0, time.monotonic(), []
            model.train()
            try:
                while step < stage.end_step:
                    ce_sum = torch.zeros((), device=device)
                    for micro in range(stage.grad_accum):
                        batch = prefetch.next().to(device, non_blocking=True)
                        with kdist.grad_sync(model, choice, sync=micro == stage.grad_accum - 1):
                            ce_sum += forward_backward(model, batch, mesh, stage.tokens_per_step).float()
                    if spec.optimizer.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    tokens += stage.tokens_per_step
                    window_tokens += stage.tokens_per_step
                    flags = torch.stack([ce_sum, torch.tensor(float(stop.set), device=device),
                                         torch.tensor(float(ckpt.local_done()), device=device)])
                    tdist.all_reduce(flags)
                    loss_value = float(flags[0]) / stage.tokens_per_step  # every token of the step, gathered
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss is {loss_value} at step {step}")
                    window_losses.append(loss_value)
                    if ckpt.pending is not None and int(flags[2].item()) == denv.world_size:
                        ckpt.finalize()
                        reporter.report(progress(stage), force=True)  # the operator learns of the commit now
                    now = time.monotonic()
                    if now - window_start >= pretrain.MIN_REPORT_INTERVAL_S or step == stage.end_step \
                            or flags[1].item() > 0 or step == stage.start_step + 1:
                        last_tps[0] = window_tokens / max(1e-9, now - window_start)
                        rec.update(stepsDone=step - stage.start_step,
                                   loss=round(sum(window_losses) / len(window_losses), 6),
                                   tokensPerSecond=round(last_tps[0], 1))
                        reporter.report(progress(stage), force=True)
                        if denv.is_main:
                            log.info("stage %d/%d (%d) step %d/%d loss %.4f %.0f tokens/s", stage.index + 1,
                                     len(stages), stage.seq_len, step, total_steps, rec["loss"], last_tps[0])
                        window_tokens, window_start, window_losses = 0, now, []
                    if flags[1].item() > 0:
                        checkpoint_now(stage, prefetch, app)
                        ckpt.wait()
                        reporter.report(progress(stage), force=True)
                        raise pretrain.Preempted(f"stopped at step {step} in stage {stage.index + 1}")
                    if step % spec.checkpoint.interval_steps == 0 and step < stage.end_step:
                        checkpoint_now(stage, prefetch, app)
            finally:
                prefetch.close()

            # the stage's end: evals, then a commit that carries them (the boundary the next stage starts at)
            ckpt.wait()
            model.eval()
            rec["evals"] = run_evals(spec, stage, model, mesh, tokenizer, tokenize, int(eos_id), dclient,
                                     store, workdir, denv, device)
            rec.update(state="Succeeded", stepsDone=stage.steps)
            checkpoint_now(stage, prefetch, app)
            ckpt.wait()
            reporter.report(progress(stage), force=True)

        final_stage = stages[-1]
        hf = kdist.unwrap(model)
        hf.set_attn_implementation("sdpa")  # the exported config must not name our implementation
        stage_evals = [{"stage": r["index"] + 1, "seqLen": r["seqLen"], "ropeTheta": r.get("ropeTheta"),
                        **(r.get("evals") or {})} for r in records]
        provenance = prov.record(job, source_uri=spec.model.uri, source_dir=model_dir, data=[spec.data.uri],
                                 steps=step, tokens=tokens, metrics={"loss": loss_value},
                                 evals={"stages": stage_evals,
                                        "needleScore": stage_evals[-1].get("needleScore") if stage_evals else None})
        output_uri = pretrain.export(model, tokenizer, store, workdir, denv, provenance)
        if denv.is_main:
            upload_final_evals(store, records, workdir)
        result = {"outputUri": output_uri, "step": step, "tokens": tokens, "loss": loss_value,
                  "stages": [{k: r.get(k) for k in ("index", "seqLen", "state", "loss")} for r in records]}
        if denv.is_main:
            write_termination_message(result)
            reporter.report(progress(final_stage, output_uri=output_uri), force=True)
        tdist.barrier()
        return result
    finally:
        reporter.close(timeout=3.0)


def run_evals(spec: ContextExtensionJobSpec, stage: StagePlan, model: Any, mesh: Mesh, tokenizer: Any,
              tokenize: Any, eos_id: int, dclient: Any, store: CheckpointStore, workdir: Path,
              denv: kdist.DistEnv, device: Any) -> dict[str, Any]:
    """Perplexity and needle grid of a stage (collective); rank 0 uploads evals/stage-N/. Returns a summary."""
    e = spec.eval
    results: dict[str, Any] = {"stage": stage.index + 1, "seqLen": stage.seq_len}
    filler: list[int] = []
    if e.perplexity_lengths or e.needle.lengths:
        longest = max([*e.perplexity_lengths, *e.needle.lengths])
        held = PackedStream(S3Objects(dclient, spec.data.uri), tokenize, eos_id, longest, 0, 1,
                            spec.data.shuffle_seed + 7919, spec.data.format, spec.data.text_field)
        seqs = [held.next_sequence() for _ in range(EVAL_SEQUENCES)]
        filler = [t for t in seqs[0] if t != eos_id]
        if e.perplexity_lengths:
            results["perplexity"] = {str(L): round(ev.perplexity(model, mesh, [s[:L + 1] for s in seqs],
                                                                 device), 4) for L in e.perplexity_lengths}
    if e.needle.lengths:
        def encode(text: str) -> list[int]:
            return tokenize([text])[0]

        results["needle"] = ev.needle_grid(model, mesh, filler, encode, list(e.needle.lengths),
                                           list(e.needle.depths), device, seed=stage.index)
    if denv.is_main:
        out = workdir / "evals" / f"stage-{stage.index + 1}"
        names = ev.write_results(results, out, f"NIAH after stage {stage.index + 1} ({stage.seq_len} tokens)")
        s3mod.upload_files(store.client, out, store.root.join("evals", f"stage-{stage.index + 1}"), names)
    summary = {k: v for k, v in results.items() if k == "perplexity"}
    if "needle" in results:
        summary["needleScore"] = results["needle"]["score"]
    return summary


def upload_final_evals(store: CheckpointStore, records: list[dict[str, Any]], workdir: Path) -> None:
    """Provenance next to the exported model: every stage's θ/scaling, loss and evals (extension.json), and
    each stage's evals.json / niah.png copied from <checkpoint.uri>/evals/ to final/evals/ (server-side, so
    stages run by an earlier gang are included)."""
    out = workdir / "final-evals"
    out.mkdir(parents=True, exist_ok=True)
    (out / "extension.json").write_text(json.dumps({"stages": records}, indent=2))
    s3mod.upload_files(store.client, out, store.final_uri, ["extension.json"])
    evals = store.root.join("evals")
    for obj in s3mod.list_objects(store.client, evals):
        rel = obj["Key"][len(evals.prefix):].lstrip("/")
        dest = store.final_uri.join("evals", rel)
        store.client.copy_object(Bucket=dest.bucket, Key=dest.key,
                                 CopySource={"Bucket": evals.bucket, "Key": obj["Key"]})


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    stop = pretrain.StopFlag()
    stop.install()
    code = contract.EXIT_OK
    try:
        job, spec = load_job(argv[0] if argv else None)
        run(job, spec, stop)
    except InvalidSpec as exc:
        log.error("invalid spec: %s", exc)
        write_termination_message({"reason": "InvalidSpec", "message": str(exc), "field": exc.field})
        code = contract.EXIT_INVALID_SPEC
    except pretrain.Preempted as exc:
        log.warning("%s; exiting with %d", exc, contract.EXIT_PREEMPTED)
        if rank == "0":
            write_termination_message({"reason": "Preempted", "message": str(exc)})
        code = contract.EXIT_PREEMPTED
    except BaseException as exc:  # noqa: BLE001 - a crash: the gang is restarted and resumes
        log.exception("context extension failed: %s", exc)
        write_termination_message({"reason": "Error", "message": f"{type(exc).__name__}: {exc}"})
        logging.shutdown()
        os._exit(1)
    pretrain._shutdown()
    return code
