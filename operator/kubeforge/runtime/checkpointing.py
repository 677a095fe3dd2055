"""Sharded checkpoints of a training gang: torch.distributed.checkpoint (DCP) to a local dir, then S3.

Save (every rank, same step):
1. DCP writes model + optimizer + scheduler + train state (step, tokens, loss, every rank's data position
   and RNG) into <workdir>/step-N: one `__<rank>_<i>.distcp` per rank plus `.metadata` from the coordinator.
   On GPU `dcp.async_save` (over a gloo group, as the DCP recipe recommends) returns once the state is
   staged in CPU memory, and the file writes overlap training.
2. A background thread on each rank uploads the files that rank wrote (rank 0 also the coordinator's), so
   ranks on one machine may share the dir and ranks on separate nodes need no shared filesystem.
3. When every rank's upload is done (the training loop learns this from the one small all-reduce it does
   per step, see `local_done`), `finalize()` gathers the file entries and rank 0 writes the manifest: the
   commit point. Then retention. A checkpoint whose upload or commit failed on any rank is skipped (the
   gang trains on; the next interval tries again); MAX_FAILED_IN_A_ROW failures in a row stop the run.

Restore: rank 0 picks the newest committed checkpoint, each node's local rank 0 downloads it (sha256
verified; on a mismatch the step is rejected in the store and the next older one is tried), and `dcp.load`
reshards it into the current gang. Restore never silently starts from step 0 over existing work: when the
URI holds checkpoints (committed or rejected) and none loads it raises CheckpointsUnusable, and checkpoints
written by another run (a re-created job with the same URI: another uid in the manifest's meta.run) are
refused as an invalid spec.

The commit protocol around DCP is kubeforge's own; DCP does the (re)sharding, s3transfer moves the bytes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage import Checkpoint, CheckpointStore, CorruptCheckpoint, StorageError, step_name
from .dist import Choice, DistEnv

log = logging.getLogger(__name__)

ASYNC_ENV = "KUBEFORGE_ASYNC_CHECKPOINT"
SHARD_RE = re.compile(r"^__(\d+)_\d+\.distcp$")


class CheckpointsUnusable(StorageError):
    """The checkpoint URI holds checkpoints, but none can be loaded: starting from step 0 would silently
    throw the run's progress away (and retention would then delete the evidence), so the runtime stops."""


def owner_rank(name: str) -> int:
    """The rank that wrote a DCP file: `__<rank>_<n>.distcp` by that rank, everything else (`.metadata`) by
    the coordinator, rank 0."""
    m = SHARD_RE.match(name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def files_of_rank(local_dir: Path, rank: int) -> list[str]:
    return sorted(p.name for p in local_dir.iterdir() if p.is_file() and owner_rank(p.name) == rank)


class AppState:
    """A DCP Stateful: the whole training state under one key, so DCP flattens and reshards it."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        # the train state is a JSON string: DCP stores strings as opaque bytes, identical on every rank
        return {"model": msd, "optim": osd, "sched": self.scheduler.state_dict(),
                "train": json.dumps(self.train)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(sd["sched"])
        self.train = json.loads(sd["train"])


def rng_state() -> dict[str, str]:
    import torch

    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict[str, str]) -> None:
    import torch

    if "cpu" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cpu"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


@dataclass
class _Pending:
    step: int
    tokens: int
    local_dir: Path
    done: Future[list[dict[str, Any]]]


class Checkpointer:
    MAX_FAILED_IN_A_ROW = 3  # a failed upload or commit skips that checkpoint; this many in a row stop the run

    def __init__(
        self,
        store: CheckpointStore,
        workdir: Path,
        denv: DistEnv,
        choice: Choice,
        keep: int,
        meta: dict[str, Any] | None = None,
        async_save: bool | None = None,
    ) -> None:
        self.store = store
        # async by default on GPU; KUBEFORGE_ASYNC_CHECKPOINT=1/0 forces it either way (e.g. to test on CPU)
        env = os.environ.get(ASYNC_ENV)
        self.async_save = (choice.device_type == "cuda") if async_save is None and not env else \
            (async_save if async_save is not None else env == "1")
        self.workdir = Path(workdir)
        self.denv = denv
        self.choice = choice
        self.keep = keep
        self.meta = meta or {}
        self.pending: _Pending | None = None
        self.last: Checkpoint | None = None  # newest committed (rank 0 knows; others get step/uri too)
        self.last_step: int | None = None
        self.failed_in_a_row = 0
        self._pg: Any = None

    # ------------------------------------------------------------------------------------------ save
    def _process_group(self) -> Any:
        """Async saves run their collectives on a separate gloo group (DCP recipe): their background thread
        must not interleave collectives with training's on the default group. Sync saves use the default."""
        import torch.distributed as dist

        if self.async_save and self._pg is None:
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def save(self, app: AppState, step: int, tokens: int) -> None:
        """Start a checkpoint of `step` (collective). Waits for the previous one first."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        local = self.workdir / "checkpoints" / step_name(step)
        if self.denv.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        import torch.distributed as dist

        dist.barrier()
        local.mkdir(parents=True, exist_ok=True)
        state = {"app": app}
        result: Future[list[dict[str, Any]]] = Future()
        if self.async_save:
            resp = dcp.async_save(state, checkpoint_id=str(local), process_group=self._process_group())
            written: Any = getattr(resp, "upload_completion", resp)
        else:
            dcp.save(state, checkpoint_id=str(local))
            written = None
        threading.Thread(target=self._upload, args=(step, local, written, result), name=f"ckpt-upload-{step}",
                         daemon=True).start()
        self.pending = _Pending(step, tokens, local, result)
        if self.denv.rank == 0:
            log.info("checkpoint step %d: %s save to %s started", step, "async" if self.async_save else "sync",
                     local)

    def _upload(self, step: int, local: Path, written: Any, result: Future[list[dict[str, Any]]]) -> None:
        try:
            if written is not None:
                written.result()
            names = files_of_rank(local, self.denv.rank)
            entries = self.store.upload_files(local, step, names)
            for n in names:
                if self.denv.rank != 0:
                    (local / n).unlink(missing_ok=True)
            result.set_result([e.to_json() for e in entries])
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            result.set_exception(exc)

    def local_done(self) -> bool:
        """This rank has nothing in flight (or its upload finished); input to the per-step all-reduce."""
        return self.pending is None or self.pending.done.done()

    def finalize(self) -> Checkpoint | None:
        """Collective: gather every rank's uploaded files; rank 0 commits and applies retention."""
        import torch.distributed as dist

        p = self.pending
        if p is None:
            return None
        self.pending = None
        try:
            mine: Any = p.done.result()
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below
            mine = {"error": f"rank {self.denv.rank}: {type(exc).__name__}: {exc}"}
        gathered: list[Any] = [None] * self.denv.world_size
        dist.all_gather_object(gathered, mine)
        errors = [g["error"] for g in gathered if isinstance(g, dict)]
        committed: list[Any] = [None]
        if self.denv.rank == 0 and not errors:
            from ..storage.checkpoint import FileEntry

            try:
                entries = [FileEntry(e["path"], e["size"], e["sha256"]) for g in gathered for e in g]
                ckpt = self.store.commit(p.step, entries, tokens=p.tokens,
                                         meta=dict(self.meta, worldSize=self.denv.world_size))
                log.info("checkpoint %s committed (%d files, %.1f MB)", ckpt.uri, len(entries), ckpt.size / 1e6)
                committed[0] = {"uri": ckpt.uri, "step": ckpt.step, "time": ckpt.time}
                self.last = ckpt
            except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                committed[0] = {"error": f"commit: {type(exc).__name__}: {exc}"}
            if self.last is not None and committed[0] and "error" not in committed[0]:
                try:
                    deleted = self.store.apply_retention(self.keep)
                    if deleted:
                        log.info("retention: removed steps %s", deleted)
                except Exception as exc:  # noqa: BLE001 - retention is housekeeping; the commit stands
                    log.warning("retention failed: %s", exc)
        dist.broadcast_object_list(committed, src=0)
        if self.denv.local_rank == 0:
            shutil.rmtree(p.local_dir, ignore_errors=True)
        if errors or "error" in committed[0]:
            # one checkpoint lost is one interval of work at risk, not a reason to kill the whole gang;
            # storage that keeps failing is
            why = errors[0] if errors else committed[0]["error"]
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= self.MAX_FAILED_IN_A_ROW:
                raise StorageError(f"{self.failed_in_a_row} checkpoints in a row failed (step {p.step}: {why})")
            log.warning("checkpoint %d skipped: %s (%d in a row; training goes on)", p.step, why,
                        self.failed_in_a_row)
            return None
        self.failed_in_a_row = 0
        self.last_step = p.step
        self.last_ref = committed[0]
        return self.last

    def wait(self) -> Checkpoint | None:
        """Collective: block until the pending checkpoint (if any) is committed."""
        import torch.distributed as dist

        flag: list[Any] = [self.pending is not None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            return None
        if self.pending is not None:
            try:
                self.pending.done.exception()  # block until this rank's part is done
            except Exception:  # noqa: BLE001, S110 - surfaced in finalize
                pass
        return self.finalize()

    # ------------------------------------------------------------------------------------------ restore
    def _candidates(self) -> dict[str, Any]:
        """Rank 0: the committed steps to try, newest first, or the reason restore must not go on."""
        committed = self.store.committed_checkpoints()
        run = self.meta.get("run") or {}
        foreign = [c for c in committed if run.get("uid") and (c.meta.get("run") or {}).get("uid")
                   not in (None, run.get("uid"))]
        if foreign:
            other = foreign[-1].meta["run"]
            return {"invalid": f"{self.store.uri} holds checkpoints of another run ({other.get('namespace')}/"
                               f"{other.get('name')}, uid {other.get('uid')}); this job (uid {run.get('uid')}) "
                               "will not resume from them: give it its own checkpoint.uri or delete them"}
        rejected = self.store.rejected_steps()
        if not committed and rejected:
            return {"unusable": f"every checkpoint under {self.store.uri} was rejected (steps {rejected}); "
                                "refusing to start over from step 0"}
        return {"steps": [c.step for c in reversed(committed)]}

    def restore(self, app: AppState) -> dict[str, Any] | None:
        """Collective: load the newest loadable committed checkpoint into `app`; returns its train state, or
        None when the URI holds no checkpoint at all."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from .training import InvalidSpec

        plan: list[Any] = [None]
        if self.denv.rank == 0:
            plan[0] = self._candidates()
        dist.broadcast_object_list(plan, src=0)
        if "invalid" in plan[0]:
            raise InvalidSpec(plan[0]["invalid"], "spec.checkpoint.uri")
        if "unusable" in plan[0]:
            raise CheckpointsUnusable(plan[0]["unusable"])
        steps: list[int] = plan[0]["steps"]
        for step in steps:
            local = self.workdir / "restore" / step_name(step)
            # None: loaded; ("corrupt", why): the bytes do not match the manifest; ("error", why): anything
            # else (the store unreachable...), which a restart of the gang may cure
            outcome: Any = None
            if self.denv.local_rank == 0:
                shutil.rmtree(local, ignore_errors=True)
                try:
                    ckpt = self.store.download(step, local)
                    if self.denv.rank == 0:
                        self.last = ckpt
                except CorruptCheckpoint as exc:
                    outcome = ("corrupt", str(exc))
                except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                    outcome = ("error", f"{type(exc).__name__}: {exc}")
            gathered: list[Any] = [None] * self.denv.world_size
            dist.all_gather_object(gathered, outcome)
            errors = [g[1] for g in gathered if g is not None and g[0] == "error"]
            if errors:
                raise StorageError(f"restoring checkpoint step {step} failed: {errors[0]}")
            corrupt = [g[1] for g in gathered if g is not None]
            if corrupt:
                if self.denv.rank == 0:
                    self.store.reject(step, corrupt[0])
                log.warning("checkpoint step %d unusable (%s); trying an older one", step, corrupt[0])
                continue
            dcp.load({"app": app}, checkpoint_id=str(local))
            dist.barrier()
            if self.denv.local_rank == 0:
                shutil.rmtree(local, ignore_errors=True)
            self.last_step = step
            ref: list[Any] = [None]
            if self.denv.rank == 0 and self.last is not None:
                ref[0] = {"uri": self.last.uri, "step": self.last.step, "time": self.last.time}
            dist.broadcast_object_list(ref, src=0)
            self.last_ref = ref[0]
            log.info("resumed from checkpoint step %d", step)
            return app.train
        if steps:
            raise CheckpointsUnusable(f"none of the checkpoints under {self.store.uri} (steps {steps}) could be "
                                      "loaded; they were rejected. Refusing to start over from step 0")
        return None

    last_ref: dict[str, Any] | None = None
