"""A few lines that give your own training script kubeforge's progress, checkpoints and resume.

For scripts run with `spec.entrypoint` on a PretrainJob (or `torchx run -s kubeforge`). torchrun starts the
script in every pod with the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables; this module adds:

    from kubeforge.runtime import sdk

    run = sdk.Run(total_steps=1000)            # reads KUBEFORGE_CHECKPOINT_URI and the S3 credentials' env
    restored = run.restore()                   # newest committed checkpoint, downloaded and verified, or None
    if restored:
        state = torch.load(restored.path / "state.pt"); model.load_state_dict(state["model"])
        start = restored.step
    for step in range(start, 1000):
        loss = train_one_step()
        run.report(step + 1, loss=loss.item(), tokens=(step + 1) * tokens_per_step)
        stop = run.should_stop()                 # collective: did any rank get SIGTERM (suspend, eviction)?
        if (step + 1) % 100 == 0 or stop:
            with run.checkpoint(step + 1) as d:   # rank 0 writes files into d; on exit they are committed
                torch.save({"model": model.state_dict()}, d / "state.pt")
            if stop:
                run.exit_preempted()             # exit 143 after the checkpoint: no restart budget spent
    run.finish()

Checkpoints use the same store as kubeforge's own trainer: files under <uri>/step-NNNNNNNN/, then
manifest.json written last as the commit point, then the `latest` hint. `restore()` never loads a step
without a manifest, and verifies every file's sha256. Progress goes to the operator exactly as the built-in
trainer's does (an annotation on rank 0's own pod), so `kubectl get ptj` shows step, loss and percent, and
progressDeadlineSeconds detects a hang from the step reports.

A script that does not use this module still runs; the operator then knows only that its processes are
alive and using CPU (a heartbeat from rank 0's launcher), so a hang that still burns CPU is not detected.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..storage import CheckpointStore, CorruptCheckpoint, StorageError, make_client
from .report import Progress, Reporter, now_rfc3339, sink_from_env, write_termination_message

log = logging.getLogger("kubeforge.sdk")

__all__ = ["Restored", "Run"]


@dataclass(frozen=True)
class Restored:
    """A committed checkpoint downloaded to a local directory."""

    step: int
    path: Path
    tokens: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _distributed() -> Any:
    """torch.distributed when a process group is up, else None (single process, or torch not installed)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


class Run:
    """This process's view of the job: rank, checkpoint store, progress reporter and stop flag."""

    def __init__(
        self,
        total_steps: int | None = None,
        checkpoint_uri: str | None = None,
        keep: int = 3,
        handle_sigterm: bool = True,
        env: Mapping[str, str] | None = None,
        store: CheckpointStore | None = None,
    ) -> None:
        """`handle_sigterm`: on SIGTERM set `stop_requested` instead of dying, so the loop can checkpoint
        (the pod's grace period bounds how long it may take); turn it off if your script handles SIGTERM."""
        env = os.environ if env is None else env
        self.env = env
        self.rank = int(env.get("RANK", "0"))
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.total_steps = total_steps
        self.keep = keep
        uri = checkpoint_uri or env.get(contract.ENV_CHECKPOINT_URI)
        self.store = store or (CheckpointStore(uri, client=make_client(env=env)) if uri else None)
        self.reporter = Reporter(sink_from_env(env) if self.rank == 0 else None)
        self.stop_requested = False
        self.last_checkpoint: dict[str, Any] | None = None
        self._step, self._tokens, self._loss = 0, 0, None
        self._workdir = Path(tempfile.mkdtemp(prefix=f"kubeforge-sdk-rank{self.rank}-"))
        if handle_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        if not self.stop_requested:
            log.warning("rank %d: %s received; stop_requested is set", self.rank, signal.Signals(signum).name)
        self.stop_requested = True

    def should_stop(self) -> bool:
        """Collective (call it on every rank at the same point of each step): True when any rank got SIGTERM,
        so all ranks checkpoint together and leave; with no process group, the local flag."""
        dist = _distributed()
        if dist is None:
            return self.stop_requested
        import torch

        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flag.item() > 0)
        return self.stop_requested

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def resume_step_hint(self) -> int | None:
        """The last committed step the operator knew of when it started this gang (the store is the truth)."""
        raw = self.env.get(contract.ENV_RESUME_STEP)
        return int(raw) if raw and raw.isdigit() else None

    def _need_store(self) -> CheckpointStore:
        if self.store is None:
            raise StorageError(f"no checkpoint store: {contract.ENV_CHECKPOINT_URI} is not set")
        return self.store

    # ------------------------------------------------------------------------------------------ progress
    def report(self, step: int, loss: float | None = None, tokens: int | None = None,
               tokens_per_second: float | None = None, force: bool = False) -> None:
        """Progress after `step` optimizer steps (rank 0 sends it, at most every 2 s unless forced)."""
        first = self._step == 0 or step <= self._step  # the first report of a (re)started gang goes at once
        self._step, self._loss = step, loss
        if tokens is not None:
            self._tokens = tokens
        self.reporter.report(self._progress(tokens_per_second=tokens_per_second), force=force or first)

    def _progress(self, **kw: Any) -> Progress:
        return Progress(step=self._step, total_steps=self.total_steps, tokens=self._tokens,  # type: ignore[arg-type]
                        loss=self._loss, last_checkpoint=self.last_checkpoint, time=now_rfc3339(), **kw)

    # ------------------------------------------------------------------------------------------ checkpoints
    @contextmanager
    def checkpoint(self, step: int, tokens: int | None = None, sharded: bool = False,
                   meta: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield an empty local directory; on a clean exit its files become committed checkpoint `step`.

        Default: only rank 0's files are kept (replicated state, as with DDP); other ranks may write nothing.
        `sharded=True`: every rank writes its own files (names must differ between ranks), every rank
        uploads its own, and rank 0 commits once all are up. With a process group, every rank must call it.
        """
        local = self._workdir / f"step-{step}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        try:
            yield local
            self._commit(step, local, tokens if tokens is not None else self._tokens or None, sharded, meta)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def _commit(self, step: int, local: Path, tokens: int | None, sharded: bool,
                meta: dict[str, Any] | None) -> None:
        store, dist = self._need_store(), _distributed()
        entries: list[Any] = []
        error: str | None = None
        if sharded or self.is_main:
            try:
                entries = [e.to_json() for e in store.upload_files(local, step)]
            except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        if dist is not None:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, (entries, error))
        else:
            gathered = [(entries, error)]
        errors = [e for _, e in gathered if e]
        if errors:
            raise StorageError(f"checkpoint {step} upload failed: {errors[0]}")
        ref: list[Any] = [None]
        if self.is_main:
            from ..storage.checkpoint import FileEntry

            files = [FileEntry(e["path"], e["size"], e["sha256"]) for es, _ in gathered for e in es]
            ckpt = store.commit(step, files, tokens=tokens, meta=dict(meta or {}, worldSize=self.world_size))
            try:
                store.apply_retention(self.keep)
            except Exception as exc:  # noqa: BLE001 - housekeeping; the commit stands
                log.warning("retention failed: %s", exc)
            ref[0] = {"uri": ckpt.uri, "step": ckpt.step, "time": ckpt.time}
            log.info("checkpoint %s committed (%d files)", ckpt.uri, len(files))
        if dist is not None:
            dist.broadcast_object_list(ref, src=0)
        self.last_checkpoint = ref[0]
        if self.is_main:
            self.reporter.report(self._progress(), force=True)

    def latest_step(self) -> int | None:
        """The newest committed step under the checkpoint URI (manifests decide, not the `latest` hint)."""
        ckpt = self._need_store().latest_committed_checkpoint()
        return ckpt.step if ckpt else None

    def restore(self, dest: str | Path | None = None) -> Restored | None:
        """Download the newest committed checkpoint (sha256-verified; a corrupt one falls back to the next
        older) into `dest` (a fresh temporary directory by default). None when there is none yet.
        Every rank that calls it downloads its own copy."""
        store = self._need_store()
        for ckpt in reversed(store.committed_checkpoints()):
            local = Path(dest) if dest is not None else self._workdir / f"restore-{ckpt.step}"
            shutil.rmtree(local, ignore_errors=True)
            try:
                store.download(ckpt, local)
            except (CorruptCheckpoint, StorageError) as exc:
                log.warning("checkpoint step %d unusable (%s); trying an older one", ckpt.step, exc)
                continue
            self.last_checkpoint = {"uri": ckpt.uri, "step": ckpt.step, "time": ckpt.time}
            self._step = ckpt.step
            self._tokens = ckpt.tokens or 0
            log.info("rank %d: restored checkpoint step %d", self.rank, ckpt.step)
            return Restored(ckpt.step, local, ckpt.tokens, ckpt.meta)
        return None

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, output_uri: str | None = None) -> None:
        """Rank 0: the final report and the result the operator records (output.uri when given)."""
        if self.is_main:
            result: dict[str, Any] = {"step": self._step, "tokens": self._tokens, "loss": self._loss}
            if output_uri:
                result["outputUri"] = output_uri
            write_termination_message(result, self.env)
            self.reporter.report(self._progress(output_uri=output_uri), force=True)
        self.close()

    def close(self) -> None:
        self.reporter.close(timeout=5.0)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def exit_preempted(self) -> None:
        """Leave after a requested stop, with the exit code that tells the operator it was no failure."""
        if self.is_main:
            write_termination_message({"reason": "Preempted", "message": f"stopped at step {self._step}"},
                                      self.env)
        self.close()
        sys.exit(contract.EXIT_PREEMPTED)
