"""Restore of a training gang's checkpoints: real torch.distributed.checkpoint on CPU in a one-process gloo
group, against the real S3 server. A corrupt checkpoint is rejected (and no longer counted), an older one is
loaded, and when none can be loaded, or the checkpoints belong to another run, restore refuses instead of
silently starting from step 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeforge.runtime.checkpointing import AppState, Checkpointer, CheckpointsUnusable
from kubeforge.runtime.dist import Choice, DistEnv
from kubeforge.runtime.training import InvalidSpec
from kubeforge.storage import CheckpointStore, StorageError, make_client

CPU = Choice(device_type="cpu", backend="gloo", strategy="ddp", precision="fp32")
ONE = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0)


@pytest.fixture
def gloo() -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _app(seed: int = 0) -> AppState:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return AppState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def _checkpointer(store: CheckpointStore, tmp: Path, run_uid: str = "uid-a") -> Checkpointer:
    return Checkpointer(store, tmp, ONE, CPU, keep=10, async_save=False,
                        meta={"run": {"namespace": "ns", "name": "job", "uid": run_uid}})


def _save(store: CheckpointStore, tmp: Path, steps: list[int]) -> None:
    ck = _checkpointer(store, tmp / "save")
    app = _app()
    for step in steps:
        app.train = {"step": step}
        ck.save(app, step, tokens=step)
        ck.wait()


def _corrupt(store: CheckpointStore, step: int) -> None:
    ckpt = next(c for c in store.committed_checkpoints() if c.step == step)
    shard = max(ckpt.files, key=lambda f: f.size)  # same size, other bytes: only sha256 can tell
    key = store.step_uri(step).join(shard.path).key
    store.client.put_object(Bucket=store.root.bucket, Key=key, Body=os.urandom(shard.size))


@pytest.fixture
def store(s3_env: dict[str, str], bucket: str) -> CheckpointStore:
    return CheckpointStore(f"s3://{bucket}/run", client=make_client(env=s3_env))


def test_a_corrupt_checkpoint_is_rejected_and_an_older_one_loaded(gloo: None, store: CheckpointStore,
                                                                 tmp_path: Path) -> None:
    _save(store, tmp_path, [1, 2, 3])
    _corrupt(store, 3)
    train = _checkpointer(store, tmp_path / "r").restore(_app(seed=1))
    assert train is not None and train["step"] == 2
    assert [c.step for c in store.committed_checkpoints()] == [1, 2] and store.rejected_steps() == [3]


def test_restore_never_starts_over_when_no_checkpoint_loads(gloo: None, store: CheckpointStore,
                                                           tmp_path: Path) -> None:
    _save(store, tmp_path, [1, 2, 3, 4])
    for step in (1, 2, 3, 4):
        _corrupt(store, step)
    with pytest.raises(CheckpointsUnusable, match="step 0"):
        _checkpointer(store, tmp_path / "r").restore(_app())
    # and on the next attempt too, although nothing is committed any more
    with pytest.raises(CheckpointsUnusable):
        _checkpointer(store, tmp_path / "r2").restore(_app())


def test_restore_refuses_another_runs_checkpoints(gloo: None, store: CheckpointStore, tmp_path: Path) -> None:
    _save(store, tmp_path, [5])
    assert store.latest_committed_checkpoint().meta["run"]["uid"] == "uid-a"  # type: ignore[union-attr]
    with pytest.raises(InvalidSpec, match="another run") as exc:
        _checkpointer(store, tmp_path / "r", run_uid="uid-b").restore(_app())
    assert exc.value.field == "spec.checkpoint.uri"
    train: Any = _checkpointer(store, tmp_path / "r2").restore(_app())
    assert train["step"] == 5


class Deny:
    """botocore before-send hook: the store answers the first `n` PutObjects with 403 AccessDenied (a
    permission revoked, a bucket policy), which no retry fixes. Faults are injected, never mocked calls."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        if self.left <= 0:
            return None
        self.left -= 1

        class Body:
            def stream(self, **_: Any) -> Any:
                yield b"<Error><Code>AccessDenied</Code><Message>injected</Message></Error>"

        return AWSResponse(request.url, 403, {"Content-Type": "application/xml"}, Body())


def test_a_failed_upload_skips_that_checkpoint_and_training_goes_on(gloo: None, store: CheckpointStore,
                                                                   tmp_path: Path) -> None:
    ck = _checkpointer(store, tmp_path / "s")
    app = _app()
    deny = Deny(1)
    store.client.meta.events.register("before-send.s3.PutObject", deny)
    app.train = {"step": 1}
    ck.save(app, 1, tokens=1)
    assert ck.wait() is None and deny.left == 0  # skipped, not raised: the gang keeps training
    app.train = {"step": 2}
    ck.save(app, 2, tokens=2)
    assert ck.wait().step == 2  # type: ignore[union-attr]
    assert [c.step for c in store.committed_checkpoints()] == [2] and ck.last_step == 2
    # storage that stays broken is not ignored forever
    store.client.meta.events.register("before-send.s3.PutObject", Deny(10_000))
    with pytest.raises(StorageError, match="in a row"):
        for step in range(3, 3 + Checkpointer.MAX_FAILED_IN_A_ROW):
            app.train = {"step": step}
            ck.save(app, step, tokens=step)
            ck.wait()
