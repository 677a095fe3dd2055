"""The checkpoint store against a real S3 server (moto over HTTP); faults are injected, never mocked calls."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from kubeforge.storage import CheckpointStore, CorruptCheckpoint, S3Uri, StorageError, make_client
from kubeforge.storage import s3 as s3mod
from kubeforge.storage.checkpoint import MANIFEST

MiB = 1 << 20


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _shards(tmp: Path, tag: str, n: int = 3) -> Path:
    return _write_tree(tmp / tag, {f"__{i}_0.distcp": os.urandom(1000 + i) for i in range(n)} | {
        ".metadata": b"meta-" + tag.encode(), "extra/notes.txt": b"hello"})


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


class FaultInjector:
    """botocore before-send hook: answers the first `n` matching requests with an error instead of sending
    them, so the real client's retry logic runs against the real server."""

    def __init__(self, n: int, ops: tuple[str, ...] = (), status: int = 503, code: str = "SlowDown") -> None:
        self.left = n
        self.ops = ops
        self.status = status
        self.code = code
        self.injected = 0
        self.lock = threading.Lock()

    def __call__(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        op = event_name.rsplit(".", 1)[-1]
        with self.lock:
            if self.ops and op not in self.ops or self.left <= 0:
                return None
            self.left -= 1
            self.injected += 1
        body = f"<Error><Code>{self.code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"}, _Body(body))


class WriteLog:
    """Records the order in which objects are completed on the server (PutObject/CompleteMultipartUpload)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def register(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build.s3", self.before)
        client.meta.events.register("after-call.s3", self.after)

    def before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["test_key"] = params.get("Key")

    def after(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        if model.name in ("PutObject", "CompleteMultipartUpload"):
            with self.lock:
                self.keys.append(context["test_key"])


def test_save_commits_manifest_last_and_downloads_verified(s3_env: dict[str, str], bucket: str,
                                                           tmp_path: Path) -> None:
    client = make_client(env=s3_env)
    log = WriteLog()
    log.register(client)
    store = CheckpointStore(f"s3://{bucket}/runs/a", client=client)
    src = _shards(tmp_path, "s100")
    ckpt = store.save_dir(src, 100, meta={"tokens": 4096, "world": 2})

    assert ckpt.step == 100 and ckpt.tokens == 4096 and ckpt.meta == {"world": 2}
    step_keys = [k for k in log.keys if "/step-00000100/" in k]
    assert step_keys[-1].endswith("/step-00000100/" + MANIFEST)  # the commit point is the last write
    assert len(step_keys) == 6 and log.keys[-1] == "runs/a/latest"
    assert store.latest_hint() == 100

    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/a/step-00000100/manifest.json")["Body"].read())
    assert {f["path"] for f in manifest["files"]} == {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp",
                                                        ".metadata", "extra/notes.txt"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"]) and manifest["time"].endswith("Z")

    latest = store.latest_committed_checkpoint()
    assert latest is not None and latest.step == 100 and latest.uri == f"s3://{bucket}/runs/a/step-00000100"
    out = tmp_path / "restore"
    store.download(latest, out)
    for f in latest.files:
        assert (out / f.path).read_bytes() == (src / f.path).read_bytes()


def test_uncommitted_and_short_steps_are_skipped(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    assert store.latest_committed_checkpoint() is None
    store.save_dir(_shards(tmp_path, "a"), 100)
    # step 200: shards uploaded, crash before the manifest
    store.upload_files(_shards(tmp_path, "b"), 200)
    # step 300: committed, then one shard replaced by a short one (lost/partial object)
    store.save_dir(_shards(tmp_path, "c"), 300)
    store.client.put_object(Bucket=bucket, Key="ck/step-00000300/__1_0.distcp", Body=b"short")
    # step 400: a manifest that is not JSON (torn write on a non-atomic store)
    store.upload_files(_shards(tmp_path, "d"), 400)
    store.client.put_object(Bucket=bucket, Key="ck/step-00000400/manifest.json", Body=b"{not json")

    assert store.latest_hint() == 300  # the hint says 300 ...
    latest = store.latest_committed_checkpoint()
    assert latest is not None and latest.step == 100  # ... the manifests say 100
    assert [c.step for c in store.committed_checkpoints()] == [100]
    with pytest.raises(StorageError):
        store.download(200, tmp_path / "x")


def test_same_size_corruption_is_caught_by_sha256(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    src = _shards(tmp_path, "a")
    store.save_dir(src, 5)
    size = (src / "__0_0.distcp").stat().st_size
    store.client.put_object(Bucket=bucket, Key="ck/step-00000005/__0_0.distcp", Body=b"\0" * size)
    ckpt = store.latest_committed_checkpoint()
    assert ckpt is not None and ckpt.step == 5
    with pytest.raises(CorruptCheckpoint):
        store.download(ckpt, tmp_path / "out")


def test_commit_refuses_missing_files(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    entries = store.upload_files(_shards(tmp_path, "a"), 7)
    bogus = [*entries, type(entries[0])("__9_0.distcp", 10, "0" * 64)]
    with pytest.raises(StorageError, match="missing"):
        store.commit(7, bogus)
    assert store.latest_committed_checkpoint() is None
    store.commit(7, entries, tokens=1)
    assert store.latest_committed_checkpoint().step == 7  # type: ignore[union-attr]


def test_retention_keeps_newest_and_removes_stale_uncommitted(s3_env: dict[str, str], bucket: str,
                                                              tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    for step in (10, 20, 30, 40):
        store.save_dir(_shards(tmp_path, f"s{step}"), step)
    store.upload_files(_shards(tmp_path, "s15"), 15)  # interrupted, older than newest committed -> stale
    store.upload_files(_shards(tmp_path, "s50"), 50)  # newer than newest committed -> maybe in flight

    deleted = store.apply_retention(keep=2)
    assert deleted == [10, 15, 20]
    assert sorted(store.step_dirs()) == [30, 40, 50]
    assert [c.step for c in store.committed_checkpoints()] == [30, 40]
    assert store.apply_retention(keep=2) == []


def test_large_file_uses_parallel_multipart(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    client = make_client(env=s3_env)
    threads: set[int] = set()
    lock = threading.Lock()

    def on_part(**_: Any) -> None:
        with lock:
            threads.add(threading.get_ident())

    client.meta.events.register("before-send.s3.UploadPart", on_part)
    cfg = s3mod.transfer_config(concurrency=4, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = CheckpointStore(f"s3://{bucket}/big", client=client, transfer_config=cfg)
    src = _write_tree(tmp_path / "big", {"model.bin": os.urandom(12 * MiB), "small.json": b"{}"})
    ckpt = store.save_dir(src, 1)

    head = client.head_object(Bucket=bucket, Key="big/step-00000001/model.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 2 MiB
    assert len(threads) > 1  # parts went up from several threads
    out = tmp_path / "out"
    store.download(ckpt, out)  # ranged parallel download, sha256 verified
    assert (out / "model.bin").read_bytes() == (src / "model.bin").read_bytes()


def test_transient_errors_are_retried(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    # botocore's standard retry mode handles per-request faults
    client = make_client(env=s3_env)
    faults = FaultInjector(4)
    client.meta.events.register("before-send.s3", faults)
    store = CheckpointStore(f"s3://{bucket}/flaky", client=client)
    src = _shards(tmp_path, "a")
    store.save_dir(src, 3)
    assert faults.injected == 4
    faults.left = 3
    ckpt = store.latest_committed_checkpoint()
    assert ckpt is not None and ckpt.step == 3
    store.download(ckpt, tmp_path / "out")

    # more consecutive faults than botocore's attempts: the whole-operation retry takes over
    weak = make_client(env=s3_env, max_attempts=2)
    burst = FaultInjector(3, ops=("GetObject",), status=500, code="InternalError")
    weak.meta.events.register("before-send.s3", burst)
    data = s3mod.get_bytes(weak, S3Uri(bucket, "flaky/step-00000003/manifest.json"))
    assert json.loads(data)["step"] == 3 and burst.injected == 3

    # a non-transient error is not retried
    denied = FaultInjector(1, ops=("GetObject",), status=403, code="AccessDenied")
    weak.meta.events.register("before-send.s3", denied)
    burst.left = 0
    with pytest.raises(s3mod.ClientError):
        s3mod.get_bytes(weak, S3Uri(bucket, "flaky/step-00000003/manifest.json"))
    assert denied.injected == 1


def test_final_export_replaces_older_export(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/job", client=make_client(env=s3_env))
    store.upload_final(_write_tree(tmp_path / "v1", {"config.json": b"{}", "model-00001.safetensors": b"a"}))
    uri = store.upload_final(_write_tree(tmp_path / "v2", {"config.json": b"{1}", "model.safetensors": b"b"}))
    assert uri == f"s3://{bucket}/job/final"
    names = sorted(store.download_final(tmp_path / "out"))
    assert names == ["config.json", "model.safetensors"]
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{1}"


def test_uri_and_client_from_env(s3_env: dict[str, str]) -> None:
    u = S3Uri.parse("s3://bkt/a/b/")
    assert (u.bucket, u.key, u.prefix, str(u.join("c", "d/"))) == ("bkt", "a/b", "a/b/", "s3://bkt/a/b/c/d")
    assert S3Uri.parse("s3://bkt").prefix == ""
    with pytest.raises(ValueError):
        S3Uri.parse("gs://x/y")
    c = make_client(env=s3_env)
    assert c.meta.endpoint_url == s3_env["AWS_ENDPOINT_URL"]
    assert c.meta.config.retries["mode"] == "standard" and c.meta.config.retries["total_max_attempts"] >= 5
    c2 = make_client(endpoint="http://127.0.0.1:1", env=s3_env)
    assert c2.meta.endpoint_url == "http://127.0.0.1:1"


def test_latest_never_moves_back_past_a_committed_step(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    """A commit of an older step (a writer that resumed further back) leaves `latest` on the newer committed
    step; once that step is rejected (uncommitted), `latest` may point at the older one again."""
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    for step in (10, 20):
        store.save_dir(_shards(tmp_path, f"s{step}"), step)
    store.save_dir(_shards(tmp_path, "s15"), 15)
    assert store.latest_hint() == 20
    store.reject(20, "sha256 mismatch")
    assert [c.step for c in store.committed_checkpoints()] == [10, 15] and store.rejected_steps() == [20]
    store.save_dir(_shards(tmp_path, "s16"), 16)
    assert store.latest_hint() == 16


def test_retention_does_not_count_a_rejected_checkpoint(s3_env: dict[str, str], bucket: str,
                                                        tmp_path: Path) -> None:
    store = CheckpointStore(f"s3://{bucket}/ck", client=make_client(env=s3_env))
    for step in (10, 20, 30):
        store.save_dir(_shards(tmp_path, f"s{step}"), step)
    store.reject(30, "sha256 mismatch")
    assert store.apply_retention(keep=2) == []  # 10 and 20 are the two good ones: both kept
    assert [c.step for c in store.committed_checkpoints()] == [10, 20]
