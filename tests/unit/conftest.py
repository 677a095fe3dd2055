"""Fixtures for unit tests that need a real S3 server: moto's server over HTTP on a loopback port.

`s3_server` (session): endpoint + credentials of a ThreadedMotoServer started once.
`s3_env` (function): those as AWS_* environment variables (what the runtime reads in a pod).
`bucket` (function): a fresh bucket name on that server.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    return dict(s3_server)


@pytest.fixture
def s3_client(s3_env: dict[str, str]) -> Any:
    from kubeforge.storage import make_client

    return make_client(env=s3_env)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name

