"""The fault-injecting S3 proxy the fault-matrix e2e puts in front of the dev cluster's S3 server, against a
real S3 server (moto over HTTP) and the runtime's own S3 client: each fault happens as asked, and the
client's retry configuration (storage/s3.py) rides it out or gives up as configured."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kubeforge.devcluster.faultproxy import FaultProxy
from kubeforge.storage import s3
from kubeforge.storage.s3 import S3Uri


@pytest.fixture
def proxy(s3_env: dict[str, str]) -> Iterator[FaultProxy]:
    with FaultProxy(s3_env["AWS_ENDPOINT_URL"]) as p:
        yield p


def client(s3_env: dict[str, str], proxy: FaultProxy, **env: str) -> Any:
    return s3.make_client(env={**s3_env, "AWS_ENDPOINT_URL": proxy.url, **env})


def test_passes_requests_through_unchanged(s3_env: dict[str, str], bucket: str, proxy: FaultProxy) -> None:
    c = client(s3_env, proxy)
    data = bytes(range(256)) * 4000
    s3.put_bytes(c, S3Uri(bucket, "a/b.bin"), data)
    assert s3.get_bytes(c, S3Uri(bucket, "a/b.bin")) == data
    assert [o["Key"] for o in s3.list_objects(c, S3Uri(bucket, "a"))] == ["a/b.bin"]
    assert not s3.exists(c, S3Uri(bucket, "a/missing"))
    got = [(r.method, r.status, r.fault) for r in proxy.records(path=f"/{bucket}")]
    assert ("PUT", 200, None) in got and ("GET", 200, None) in got and ("HEAD", 404, None) in got


def test_5xx_burst_is_retried_by_the_client(s3_env: dict[str, str], bucket: str, proxy: FaultProxy) -> None:
    c = client(s3_env, proxy)
    proxy.add("error", status=503, method="PUT", path=r"/x\.bin$", times=3)
    proxy.add("error", status=500, method="GET", path=r"/x\.bin$", times=2)
    s3.put_bytes(c, S3Uri(bucket, "x.bin"), b"payload")
    assert s3.get_bytes(c, S3Uri(bucket, "x.bin")) == b"payload"
    puts = proxy.records("PUT", r"/x\.bin$")
    assert [r.status for r in puts] == [503, 503, 503, 200]
    assert [r.status for r in proxy.records("GET", r"/x\.bin$")] == [500, 500, 200]


def test_max_attempts_from_the_environment_bounds_the_retries(s3_env: dict[str, str], bucket: str,
                                                              proxy: FaultProxy) -> None:
    c = client(s3_env, proxy, AWS_MAX_ATTEMPTS="2")
    proxy.add("error", status=503, method="PUT", times=None)
    with pytest.raises(ClientError):
        c.put_object(Bucket=bucket, Key="y", Body=b"1")
    assert len(proxy.records("PUT", "/y$")) == 2


def test_stalled_request_times_out_and_is_retried(s3_env: dict[str, str], bucket: str, proxy: FaultProxy) -> None:
    c = client(s3_env, proxy, KUBEFORGE_S3_READ_TIMEOUT="1")
    s3.put_bytes(c, S3Uri(bucket, "s"), b"slow store")
    proxy.add("stall", method="GET", path="/s$", seconds=5)
    t = time.monotonic()
    assert s3.get_bytes(c, S3Uri(bucket, "s")) == b"slow store"
    assert time.monotonic() - t < 4.5, "the client waited for the stall instead of timing out"
    assert [(r.status, r.fault) for r in proxy.records("GET", "/s$")] == [(None, "stall"), (200, None)]


def test_reset_body_is_refetched_whole_and_slow_body_arrives_whole(s3_env: dict[str, str], bucket: str,
                                                                   proxy: FaultProxy) -> None:
    c = client(s3_env, proxy)
    data = b"0123456789" * 10_000
    s3.put_bytes(c, S3Uri(bucket, "r"), data)
    proxy.add("reset", method="GET", path="/r$")
    assert s3.get_bytes(c, S3Uri(bucket, "r")) == data
    assert [r.fault for r in proxy.records("GET", "/r$")] == ["reset", None]
    proxy.add("slow", method="GET", path="/r$", rate=200_000)
    t = time.monotonic()
    assert s3.get_bytes(c, S3Uri(bucket, "r")) == data
    assert time.monotonic() - t >= 0.4  # 100 kB at 200 kB/s
    assert proxy.records("GET", "/r$")[-1].fault == "slow"


def test_fraction_and_http_control_api(s3_env: dict[str, str], bucket: str, proxy: FaultProxy) -> None:
    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(proxy.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    rule = call("POST", "/__faults__/rules", {"action": "error", "status": 500, "method": "GET", "times": None,
                                              "fraction": 0.5, "path": "/f$"})
    assert rule["action"] == "error" and rule["fraction"] == 0.5
    c = client(s3_env, proxy)
    s3.put_bytes(c, S3Uri(bucket, "f"), b"z")
    for _ in range(20):
        assert s3.get_bytes(c, S3Uri(bucket, "f")) == b"z"
    statuses = [r["status"] for r in call("GET", "/__faults__/log")["requests"] if r["path"].endswith("/f")
                and r["method"] == "GET"]
    assert statuses.count(200) == 20 and 3 <= statuses.count(500) <= 60
    call("DELETE", "/__faults__/rules")
    assert call("GET", "/__faults__/rules") == {"rules": []}
