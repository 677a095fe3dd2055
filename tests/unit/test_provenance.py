"""kubeforge-provenance.json: the record, its short form, the serving pods' model fetch that reports it and the
reference engine that shows it on /v1/models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeforge.runtime import fetch
from kubeforge.runtime import provenance as prov
from kubeforge.storage import s3 as s3mod

JOB = {"kind": "RLJob", "metadata": {"name": "rl", "namespace": "ns1", "uid": "uid-rl"}, "spec": {}}


def chain_dirs(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A pre-trained folder, an extension of it, an RL run of that: each written the way the runtimes do."""
    base, long = tmp_path / "base", tmp_path / "long"
    base.mkdir()
    long.mkdir()
    p0 = prov.record({"kind": "PretrainJob", "metadata": {"name": "base", "uid": "uid-p"}}, source_uri=None,
                     source_dir=None, data=["s3://b/corpus.jsonl"], steps=300, tokens=153600,
                     metrics={"loss": 0.6931234567}, output="s3://b/base/final")
    prov.write(base, p0)
    p1 = prov.record({"kind": "ContextExtensionJob", "metadata": {"name": "long", "uid": "uid-c"}},
                     source_uri="s3://b/base/final", source_dir=base, data=["s3://b/corpus.jsonl"], steps=20,
                     metrics={"loss": 0.8}, evals={"needleScore": 0.5, "stages": [{"seqLen": 128}, {"seqLen": 256}]})
    prov.write(long, p1)
    p2 = prov.record(JOB, source_uri="s3://b/long/final", source_dir=long, data=["s3://b/prompts/"], steps=60,
                     metrics={"reward": 0.8, "initialReward": 0.15})
    return p2, long


def test_the_record_nests_its_sources_provenance(tmp_path: Path) -> None:
    p2, _ = chain_dirs(tmp_path)
    assert p2["schema"] == prov.SCHEMA and (p2["kind"], p2["name"], p2["uid"]) == ("RLJob", "rl", "uid-rl")
    assert [(p["kind"], p["steps"]) for p in prov.chain(p2)] == [
        ("RLJob", 60), ("ContextExtensionJob", 20), ("PretrainJob", 300)]
    assert prov.chain(p2)[-1]["source"] is None and prov.chain(p2)[-1]["metrics"] == {"loss": 0.693123}
    assert p2["source"]["uri"] == "s3://b/long/final" and p2["created"].endswith("Z")
    # a source folder without a provenance file (any Hugging Face model) is still named
    assert prov.record(JOB, source_uri="s3://hub/llama", source_dir=tmp_path / "nothing", data=[],
                       steps=1)["source"] == {"uri": "s3://hub/llama", "provenance": None}
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / prov.FILE_NAME).write_text("{not json")
    assert prov.read(tmp_path / "junk") is None and prov.read(None) is None


def test_the_summary_keeps_the_chain_and_fits_a_termination_message(tmp_path: Path) -> None:
    p2, _ = chain_dirs(tmp_path)
    s = prov.summary(p2)
    assert [(p["kind"], p["name"]) for p in prov.chain(s)] == [
        ("RLJob", "rl"), ("ContextExtensionJob", "long"), ("PretrainJob", "base")]
    assert s["source"]["provenance"]["evals"]["needleScore"] == 0.5 and "schema" not in s
    # bulky evals at every level are dropped before the identities and metrics
    big = json.loads(json.dumps(p2))
    for p in prov.chain(big):
        p["evals"] = {"grid": list(range(2000))}
    small = prov.summary(big)
    assert len(json.dumps(small)) <= prov.SUMMARY_MAX_BYTES
    assert [p["uid"] for p in prov.chain(small)] == ["uid-rl", "uid-c", "uid-p"]
    assert all("evals" not in p for p in prov.chain(small)) and small["metrics"]["reward"] == 0.8


def test_fetch_reports_the_provenance_in_its_termination_message(s3_env: dict[str, str], s3_client: Any,
                                                                 bucket: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.runtime.tinymodel import byte_tokenizer

    _, long = chain_dirs(tmp_path)
    (long / "config.json").write_text("{}")
    s3mod.upload_dir(s3_client, long, f"s3://{bucket}/long/final")
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEFORGE_TERMINATION_LOG", str(log))
    assert fetch.main([f"s3://{bucket}/long/final", str(tmp_path / "dest")]) == 0
    msg = json.loads(log.read_text())
    assert msg["uri"] == f"s3://{bucket}/long/final"
    assert msg["provenance"] == prov.summary(json.loads((long / prov.FILE_NAME).read_text()))
    assert msg["provenance"]["source"]["provenance"]["kind"] == "PretrainJob"
    # a model folder with no provenance: nothing to report
    plain = tmp_path / "plain"
    byte_tokenizer().save_pretrained(str(plain))
    (plain / "config.json").write_text("{}")
    s3mod.upload_dir(s3_client, plain, f"s3://{bucket}/plain")
    log.unlink()
    assert fetch.main([f"s3://{bucket}/plain", str(tmp_path / "dest2")]) == 0
    assert not log.exists()


def test_the_engine_shows_the_provenance_on_v1_models(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from kubeforge.runtime.serve.engine import Engine, build_app
    from kubeforge.runtime.serve.testing import ThreadServer
    from kubeforge.runtime.tinymodel import save_tiny_model

    p2, _ = chain_dirs(tmp_path)
    with_prov = save_tiny_model(tmp_path / "served", seed=1)
    prov.write(with_prov, p2)
    without = save_tiny_model(tmp_path / "plain", seed=1)
    for model_dir, expected in ((with_prov, p2), (without, None)):
        srv = ThreadServer(None)
        eng = Engine(str(model_dir), "lifecycle", advertise_host="127.0.0.1", port=srv.port)
        srv.server.config.app = build_app(eng)
        srv.engine = eng
        srv.start()
        try:
            card = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
        finally:
            srv.stop()
        assert card["id"] == "lifecycle" and card.get("provenance") == expected
    assert [p["kind"] for p in prov.chain(p2)] == ["RLJob", "ContextExtensionJob", "PretrainJob"]
