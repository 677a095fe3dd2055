"""The PretrainJob runtime: pure pieces, the data stream on a real S3 server, and real torchrun training of a
tiny Llama on CPU (2 processes over gloo) with preemption, a killed worker, resume and the final export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubeforge import contract
from kubeforge.runtime import dist as kdist
from kubeforge.runtime import localrun
from kubeforge.runtime.checkpointing import owner_rank
from kubeforge.runtime.data import PackedStream, S3Objects
from kubeforge.runtime.launch import exit_code_for
from kubeforge.runtime.report import FileSink, Progress, Reporter, sink_from_env, write_termination_message
from kubeforge.runtime.tinymodel import tiny_llama_config
from kubeforge.runtime.training import InvalidSpec, lr_factor, plan
from kubeforge.storage import CheckpointStore, make_client

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny-corpus.jsonl"


# ------------------------------------------------------------------------------------------ pure pieces


def _training(**kw: Any) -> SimpleNamespace:
    base = {"total_steps": None, "total_tokens": None, "seq_len": 128, "global_batch_size": 8,
            "micro_batch_size": 2}
    return SimpleNamespace(**(base | kw))


def test_plan_batch_arithmetic_and_token_budget() -> None:
    p = plan(_training(total_steps=10), world_size=2)
    assert (p.grad_accum, p.total_steps, p.tokens_per_step) == (2, 10, 1024)
    assert plan(_training(total_tokens=10_000), world_size=4).total_steps == math.ceil(10_000 / 1024)
    with pytest.raises(InvalidSpec, match="globalBatchSize"):
        plan(_training(total_steps=1, global_batch_size=6), world_size=2)  # 6 % (2 x 2) != 0
    with pytest.raises(InvalidSpec, match="exactly one"):
        plan(_training(total_steps=1, total_tokens=5), world_size=1)


def test_lr_schedule() -> None:
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)  # cosine down to minLrRatio
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(1 - 45 / 89)
    assert lr_factor(99, 100, 0, "constant", 0.1) == 1.0


def test_device_decides_backend_strategy_and_precision() -> None:
    cpu = kdist.choose("ddp", "auto", cuda_available=False)
    assert (cpu.backend, cpu.strategy, cpu.precision) == ("gloo", "ddp", "fp32")
    cpu_fsdp = kdist.choose("fsdp", "auto", cuda_available=False)
    assert (cpu_fsdp.backend, cpu_fsdp.strategy, cpu_fsdp.precision) == ("gloo", "fsdp", "fp32")
    gpu = kdist.choose("fsdp", "auto", cuda_available=True)
    assert (gpu.backend, gpu.strategy, gpu.precision) == ("nccl", "fsdp", "bf16")
    assert kdist.choose("ddp", "fp32", cuda_available=True).precision == "fp32"
    env = kdist.DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                  "GROUP_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (3, 4, 1, 2, 1)


def test_block_classes_for_fsdp_wrapping() -> None:
    from kubeforge.runtime.tinymodel import build_model

    model = build_model(tiny_llama_config())
    assert [c.__name__ for c in kdist.block_classes(model)] == ["LlamaDecoderLayer"]


def test_exit_codes_and_shard_owners() -> None:
    assert exit_code_for([78, -15]) == contract.EXIT_INVALID_SPEC
    assert exit_code_for([-15, 143]) == contract.EXIT_PREEMPTED
    assert exit_code_for([-9, -15]) == 1 and exit_code_for([]) == 0
    assert owner_rank("__3_0.distcp") == 3 and owner_rank(".metadata") == 0


def test_reporter_rate_limits_and_survives_failures(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    r = Reporter(FileSink(str(path)), min_interval=60)
    assert r.report(Progress(step=1, total_steps=10, tokens=5, loss=2.0))
    assert not r.report(Progress(step=2, total_steps=10, tokens=10))  # rate-limited
    assert r.report(Progress(step=3, total_steps=10, tokens=15, last_checkpoint={"uri": "s3://b/x", "step": 3,
                                                                                   "time": "t"}), force=True)
    r.close()
    lines = localrun.read_progress(path)
    assert [x["step"] for x in lines] == [1, 3]
    assert set(lines[1]) >= {"step", "totalSteps", "tokens", "loss", "tokensPerSecond", "lastCheckpoint", "time"}

    class Broken(FileSink):
        def send(self, payload: dict[str, Any]) -> None:
            raise ConnectionError("api server down")

    broken = Reporter(Broken(str(tmp_path / "x")))
    assert broken.report(Progress(step=1, total_steps=1, tokens=1), force=True)
    broken.close()  # logged, not raised

    assert sink_from_env({}) is None  # not in a cluster, no mode: off
    assert isinstance(sink_from_env({contract.ENV_PROGRESS_MODE: f"file:{path}"}), FileSink)
    assert sink_from_env({contract.ENV_PROGRESS_MODE: "pod-annotation"}) is None  # no pod name: off, no crash
    write_termination_message({"x": 1}, {contract.ENV_TERMINATION_LOG: "/proc/definitely/not/writable"})


def test_a_non_finite_loss_is_reported_as_json_the_api_server_accepts(tmp_path: Path) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        payload = Progress(step=3, total_steps=10, tokens=30, loss=bad, tokens_per_second=bad).to_json()
        json.dumps(payload, allow_nan=False)  # a bare NaN makes the pod patch a 400
        assert payload["loss"] is None and payload["lossNonFinite"] == str(bad)


def test_a_diverged_run_fails_at_once_or_restarts_per_its_policy() -> None:
    """onDivergence Fail: exit 78 with reason Diverged, so the operator fails the job at once instead of
    restarting it into the same NaN until maxRestarts; Restart: an ordinary crash (the gang restarts from
    the newest checkpoint)."""
    from kubeforge.api.kinds import TrainingSpec
    from kubeforge.runtime.pretrain import Diverged, check_loss, exit_for

    assert TrainingSpec(total_steps=1).on_divergence == "Fail"
    check_loss(2.5, 3, "Fail")  # finite: nothing happens
    with pytest.raises(Diverged) as diverged:
        check_loss(float("nan"), 7, "Fail")
    code, payload = exit_for(diverged.value)
    assert code == contract.EXIT_INVALID_SPEC and payload["reason"] == "Diverged" and "step 7" in payload["message"]
    with pytest.raises(FloatingPointError) as restart:
        check_loss(float("inf"), 7, "Restart")
    assert exit_for(restart.value)[0] == 1


PEER_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from kubeforge.runtime.pretrain import exit_for
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
t = torch.ones(4)
dist.all_reduce(t)
if rank == 1:
    os.kill(os.getpid(), 9)  # a rank whose node died
try:
    for _ in range(1000):
        dist.all_reduce(t)
except Exception as exc:
    print(exit_for(exc)[1]["reason"])
"""


def test_a_rank_whose_peer_died_exits_with_reason_peer_lost(tmp_path: Path) -> None:
    """What gloo raises on the survivor when another rank's process dies is classified PeerLost, so the
    operator waits to learn whether a node was lost before it spends the restart budget."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "peer.py"
    script.write_text(PEER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "operator")}
    dead = subprocess.Popen([sys.executable, str(script), "1", port], env=env)
    try:
        out = subprocess.run([sys.executable, str(script), "0", port], env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        dead.wait(60)
    assert out.stdout.strip().splitlines()[-1:] == [contract.REASON_PEER_LOST], out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------------------------ data stream


def _put_docs(client: Any, bucket: str, prefix: str, files: dict[str, list[str]]) -> None:
    for name, docs in files.items():
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body.encode())


def _byte_tok(texts: list[str]) -> list[list[int]]:
    return [list(t.encode()) for t in texts]


def _stream(client: Any, uri: str, rank: int = 0, world: int = 1, **kw: Any) -> PackedStream:
    return PackedStream(S3Objects(client, uri), _byte_tok, eos_id=257, seq_len=kw.pop("seq_len", 16), rank=rank,
                        world_size=world, **kw)


def test_stream_packs_shards_and_resumes_exactly(s3_client: Any, bucket: str) -> None:
    docs = {f"part-{i}.jsonl": [f"doc {i}-{j} " + "x" * (j % 7) for j in range(40)] for i in range(3)}
    _put_docs(s3_client, bucket, "d", docs)
    s3_client.put_object(Bucket=bucket, Key="d/_SUCCESS", Body=b"")
    uri = f"s3://{bucket}/d"

    a = _stream(s3_client, uri)
    seqs = [a.next_sequence() for _ in range(30)]
    assert all(len(s) == 17 for s in seqs)
    assert all(s[-1] == t[0] for s, t in zip(seqs, seqs[1:]))  # consecutive sequences overlap by one token
    assert 257 in sum(seqs, [])  # EOS between documents
    # deterministic: the same seed gives the same stream
    again = _stream(s3_client, uri)
    assert [again.next_sequence() for _ in range(5)] == seqs[:5]

    # resumable: a fresh stream loaded with the state continues exactly
    b = _stream(s3_client, uri)
    for _ in range(11):
        b.next_sequence()
    c = _stream(s3_client, uri)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))  # survives a JSON round trip
    assert [c.next_sequence() for _ in range(19)] == seqs[11:]

    # sharded: two ranks see disjoint documents that together are the whole epoch
    shards = {r: _stream(s3_client, uri, r, 2, seq_len=64) for r in (0, 1)}
    texts = {r: bytes(t for _ in range(10) for t in shards[r].next_sequence()[:-1] if t < 256).decode()
             for r in (0, 1)}
    seen = {r: {d for f in docs.values() for d in f if d in texts[r]} for r in (0, 1)}
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_stream_text_format_and_epochs(s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="t/a.txt", Body=b"first para\nline two\n\nsecond para\n")
    s = _stream(s3_client, f"s3://{bucket}/t", fmt="text", seq_len=8)
    toks = sum((s.next_sequence()[:-1] for _ in range(12)), [])
    text = bytes(t if t < 256 else ord("|") for t in toks).decode()
    assert text.startswith("first para\nline two|second para|first para")  # paragraph = document, epoch 2
    assert s.state.epoch >= 1


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_stream_reads_compressed_objects_and_resumes_inside_them(s3_client: Any, bucket: str,
                                                                 suffix: str) -> None:
    """Compressed shards give exactly the plain shards' sequences, and a resume from a state saved in the
    middle of a compressed object continues exactly (its offset counts decompressed bytes)."""
    import gzip

    import zstandard

    docs = {f"part-{i}.jsonl": [f"doc {i}-{j} " + "y" * (j % 5) for j in range(40)] for i in range(3)}
    _put_docs(s3_client, bucket, "plain", docs)
    for name, texts in docs.items():
        body = "".join(json.dumps({"text": d}) + "\n" for d in texts).encode()
        halves = (body[: len(body) // 2], body[len(body) // 2:])  # two members/frames, split mid-line
        if suffix == ".gz":
            blob = b"".join(gzip.compress(h) for h in halves)
        else:
            blob = b"".join(zstandard.ZstdCompressor().compress(h) for h in halves)
        s3_client.put_object(Bucket=bucket, Key=f"comp/{name}{suffix}", Body=blob)

    plain = _stream(s3_client, f"s3://{bucket}/plain", batch_records=8)
    expected = [plain.next_sequence() for _ in range(60)]
    comp = _stream(s3_client, f"s3://{bucket}/comp", batch_records=8)
    got = [comp.next_sequence() for _ in range(23)]
    resumed = _stream(s3_client, f"s3://{bucket}/comp", batch_records=8)
    resumed.load_state_dict(json.loads(json.dumps(comp.state_dict())))
    assert resumed.state.offset > 0 and resumed.state.file_pos == 0  # inside the first compressed object
    got += [resumed.next_sequence() for _ in range(37)]
    assert got == expected
    assert resumed.state.file_pos >= 1  # and on through the following objects

    s3_client.put_object(Bucket=bucket, Key=f"txt/a.txt{suffix}", Body=gzip.compress(b"one\n\ntwo\n")
                         if suffix == ".gz" else zstandard.ZstdCompressor().compress(b"one\n\ntwo\n"))
    t = _stream(s3_client, f"s3://{bucket}/txt", fmt="text", seq_len=7)
    assert bytes(x if x < 256 else ord("|") for x in t.next_sequence()).decode() == "one|two|"


@pytest.mark.parametrize("prefix", [contract.MODEL_CREDENTIALS_PREFIX, contract.DATA_CREDENTIALS_PREFIX])
def test_model_and_data_are_read_with_their_own_credentials(s3_env: dict[str, str], bucket: str,
                                                            prefix: str) -> None:
    """model.secretRef's / data.secretRef's keys (prefixed in the pod's env) sign those reads; the checkpoint
    client keeps the plain AWS_* keys. The Authorization header of a real request to the S3 server shows
    which."""
    from kubeforge.runtime.pretrain import scoped_client

    spec = SimpleNamespace(checkpoint=SimpleNamespace(endpoint=None))
    default = make_client()
    assert scoped_client(prefix, spec, default, environ=dict(s3_env)) is default  # no own secret: one client
    other = next(p for p in (contract.MODEL_CREDENTIALS_PREFIX, contract.DATA_CREDENTIALS_PREFIX) if p != prefix)
    assert scoped_client(prefix, spec, default, environ={
        **s3_env, f"{other}AWS_ACCESS_KEY_ID": "x", f"{other}AWS_SECRET_ACCESS_KEY": "y"}) is default

    environ = {**s3_env, f"{prefix}AWS_ACCESS_KEY_ID": "model-reader", f"{prefix}AWS_SECRET_ACCESS_KEY": "s"}
    signed: list[str] = []

    def record(request: Any, **_: Any) -> None:
        signed.append(request.headers["Authorization"].decode() if isinstance(
            request.headers["Authorization"], bytes) else request.headers["Authorization"])

    for client in (scoped_client(prefix, spec, default, environ=environ), default):
        assert client.meta.endpoint_url == s3_env["AWS_ENDPOINT_URL"]  # the model secret names no endpoint
        client.meta.events.register("before-send.s3.ListObjectsV2", record)
        client.list_objects_v2(Bucket=bucket)
    assert "Credential=model-reader/" in signed[0] and "Credential=testing/" in signed[1]

    environ[f"{prefix}AWS_ENDPOINT_URL"] = "http://models.example:9000"
    assert scoped_client(prefix, spec, default, environ=environ).meta.endpoint_url == "http://models.example:9000"


def test_stream_rejects_empty_data(s3_client: Any, bucket: str) -> None:
    with pytest.raises(InvalidSpec, match="no data objects"):
        _stream(s3_client, f"s3://{bucket}/nothing")
    _put_docs(s3_client, bucket, "w", {"a.jsonl": ["x"]})
    s3_client.put_object(Bucket=bucket, Key="w/b.jsonl", Body=b'{"content": "wrong field"}\n')
    s = _stream(s3_client, f"s3://{bucket}/w/b.jsonl")
    with pytest.raises(InvalidSpec, match="no tokens"):
        s.next_sequence()


# ------------------------------------------------------------------------------------------ torchrun


class Run:
    """One pod's worth of runtime: the launcher as a subprocess with its own progress/termination files."""

    def __init__(self, tmp: Path, tag: str, job: dict[str, Any], s3_env: dict[str, str], nproc: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:
        self.dir = tmp / tag
        self.dir.mkdir(parents=True)
        spec = localrun.write_job(job, self.dir / "job.json")
        self.progress_file = self.dir / "progress.jsonl"
        self.term = self.dir / "termination-log"
        env = localrun.runtime_env(s3_env, spec, tmp / "work", self.progress_file, self.term)
        env.update(extra_env or {})
        self.log = (self.dir / "out.log").open("w")
        self.proc = subprocess.Popen(localrun.launch_argv(nproc, localrun.free_port()), env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def progress(self) -> list[dict[str, Any]]:
        return localrun.read_progress(self.progress_file)

    def wait_for(self, pred: Any, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.progress():
                if pred(p):
                    return p
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"condition not reached; rc={self.proc.poll()}\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in localrun.worker_pids(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            raise

    def termination(self) -> dict[str, Any]:
        return json.loads(self.term.read_text())

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "out.log").read_text()


def store_steps(s3_env: dict[str, str], bucket: str, prefix: str) -> list[Any]:
    return CheckpointStore(f"s3://{bucket}/{prefix}", client=make_client(env=s3_env)).committed_checkpoints()


def assert_export_is_the_trained_model(store: CheckpointStore, step: int, exported: Any, tmp: Path) -> None:
    """Every weight of the exported Hugging Face model equals the one in the final training checkpoint (the
    DCP files the gang wrote, converted with torch's own dcp_to_torch_save): an export that wrote the
    initial weights, another rank's shard or a half-gathered FSDP parameter fails here."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    local = tmp / f"ckpt-{step}"
    store.download(step, local)
    dcp_to_torch_save(str(local), str(tmp / f"ckpt-{step}.pt"))
    saved = torch.load(tmp / f"ckpt-{step}.pt", weights_only=False)
    trained = saved["app"]["model"] if "app" in saved else {
        k[len("app.model."):]: v for k, v in saved.items() if k.startswith("app.model.")}
    got = exported.state_dict()
    assert got and set(got) <= set(trained), sorted(set(got) - set(trained))[:5]
    for name, tensor in got.items():
        assert torch.equal(tensor, trained[name].to(tensor.dtype)), name


def _ckpt_step(p: dict[str, Any]) -> int:
    return (p.get("lastCheckpoint") or {}).get("step", 0)


@pytest.fixture
def corpus_uri(s3_client: Any, bucket: str) -> str:
    s3_client.upload_file(str(CORPUS), bucket, "data/tiny-corpus.jsonl")
    return f"s3://{bucket}/data"


def _job(corpus_uri: str, bucket: str, prefix: str = "ckpt", **training: Any) -> dict[str, Any]:
    return localrun.pretrain_job(
        "tiny", corpus_uri, f"s3://{bucket}/{prefix}",
        model={"config": tiny_llama_config(), "tokenizer": {"builtin": "byte"}},
        training={"totalSteps": 60, "seqLen": 64, "globalBatchSize": 8, "microBatchSize": 2, **training},
        optimizer={"lr": 3e-3, "warmupSteps": 5},
        checkpoint={"intervalSteps": 10, "keep": 2},
    )


def test_train_preempt_kill_resume_and_export(s3_env: dict[str, str], bucket: str, corpus_uri: str,
                                              tmp_path: Path) -> None:
    job = _job(corpus_uri, bucket)
    store = CheckpointStore(f"s3://{bucket}/ckpt", client=make_client(env=s3_env))

    # 1) train until a checkpoint at step >= 20 is committed, then SIGTERM the pod's main process: the
    #    workers finish the step, checkpoint, and the launcher exits 143
    first = Run(tmp_path, "run1", job, s3_env)
    first.wait_for(lambda p: _ckpt_step(p) >= 20)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait() == contract.EXIT_PREEMPTED, first.output()[-3000:]
    assert first.termination()["reason"] == "Preempted"
    p1 = first.progress()
    stopped_at = p1[-1]["step"]
    assert _ckpt_step(p1[-1]) == stopped_at  # the last report names the checkpoint taken on SIGTERM
    assert store.latest_committed_checkpoint().step == stopped_at  # type: ignore[union-attr]
    losses1 = [p["loss"] for p in p1 if p["loss"] is not None]
    assert losses1[-1] < losses1[0] < math.log(259) + 0.5  # learning

    # 2) resume, then a worker dies hard (OOM-kill, node loss) after the next commit
    second = Run(tmp_path, "run2", job, s3_env)
    start2 = second.wait_for(lambda p: True)
    assert start2["step"] == stopped_at  # resumed by itself from the newest committed checkpoint
    second.wait_for(lambda p: _ckpt_step(p) > stopped_at)
    victim = localrun.worker_pids(second.proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    assert second.wait() not in (0, contract.EXIT_PREEMPTED, contract.EXIT_INVALID_SPEC)
    committed = store.latest_committed_checkpoint()
    assert committed is not None and committed.step > stopped_at

    # 3) resume again and finish: the final model is exported to <checkpoint.uri>/final
    third = Run(tmp_path, "run3", job, s3_env)
    assert third.wait() == 0, third.output()[-3000:]
    p3 = third.progress()
    assert p3[0]["step"] == committed.step and p3[0]["loss"] is not None
    assert p3[0]["loss"] < losses1[0]  # not back at the initial loss
    result = third.termination()
    assert result["outputUri"] == f"s3://{bucket}/ckpt/final" and result["step"] == 60
    assert result["tokens"] == 60 * 8 * 64 and result["loss"] < losses1[0]
    assert p3[-1]["outputUri"] == result["outputUri"] and _ckpt_step(p3[-1]) == 60
    assert [c.step for c in store.committed_checkpoints()] == [50, 60]  # keep: 2

    # the export is a normal Hugging Face directory
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "final"
    store.download_final(local)
    model = AutoModelForCausalLM.from_pretrained(str(local))
    assert_export_is_the_trained_model(store, 60, model, tmp_path)
    # its provenance: the job, trained from scratch (no source) on the corpus, and its last loss
    prov = json.loads((local / "kubeforge-provenance.json").read_text())
    assert (prov["kind"], prov["name"], prov["uid"]) == ("PretrainJob", "tiny", job["metadata"]["uid"])
    assert prov["source"] is None and prov["data"] == [corpus_uri] and prov["steps"] == 60
    assert prov["tokens"] == 60 * 8 * 64 and prov["metrics"]["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert prov["output"] == result["outputUri"] and prov["created"].endswith("Z")
    tok = AutoTokenizer.from_pretrained(str(local))
    ids = tok("The capital of ", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def test_invalid_specs_exit_78_with_reason(s3_env: dict[str, str], bucket: str, corpus_uri: str,
                                           tmp_path: Path) -> None:
    # found before any process group: globalBatchSize 6 does not split over 2 processes x microBatch 2
    bad = Run(tmp_path, "batch", _job(corpus_uri, bucket, globalBatchSize=6), s3_env)
    assert bad.wait() == contract.EXIT_INVALID_SPEC, bad.output()[-3000:]
    msg = bad.termination()
    assert msg["reason"] == "InvalidSpec" and msg["field"] == "spec.training.globalBatchSize"

    # found after start-up: the data prefix holds nothing
    job = _job(f"s3://{bucket}/no-such-prefix", bucket)
    empty = Run(tmp_path, "empty", job, s3_env, nproc=1)
    assert empty.wait() == contract.EXIT_INVALID_SPEC, empty.output()[-3000:]
    assert "no data objects" in empty.termination()["message"]


def test_fsdp2_sharded_checkpoint_resume_and_export(s3_env: dict[str, str], bucket: str, corpus_uri: str,
                                                    tmp_path: Path) -> None:
    """The GPU path on CPU: FSDP2 (fully_shard per block) and dcp.async_save on its own gloo group, with the
    upload overlapping training; sharded checkpoint, resume into a longer run, full-state export."""
    job = _job(corpus_uri, bucket, prefix="fsdp", totalSteps=12)
    job["spec"]["parallelism"] = {"strategy": "fsdp"}
    async_env = {"KUBEFORGE_ASYNC_CHECKPOINT": "1"}
    first = Run(tmp_path, "fsdp1", job, s3_env, extra_env=async_env)
    assert first.wait() == 0, first.output()[-3000:]
    assert "gloo, fsdp, fp32" in first.output() and "checkpoint step 10: async save" in first.output()
    losses = [p["loss"] for p in first.progress() if p["loss"] is not None]

    job["spec"]["training"]["totalSteps"] = 16
    second = Run(tmp_path, "fsdp2", job, s3_env, extra_env=async_env)
    assert second.wait() == 0, second.output()[-3000:]
    p2 = second.progress()
    assert p2[0]["step"] == 12 and p2[-1]["step"] == 16
    assert p2[-1]["loss"] < losses[0]
    assert [c.step for c in store_steps(s3_env, bucket, "fsdp")] == [12, 16]

    from transformers import AutoModelForCausalLM

    store = CheckpointStore(f"s3://{bucket}/fsdp", client=make_client(env=s3_env))
    store.download_final(tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_export_is_the_trained_model(store, 16, model, tmp_path)


def _count_gets(client: Any) -> list[str]:
    """The keys of every GetObject the client sends (a hook on the real request, not a mock)."""
    keys: list[str] = []
    client.meta.events.register("provide-client-params.s3.GetObject",
                                lambda params, **_: keys.append(params["Key"]))
    return keys


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_object_is_fetched_once_per_pass(s3_client: Any, bucket: str, suffix: str) -> None:
    """Refilling the buffer continues the open decompressed stream instead of re-reading the object from
    byte 0 (which made reading an object quadratic in its size)."""
    import gzip

    import zstandard

    for name in ("a", "b"):
        body = "".join(json.dumps({"text": f"doc {name}{j} " + "z" * (j % 9)}) + "\n" for j in range(400)).encode()
        blob = gzip.compress(body) if suffix == ".gz" else zstandard.ZstdCompressor().compress(body)
        s3_client.put_object(Bucket=bucket, Key=f"c/{name}.jsonl{suffix}", Body=blob)
    gets = _count_gets(s3_client)
    for rank in (0, 1):
        s = _stream(s3_client, f"s3://{bucket}/c", rank, 2, batch_records=4)
        first = s.order(0)[0][0]
        while (s.state.epoch, s.state.file_pos) == (0, 0):  # until the first object is read through
            s.next_sequence()
    assert gets.count(first) == 2  # one pass per rank, not one per refill


def test_resume_stays_in_the_same_object_when_objects_are_added(s3_client: Any, bucket: str) -> None:
    """The resume state names the object, and the epoch order does not reshuffle when objects are added
    under data.uri: a resumed stream continues in the object it was reading, at the same offset."""
    docs = {f"part-{i}.jsonl": [f"doc {i}-{j} " + "q" * (j % 3) for j in range(30)] for i in range(6)}
    _put_docs(s3_client, bucket, "g", docs)
    uri = f"s3://{bucket}/g"
    a = _stream(s3_client, uri, batch_records=4)
    for _ in range(25):
        a.next_sequence()
    state = json.loads(json.dumps(a.state_dict()))
    reading = a.order(0)[a.state.file_pos][0]
    expected = [a.next_sequence() for _ in range(10)]

    _put_docs(s3_client, bucket, "g", {f"new-{i}.jsonl": [f"added {i}"] for i in range(5)})
    b = _stream(s3_client, uri, batch_records=4)
    b.load_state_dict(state)
    assert b.order(0)[b.state.file_pos][0] == reading
    assert [b.next_sequence() for _ in range(10)] == expected


def test_world_size_change_keeps_buffered_documents(s3_client: Any, bucket: str) -> None:
    """Tokens a rank had read but not yet emitted are not dropped when the gang resumes at another world
    size: each old rank's buffer comes out of some new rank's stream."""
    docs = {f"part-{i}.jsonl": [f"doc {i}-{j} " + "w" * (j % 11) for j in range(50)] for i in range(2)}
    _put_docs(s3_client, bucket, "ws", docs)
    uri = f"s3://{bucket}/ws"
    old = {r: _stream(s3_client, uri, r, 2, seq_len=8, batch_records=8) for r in (0, 1)}
    for _ in range(7):
        for s in old.values():
            s.next_sequence()
    states = {r: json.loads(json.dumps(s.state_dict())) for r, s in old.items()}
    assert all(st["buffer"] for st in states.values())

    def text(tokens: list[int]) -> str:
        return bytes(t if t < 256 else ord("|") for t in tokens).decode()

    for world in (1, 3):
        new = {r: _stream(s3_client, uri, r, world, seq_len=8, batch_records=8) for r in range(world)}
        out = {}
        for r, s in new.items():
            s.load_gang_state(states)
            out[r] = text(sum((s.next_sequence()[:-1] for _ in range(40)), []))
        for r, st in states.items():
            buffered = text(st["buffer"][1:])  # the first token is also the last emitted one (overlap)
            assert any(buffered in o for o in out.values()), (world, r, buffered)


class CountingObjects(S3Objects):
    """The real S3 reader, counting the bytes each object yields to the stream."""

    def __init__(self, client: Any, uri: str) -> None:
        super().__init__(client, uri)
        self.bytes_read: dict[str, int] = {}

    def read(self, key: str, offset: int, size: int, chunk: int = 1 << 20) -> Any:
        for block in super().read(key, offset, size, chunk):
            self.bytes_read[key] = self.bytes_read.get(key, 0) + len(block)
            yield block


def test_ranks_read_their_own_bytes_of_an_object(s3_client: Any, bucket: str) -> None:
    """World size 4 over one large JSON-lines object: each rank reads (about) its quarter of the bytes, not
    the whole object, and together the ranks take every document exactly once."""
    docs = {name: [f"{name}-doc-{j:06d} " + "b" * (j % 50) for j in range(60_000)] for name in ("a", "z")}
    _put_docs(s3_client, bucket, "big", {f"{n}.jsonl": d for n, d in docs.items()})
    taken: list[str] = []
    read = 0
    for rank in range(4):
        src = CountingObjects(s3_client, f"s3://{bucket}/big")
        s = PackedStream(src, _byte_tok, eos_id=257, seq_len=4096, rank=rank, world_size=4, batch_records=256)
        first_key = s.order(0)[0][0]
        first = first_key.rsplit("/", 1)[-1].removesuffix(".jsonl")
        out: list[int] = []
        while (s.state.epoch, s.state.file_pos) == (0, 0):  # until this rank is through the first object
            out += s.next_sequence()[:-1]
        out += s.state.buffer
        text = bytes(t if t < 256 else ord("|") for t in out).decode()
        taken += [d for d in text.split("|") if d.startswith(f"{first}-doc-")]
        read += src.bytes_read[first_key]
    size = s3_client.head_object(Bucket=bucket, Key=first_key)["ContentLength"]
    assert sorted(taken) == sorted(docs[first])  # every document once, across the ranks
    assert read < 2 * size  # not 4 x: each rank its quarter (plus at most a read block past its end)
