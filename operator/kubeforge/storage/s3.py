"""S3 plumbing shared by the checkpoint store and the runtimes: URIs, the client, retries, directory copies.

What boto3/botocore already do is used as is: credentials and endpoint from the environment, per-request
retries with backoff (``retries={"mode": "standard"}``), multipart uploads and ranged parallel downloads
(s3transfer's TransferManager, which also re-tries a broken download stream). Written here by hand, because
no library does it: the retry of a *whole* operation (e.g. a GET whose body stream breaks after the
headers, or a sequence of calls that must all succeed), and the copying of a directory tree with sha256s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_MAX_ATTEMPTS = 10  # botocore standard mode, attempts per request incl. the first, exponential backoff with jitter (max 20 s)
DEFAULT_CONCURRENCY = 8
DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 120.0
# A Secret or the pod env may tune these: AWS_MAX_ATTEMPTS is the AWS SDKs' own variable (botocore would
# read it, but the explicit retry config below takes precedence, so it is applied here); the timeouts have
# no AWS variable.
MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"
CONNECT_TIMEOUT_ENV = "KUBEFORGE_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "KUBEFORGE_S3_READ_TIMEOUT"

# Error codes S3 (and S3-compatible stores) answer for conditions that go away on their own.
TRANSIENT_CODES = frozenset({
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "RequestLimitExceeded", "BadGateway",
    "GatewayTimeout", "OperationAborted",
})


class StorageError(Exception):
    """A storage operation failed for a reason retrying does not fix."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # no leading slash; "" for the bucket root

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return cls(bucket, key.strip("/"))

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a directory prefix ("a/b/"), or "" for the bucket root."""
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def client_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_pool_connections: int = 32,
                  connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S) -> Config:
    """botocore config: standard retry mode (5xx, throttling, connection errors, timeouts) with more
    attempts; a request that gets no answer within read_timeout is retried like a 5xx."""
    return Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        tcp_keepalive=True,
        s3={"addressing_style": "path"},  # path style works with every S3-compatible server
    )


def make_client(
    endpoint: str | None = None,
    env: Mapping[str, str] | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_pool_connections: int = 32,
) -> Any:
    """An S3 client from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL (explicit endpoint wins);
    AWS_MAX_ATTEMPTS, KUBEFORGE_S3_CONNECT_TIMEOUT and KUBEFORGE_S3_READ_TIMEOUT (seconds) tune the retries.

    With no keys in the environment boto3's usual chain (instance roles, web identity, config files) applies.
    """
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {
        "region_name": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_REGION,
        "config": client_config(
            int(env.get(MAX_ATTEMPTS_ENV) or max_attempts), max_pool_connections,
            float(env.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT_S), float(env.get(READ_TIMEOUT_ENV) or READ_TIMEOUT_S)),
    }
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["aws_access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["aws_secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["aws_session_token"] = env["AWS_SESSION_TOKEN"]
    return boto3.session.Session().client("s3", **kwargs)


def transfer_config(
    concurrency: int = DEFAULT_CONCURRENCY,
    multipart_threshold: int = 16 * MiB,
    multipart_chunksize: int = 16 * MiB,
) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=concurrency,
        num_download_attempts=5,
        use_threads=True,
    )


# ------------------------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (network trouble, 5xx, throttling, a broken body stream)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in TRANSIENT_CODES or status in TRANSIENT_CODES
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return True
    if isinstance(exc, BotoCoreError):
        return "timeout" in type(exc).__name__.lower() or "connection" in type(exc).__name__.lower()
    return isinstance(exc, (ConnectionError, TimeoutError))


def retry(
    fn: Callable[[], T],
    *,
    what: str = "s3 operation",
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a whole operation again on transient errors, with exponential backoff and full jitter.

    Written by hand: botocore retries single HTTP requests, not an operation made of several requests or
    one whose response body breaks while being read.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * (2 ** (attempt - 1))))
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                        attempt, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ object helpers


def get_bytes(client: Any, uri: S3Uri) -> bytes:
    """GET a whole (small) object; the body read is inside the retry."""
    return retry(lambda: client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read(), what=f"GET {uri}")


def put_bytes(client: Any, uri: S3Uri, data: bytes, content_type: str = "application/octet-stream") -> None:
    retry(lambda: client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type),
          what=f"PUT {uri}")


def exists(client: Any, uri: S3Uri) -> bool:
    try:
        retry(lambda: client.head_object(Bucket=uri.bucket, Key=uri.key), what=f"HEAD {uri}")
        return True
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def list_objects(client: Any, uri: S3Uri, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
    """Every object under the prefix (uri as a directory), paginated; with a delimiter also CommonPrefixes
    entries as {"Prefix": ...}."""
    kwargs: dict[str, Any] = {"Bucket": uri.bucket, "Prefix": uri.prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    token: str | None = None
    while True:
        page_kwargs = dict(kwargs, ContinuationToken=token) if token else kwargs
        page = retry(lambda kw=page_kwargs: client.list_objects_v2(**kw), what=f"LIST {uri}")
        yield from page.get("Contents", [])
        yield from page.get("CommonPrefixes", [])
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[i:i + 1000]]

        def _delete(batch: list[dict[str, str]] = batch) -> None:
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                raise StorageError(f"delete failed for {len(errors)} keys, first: {errors[0]}")

        retry(_delete, what=f"DELETE {len(batch)} keys in {bucket}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)  # hashlib releases the GIL on large buffers, so threads hash in parallel
    return h.hexdigest()


def local_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of the regular files under root, sorted."""
    base = Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def upload_files(
    client: Any,
    local_root: str | os.PathLike[str],
    dest: S3Uri,
    names: list[str],
    config: TransferConfig | None = None,
) -> None:
    """Upload local_root/<name> to dest/<name> for every name, all files and parts in one thread pool."""
    if not names:
        return
    config = config or transfer_config()
    root = Path(local_root)

    def _run(todo: list[str]) -> None:
        with create_transfer_manager(client, config) as tm:
            futures = [(n, tm.upload(str(root / n), dest.bucket, dest.join(n).key)) for n in todo]
            errors = []
            for n, fut in futures:
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - collected, re-raised below
                    errors.append((n, exc))
            if errors:
                raise errors[0][1]

    retry(lambda: _run(names), what=f"upload {len(names)} files to {dest}", attempts=3)


def download_files(
    client: Any,
    src: S3Uri,
    local_root: str | os.PathLike[str],
    names: list[str],
    config: TransferConfig | None = None,
) -> None:
    """Download src/<name> to local_root/<name> in parallel (ranged GETs for large objects)."""
    if not names:
        return
    config = config or transfer_config()
    root = Path(local_root)
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)

    def _run() -> None:
        with create_transfer_manager(client, config) as tm:
            futures = [tm.download(src.bucket, src.join(n).key, str(root / n)) for n in names]
            for fut in futures:
                fut.result()

    retry(_run, what=f"download {len(names)} files from {src}", attempts=3)


def download_dir(
    client: Any, src: S3Uri | str, local_root: str | os.PathLike[str], config: TransferConfig | None = None
) -> list[str]:
    """Copy every object under an s3:// prefix to a local directory; returns the relative names."""
    src = S3Uri.parse(src) if isinstance(src, str) else src
    names = [o["Key"][len(src.prefix):] for o in list_objects(client, src) if "Key" in o]
    names = [n for n in names if n and not n.endswith("/")]
    download_files(client, src, local_root, names, config)
    return names


def upload_dir(
    client: Any, local_root: str | os.PathLike[str], dest: S3Uri | str, config: TransferConfig | None = None
) -> list[str]:
    """Copy a local directory tree under an s3:// prefix; returns the relative names."""
    dest = S3Uri.parse(dest) if isinstance(dest, str) else dest
    names = local_files(local_root)
    upload_files(client, local_root, dest, names, config)
    return names
