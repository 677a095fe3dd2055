"""PretrainJob runtime: `torchrun ... -m kubeforge.runtime.pretrain` in every pod of the gang.

Reads the resolved job from $KUBEFORGE_SPEC_FILE, resumes by itself from the newest committed checkpoint
under spec.checkpoint.uri, trains, checkpoints every checkpoint.intervalSteps, and at the end exports the
model in Hugging Face format to <checkpoint.uri>/final/.

Exit codes (kubeforge.contract): 0 done; 78 the job cannot run as specified (reason in the termination
message: InvalidSpec; CheckpointsUnusable when checkpoint.uri holds checkpoints none of which loads;
Diverged on a non-finite loss with training.onDivergence Fail);
143 stopped by SIGTERM after writing a checkpoint. Any other failure exits non-zero and the operator
restarts the gang, which resumes from the newest committed checkpoint.

Environment beyond torchrun's: KUBEFORGE_SPEC_FILE, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL, KUBEFORGE_PROGRESS, KUBEFORGE_POD_NAME / KUBEFORGE_POD_NAMESPACE,
KUBEFORGE_TERMINATION_LOG, and optionally KUBEFORGE_WORKDIR (local scratch, default /tmp/kubeforge).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import contract
from ..api.kinds import PretrainJobSpec
from ..storage import CheckpointStore, StorageError, make_client
from ..storage import s3 as s3mod
from . import dist as kdist
from . import provenance as prov
from .checkpointing import AppState, Checkpointer, CheckpointsUnusable, rng_state, set_rng_state
from .data import PackedStream, Prefetcher, S3Objects
from .report import Progress, Reporter, now_rfc3339, sink_from_env, write_termination_message
from .training import InvalidSpec, TrainPlan, build_optimizer, build_scheduler, causal_lm_loss, plan

log = logging.getLogger("kubeforge.pretrain")

WORKDIR_ENV = "KUBEFORGE_WORKDIR"
MIN_REPORT_INTERVAL_S = 2.0  # progress reports (and log lines) at most this often, plus checkpoints and end


class Preempted(Exception):
    """SIGTERM: a checkpoint was written and the process should exit with EXIT_PREEMPTED."""


class Diverged(Exception):
    """The loss is not finite and training.onDivergence is Fail."""


def check_loss(loss: float, step: int, on_divergence: str) -> None:
    """Raise on a non-finite loss: Diverged (the job fails at once), or, with onDivergence Restart, an
    error the operator answers by restarting the gang from the newest checkpoint."""
    if math.isfinite(loss):
        return
    if on_divergence == "Fail":
        raise Diverged(f"loss is {loss} at step {step} (training.onDivergence: Fail)")
    raise FloatingPointError(f"loss is {loss} at step {step}; restarting from the newest checkpoint "
                             "(training.onDivergence: Restart)")


# What gloo and the TCPStore say when the process at the other end is gone (its machine died, it was killed)
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "got 0 bytes")


def peer_lost(exc: BaseException) -> bool:
    """A collective or the rendezvous store failed because another rank's process went away: the cause is
    elsewhere in the gang, not in this rank."""
    try:
        from torch.distributed import DistNetworkError

        if isinstance(exc, DistNetworkError):
            return True
    except ImportError:
        pass
    return any(m in str(exc) for m in PEER_LOST_MARKERS)


def exit_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The exit code and termination message for how the runtime ended (the operator reads both)."""
    if isinstance(exc, InvalidSpec):
        return contract.EXIT_INVALID_SPEC, {"reason": "InvalidSpec", "message": str(exc), "field": exc.field}
    if isinstance(exc, CheckpointsUnusable):  # restarting cannot help, and starting over would lose the run
        return contract.EXIT_INVALID_SPEC, {"reason": "CheckpointsUnusable", "message": str(exc),
                                            "field": "spec.checkpoint.uri"}
    if isinstance(exc, Diverged):  # the same checkpoint and data would diverge again
        return contract.EXIT_INVALID_SPEC, {"reason": "Diverged", "message": str(exc),
                                            "field": "spec.training.onDivergence"}
    if isinstance(exc, Preempted):
        return contract.EXIT_PREEMPTED, {"reason": "Preempted", "message": str(exc)}
    if peer_lost(exc):  # the operator waits to learn whether a node was lost before it counts a failure
        return 1, {"reason": contract.REASON_PEER_LOST, "message": f"{type(exc).__name__}: {exc}"}
    return 1, {"reason": "StorageError" if isinstance(exc, StorageError) else "Error",
               "message": f"{type(exc).__name__}: {exc}"}


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step, checkpoints and exits."""

    def __init__(self) -> None:
        self.set = False
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        if not self.set:
            log.warning("received %s: finishing the current step, then checkpointing",
                        signal.Signals(signum).name)
        self.set, self.signum = True, signum


# ---------------------------------------------------------------------------------------------- setup


def load_job_as(spec_model: Any, path: str | None = None) -> tuple[dict[str, Any], Any]:
    """The job object the operator mounted, its spec parsed as `spec_model`; InvalidSpec (exit 78, with the
    field path) when it cannot be read or parsed. Shared by every training runtime."""
    from pydantic import ValidationError

    path = path or os.environ.get(contract.ENV_SPEC_FILE) or os.path.join(contract.SPEC_MOUNT_DIR,
                                                                          contract.SPEC_FILE_NAME)
    try:
        job = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSpec(f"cannot read the job file {path}: {exc}") from exc
    if not isinstance(job, dict) or not isinstance(job.get("spec"), dict):
        raise InvalidSpec(f"{path} holds no job object with a spec")
    try:
        spec = spec_model.model_validate(job["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in ("spec", *first["loc"]))
        raise InvalidSpec(f"{first['msg']} ({exc.error_count()} errors)", loc) from exc
    return job, spec


def load_job(path: str | None = None) -> tuple[dict[str, Any], PretrainJobSpec]:
    return load_job_as(PretrainJobSpec, path)  # type: ignore[no-any-return]


def check_spec(spec: PretrainJobSpec, world_size: int) -> TrainPlan:
    """What the runtime can check before any process group or download."""
    if spec.model is None or spec.data is None or spec.training is None:
        raise InvalidSpec("the built-in trainer needs model, data and training (spec.entrypoint runs your own "
                          "script instead)", "spec")
    m = spec.model
    if sum(x is not None for x in (m.uri, m.config)) != 1:
        if m.from_ is not None and m.uri is None:
            raise InvalidSpec("model.from was not resolved to model.uri by the operator", "spec.model")
        raise InvalidSpec("exactly one of model.uri and model.config must be set", "spec.model")
    if m.config is not None:
        if "model_type" not in m.config:
            raise InvalidSpec("model.config needs a model_type (e.g. llama)", "spec.model.config")
        if m.tokenizer is None or (m.tokenizer.uri is None and m.tokenizer.builtin is None):
            raise InvalidSpec("a model built from config needs model.tokenizer (uri or builtin)",
                              "spec.model.tokenizer")
        max_pos = m.config.get("max_position_embeddings")
        if isinstance(max_pos, int) and spec.training.seq_len > max_pos:
            raise InvalidSpec(f"seqLen {spec.training.seq_len} exceeds the model's max_position_embeddings "
                              f"{max_pos}", "spec.training.seqLen")
    return plan(spec.training, world_size)


def workdir_for(job: dict[str, Any], denv: kdist.DistEnv) -> Path:
    meta = job.get("metadata") or {}
    ident = f"{meta.get('namespace', 'default')}-{meta.get('name', 'job')}-{str(meta.get('uid', ''))[:8]}"
    return Path(os.environ.get(WORKDIR_ENV) or "/tmp/kubeforge") / ident.strip("-") / f"node-{denv.node_rank}"


def fetch_dir(client: Any, uri: str, local: Path, denv: kdist.DistEnv, what: str) -> Path:
    """Local rank 0 of every node downloads an s3:// directory; the others wait at a barrier."""
    import torch.distributed as tdist

    ok: list[Any] = [None]
    if denv.local_rank == 0:
        try:
            names = s3mod.download_dir(client, uri, local)
            ok[0] = "" if names else f"nothing found under {uri}"
        except s3mod.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("NoSuchBucket", "AccessDenied", "403", "404"):
                ok[0] = f"cannot read {uri}: {code}"
            else:
                raise
    gathered: list[Any] = [None] * denv.world_size
    tdist.all_gather_object(gathered, ok[0])
    errors = [g for g in gathered if g]
    if errors:
        raise InvalidSpec(errors[0], what)
    return local


def scoped_client(prefix: str, spec: PretrainJobSpec, default: Any,
                  environ: Mapping[str, str] | None = None) -> Any:
    """The S3 client for what a secretRef other than checkpoint.secretRef reads (the model and tokenizer:
    contract.MODEL_CREDENTIALS_PREFIX; the data: DATA_CREDENTIALS_PREFIX): that Secret's keys, rendered
    under the prefix, else the checkpoint client. The endpoint is that Secret's AWS_ENDPOINT_URL, else the
    checkpoint store's."""
    environ = os.environ if environ is None else environ
    env = {k[len(prefix):]: v for k, v in environ.items() if k.startswith(prefix)}
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        return default
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or spec.checkpoint.endpoint \
        or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    return make_client(endpoint=endpoint, env=env, max_pool_connections=64)


def load_tokenizer(spec: PretrainJobSpec, client: Any, workdir: Path, denv: kdist.DistEnv,
                   model_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    from .tinymodel import BUILTIN_TOKENIZERS

    tok = spec.model.tokenizer
    if tok is not None and tok.builtin is not None:
        return BUILTIN_TOKENIZERS[tok.builtin]()
    if tok is not None and tok.uri:
        local = fetch_dir(client, tok.uri, workdir / "tokenizer", denv, "spec.model.tokenizer.uri")
        return AutoTokenizer.from_pretrained(str(local))
    if model_dir is not None:
        return AutoTokenizer.from_pretrained(str(model_dir))
    raise InvalidSpec("no tokenizer: set model.tokenizer", "spec.model.tokenizer")


def load_model(spec: PretrainJobSpec, client: Any, workdir: Path, denv: kdist.DistEnv,
               seed: int) -> tuple[Any, Path | None]:
    import torch
    from transformers import AutoModelForCausalLM

    from .tinymodel import build_model

    if spec.model.config is not None:
        try:
            return build_model(spec.model.config, seed=seed), None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidSpec(f"cannot build a causal LM from model.config: {exc}", "spec.model.config") from exc
    assert spec.model.uri is not None
    local = fetch_dir(client, spec.model.uri, workdir / "model", denv, "spec.model.uri")
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InvalidSpec(f"{spec.model.uri} is not a Hugging Face causal LM: {exc}", "spec.model.uri") from exc
    return model, local


def tokenizer_fn(tokenizer: Any) -> Any:
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return tokenize


# ---------------------------------------------------------------------------------------------- run


def run(job: dict[str, Any], spec: PretrainJobSpec, stop: StopFlag) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist

    denv = kdist.DistEnv.from_env()
    tplan = check_spec(spec, denv.world_size)
    choice = kdist.choose(spec.parallelism.strategy, spec.parallelism.precision, torch.cuda.is_available())
    if choice.note and denv.is_main:
        log.warning(choice.note)
    device = kdist.init(choice, denv)
    seed = spec.training.seed
    workdir = workdir_for(job, denv)
    workdir.mkdir(parents=True, exist_ok=True)
    client = make_client(endpoint=spec.checkpoint.endpoint, max_pool_connections=64)
    store = CheckpointStore(spec.checkpoint.uri, client=client)
    reporter = Reporter(sink_from_env() if denv.is_main else None)
    log.info("rank %d/%d on %s: %s, %s, %s; %d steps x %d tokens, grad accumulation %d", denv.rank,
             denv.world_size, device, choice.backend, choice.strategy, choice.precision, tplan.total_steps,
             tplan.tokens_per_step, tplan.grad_accum)

    # model and tokenizer
    mclient = scoped_client(contract.MODEL_CREDENTIALS_PREFIX, spec, client)
    model, model_dir = load_model(spec, mclient, workdir, denv, seed)
    tokenizer = load_tokenizer(spec, mclient, workdir, denv, model_dir)
    vocab = int(model.config.vocab_size)
    if len(tokenizer) > vocab:
        raise InvalidSpec(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}",
                          "spec.model")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    if eos_id is None:
        raise InvalidSpec("neither the tokenizer nor the model config defines an EOS token", "spec.model")
    log.info("model and tokenizer ready (%.1fM parameters)", sum(p.numel() for p in model.parameters()) / 1e6)
    model = kdist.wrap(model, choice, device, denv)
    optimizer = build_optimizer(model, spec.optimizer, choice.device_type)
    scheduler = build_scheduler(optimizer, spec.optimizer, tplan.total_steps)

    # data
    dclient = scoped_client(contract.DATA_CREDENTIALS_PREFIX, spec, client)
    stream = PackedStream(S3Objects(dclient, spec.data.uri), tokenizer_fn(tokenizer), int(eos_id),
                          tplan.seq_len, denv.rank, denv.world_size, spec.data.shuffle_seed, spec.data.format,
                          spec.data.text_field)

    # resume
    app = AppState(model, optimizer, scheduler)
    meta = job.get("metadata") or {}
    run_identity = {k: meta.get(k) for k in ("namespace", "name", "uid")}  # refuses another run's checkpoints
    ckpt = Checkpointer(store, workdir, denv, choice, spec.checkpoint.keep,
                        meta={"job": meta.get("name"), "run": run_identity, "totalSteps": tplan.total_steps})
    step, tokens, loss_value = 0, 0, None
    train = ckpt.restore(app)
    if train:
        step, tokens, loss_value = int(train["step"]), int(train["tokens"]), train.get("loss")
        ranks = {int(r): s for r, s in train.get("ranks", {}).items()}
        stream.load_gang_state({r: s["data"] for r, s in ranks.items()})
        if denv.rank in ranks and int(train.get("worldSize", 0)) == denv.world_size:
            set_rng_state(ranks[denv.rank]["rng"])
        if denv.is_main:
            log.info("resumed at step %d (%d tokens)", step, tokens)
    else:
        torch.manual_seed(seed + denv.rank)
    prefetch = Prefetcher(stream, tplan.micro_batch_size)

    last_tps: list[float | None] = [None]

    def progress(**kw: Any) -> Progress:
        kw.setdefault("tokens_per_second", last_tps[0])
        return Progress(step=step, total_steps=tplan.total_steps, tokens=tokens, loss=loss_value,
                        last_checkpoint=ckpt.last_ref, time=now_rfc3339(), **kw)

    def checkpoint_now() -> None:
        """Collective: capture every rank's data position and RNG, and start a checkpoint of `step`."""
        mine = {"data": prefetch.state_dict(), "rng": rng_state()}
        gathered: list[Any] = [None] * denv.world_size
        tdist.all_gather_object(gathered, mine)
        app.train = {"step": step, "tokens": tokens, "loss": loss_value, "worldSize": denv.world_size,
                     "ranks": {str(r): g for r, g in enumerate(gathered)}}
        ckpt.save(app, step, tokens)

    reporter.report(progress(), force=True)
    start_step = step
    interval = spec.checkpoint.interval_steps
    log_every = spec.training.log_interval_steps
    window_tokens, window_start = 0, time.monotonic()
    window_losses: list[float] = []
    model.train()
    try:
        while step < tplan.total_steps:
            loss_sum = torch.zeros((), device=device)
            for micro in range(tplan.grad_accum):
                batch = prefetch.next().to(device, non_blocking=True)
                with kdist.grad_sync(model, choice, sync=micro == tplan.grad_accum - 1), kdist.autocast(choice):
                    loss = causal_lm_loss(model, batch) / tplan.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if spec.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tplan.tokens_per_step
            window_tokens += tplan.tokens_per_step

            # the one per-step collective beyond training: mean loss, stop request, checkpoint uploads done
            flags = torch.stack([loss_sum.float(), torch.tensor(float(stop.set), device=device),
                                 torch.tensor(float(ckpt.local_done()), device=device)])
            tdist.all_reduce(flags)
            loss_value = float(flags[0]) / denv.world_size
            if not math.isfinite(loss_value):
                reporter.report(progress(), force=True)  # loss null + lossNonFinite: the status shows it
                check_loss(loss_value, step, spec.training.on_divergence)
            window_losses.append(loss_value)
            stopping = flags[1].item() > 0
            if ckpt.pending is not None and int(flags[2].item()) == denv.world_size:
                ckpt.finalize()
                reporter.report(progress(), force=True)

            if step % log_every == 0 or step == tplan.total_steps:
                now = time.monotonic()
                first_step = step == start_step + 1  # report at once that training (re)started
                if now - window_start >= MIN_REPORT_INTERVAL_S or step == tplan.total_steps or first_step:
                    last_tps[0] = window_tokens / max(1e-9, now - window_start)
                    p = progress()
                    p.loss = sum(window_losses) / len(window_losses)
                    reporter.report(p, force=True)
                    if denv.is_main:
                        log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", step, tplan.total_steps, p.loss,
                                 scheduler.get_last_lr()[0], last_tps[0])
                    window_tokens, window_start, window_losses = 0, now, []
            if stopping:
                checkpoint_now()
                ckpt.wait()
                reporter.report(progress(), force=True)
                raise Preempted(f"stopped at step {step}")
            if step % interval == 0 and step < tplan.total_steps:
                checkpoint_now()

        # done: a final checkpoint (so a failed export never retrains), then the Hugging Face export
        ckpt.wait()
        if ckpt.last_step != step:
            checkpoint_now()
            ckpt.wait()
        provenance = prov.record(job, source_uri=spec.model.uri, source_dir=model_dir, data=[spec.data.uri],
                                 steps=step, tokens=tokens, metrics={"loss": loss_value})
        output_uri = export(model, tokenizer, store, workdir, denv, provenance)
        result = {"outputUri": output_uri, "step": step, "tokens": tokens, "loss": loss_value}
        if denv.is_main:
            write_termination_message(result)
            reporter.report(progress(output_uri=output_uri), force=True)
        tdist.barrier()
        return result
    finally:
        prefetch.close()
        reporter.close(timeout=3.0)


def export(model: Any, tokenizer: Any, store: CheckpointStore, workdir: Path, denv: kdist.DistEnv,
           provenance: dict[str, Any] | None = None) -> str:
    """Collective: gather the full model to rank 0 and upload it as a Hugging Face directory to final/, with
    `provenance` (runtime/provenance.py) as its kubeforge-provenance.json."""
    import shutil

    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    uri: list[Any] = [None]
    if denv.is_main:
        out = workdir / "final"
        shutil.rmtree(out, ignore_errors=True)
        kdist.unwrap(model).save_pretrained(str(out), state_dict=full)
        tokenizer.save_pretrained(str(out))
        if provenance is not None:
            prov.write(out, {**provenance, "output": str(store.final_uri)})
        uri[0] = store.upload_final(out)
        log.info("exported the model to %s", uri[0])
    tdist.broadcast_object_list(uri, src=0)
    return str(uri[0])


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    stop = StopFlag()
    stop.install()
    code = contract.EXIT_OK
    try:
        job, spec = load_job(argv[0] if argv else None)
        run(job, spec, stop)
    except (InvalidSpec, CheckpointsUnusable, Diverged) as exc:
        code, payload = exit_for(exc)
        log.error("%s: %s", payload["reason"], exc)
        write_termination_message(payload)
    except Preempted as exc:
        code, payload = exit_for(exc)
        log.warning("%s; exiting with %d", exc, code)
        if rank == "0":
            write_termination_message(payload)
    except BaseException as exc:  # noqa: BLE001 - a crash: the gang is restarted and resumes
        log.exception("training failed: %s", exc)
        write_termination_message(exit_for(exc)[1])
        # leave at once: a graceful teardown can block on peers that are already gone (a dead rank's
        # collectives), and torchrun tears the gang down anyway
        logging.shutdown()
        os._exit(1)
    _shutdown()
    return code


def _shutdown() -> None:
    try:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - exiting anyway
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
