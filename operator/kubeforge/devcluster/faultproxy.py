"""A fault-injecting HTTP reverse proxy, put in front of the dev cluster's S3 server by reliability tests.

Requests pass through byte for byte (the Host header too, so SigV4 signatures stay valid) unless a rule
matches them. A rule names the requests it applies to (method, a regex searched in the path + query) and
what happens to them:

    error  answer `status` (500, 503, ...) with an S3-style XML error instead of forwarding
    stall  hold the request `seconds` without answering, then drop the connection (the client times out)
    slow   forward, but send the response body back at `rate` bytes/s (a slow or congested store)
    reset  forward, send the response headers and half the body, then drop the connection

and how often: the next `times` matching requests (None: every one), each with probability `fraction`.
Every request is recorded (method, path, status, the fault applied) so a test can check that the faults
it asked for really happened.

Control: the Python API (`FaultProxy(...).start()`, `add()`, `clear()`, `log`) in the process that runs
it, or HTTP on the same port under `/__faults__/` (a name no S3 bucket can have):
    POST   /__faults__/rules   a rule as JSON ({"action": "error", "status": 503, "method": "PUT", ...})
    DELETE /__faults__/rules   remove every rule
    GET    /__faults__/log     the request log as JSON

    python -m kubeforge.devcluster.faultproxy --upstream http://127.0.0.1:9000 --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

CONTROL = "/__faults__/"
ACTIONS = ("error", "stall", "slow", "reset")
HOP_BY_HOP = {b"expect", b"connection", b"keep-alive", b"proxy-connection"}
S3_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Rule:
    action: str
    method: str | None = None  # None: any method
    path: str = ""  # a regex searched in "path?query"; "" matches every request
    times: int | None = 1  # how many matching requests get the fault; None: all of them
    fraction: float = 1.0  # each matching request gets it with this probability
    status: int = 503  # error
    seconds: float = 30.0  # stall
    rate: int = 64 * 1024  # slow: bytes per second
    hits: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")
        self._re = re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and self.method.upper() != method:
            return False
        return bool(self._re.search(target))


@dataclass
class Record:
    time: float
    method: str
    path: str
    status: int | None  # what the client got (None: nothing, the connection was dropped)
    fault: str | None = None


@dataclass
class _Request:
    method: str
    target: str
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    head_only: bool = field(default=False)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, seed: int | None = None) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (u.hostname, u.port or 80)
        self.host, self.port = host, port
        self.rules: list[Rule] = []
        self.log: list[Record] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- control
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, action: str, **kw: Any) -> Rule:
        rule = Rule(action, **kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def records(self, method: str | None = None, path: str = "", fault: str | None = None) -> list[Record]:
        """Logged requests, filtered: `path` is a regex searched in the path; `fault` an action name or '*'."""
        rx = re.compile(path)
        with self._lock:
            out = list(self.log)
        return [r for r in out if (method is None or r.method == method) and rx.search(r.path)
                and (fault is None or (r.fault is not None and (fault == "*" or r.fault == fault)))]

    def _pick(self, method: str, target: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, target) and (rule.fraction >= 1.0 or self._rng.random() < rule.fraction):
                    rule.hits += 1
                    return rule
        return None

    def _record(self, req: _Request, status: int | None, fault: str | None) -> None:
        with self._lock:
            self.log.append(Record(time.time(), req.method, req.target, status, fault))

    # ------------------------------------------------------------------------------------------- running
    def start(self) -> FaultProxy:
        """Serve on a background thread (its own event loop); returns once the port is bound."""
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- HTTP
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await _read_request(reader, writer)
                if req is None:
                    return
                if req.target.startswith(CONTROL):
                    await self._control(req, writer)
                    continue
                keep = await self._serve(req, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _serve(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """One request; False when the client connection must be closed."""
        rule = self._pick(req.method, req.target)
        action = rule.action if rule else None
        if rule is not None and action == "error":
            code = S3_CODES.get(rule.status, "InternalError")
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected '
                    f"fault</Message><Resource>{req.target}</Resource></Error>").encode()
            self._record(req, rule.status, "error")  # before the answer: a client that has it finds it logged
            writer.write(b"HTTP/1.1 %d Injected\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n"
                         % (rule.status, len(body)) + body)
            await writer.drain()
            return True
        if rule is not None and action == "stall":
            self._record(req, None, "stall")
            await asyncio.sleep(rule.seconds)
            return False
        try:
            status, head, body, close = await self._forward(req)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._record(req, None, f"upstream: {type(exc).__name__}")
            return False
        self._record(req, status, action)
        if rule is not None and action == "reset":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            return False
        writer.write(head)
        if rule is not None and action == "slow":
            chunk = max(1, rule.rate // 10)
            for i in range(0, len(body), chunk):
                writer.write(body[i:i + chunk])
                await writer.drain()
                await asyncio.sleep(0.1)
        else:
            writer.write(body)
        await writer.drain()
        return not close

    async def _forward(self, req: _Request) -> tuple[int, bytes, bytes, bool]:
        """Send the request upstream on a fresh connection; (status, response head, body, close)."""
        r, w = await asyncio.open_connection(*self.upstream)
        try:
            headers = [(k, v) for k, v in req.headers if k.lower() not in HOP_BY_HOP
                       and k.lower() != b"transfer-encoding" and k.lower() != b"content-length"]
            lines = [f"{req.method} {req.target} HTTP/1.1".encode()]
            lines += [k + b": " + v for k, v in headers]
            if req.body or req.method in ("PUT", "POST"):
                lines.append(b"Content-Length: %d" % len(req.body))
            lines.append(b"Connection: close")
            w.write(b"\r\n".join(lines) + b"\r\n\r\n" + req.body)
            await w.drain()
            status_line = await r.readline()
            parts = status_line.split(b" ", 2)
            status = int(parts[1])
            resp_headers = await _read_headers(r)
            if req.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                body = b""
            else:
                body = await _read_body(r, resp_headers, until_eof=True)
            out = [status_line.rstrip(b"\r\n")]
            out += [k + b": " + v for k, v in resp_headers if k.lower() not in HOP_BY_HOP
                    and k.lower() not in (b"transfer-encoding", b"content-length")]
            if req.method != "HEAD":
                out.append(b"Content-Length: %d" % len(body))
            else:
                out += [k + b": " + v for k, v in resp_headers if k.lower() == b"content-length"]
            return status, b"\r\n".join(out) + b"\r\n\r\n", body, False
        finally:
            w.close()

    async def _control(self, req: _Request, writer: asyncio.StreamWriter) -> None:
        path = req.target.split("?", 1)[0]
        code, payload = 200, {}
        try:
            if path == CONTROL + "rules" and req.method == "POST":
                rule = self.add(**json.loads(req.body or b"{}"))
                payload = {k: v for k, v in asdict(rule).items() if not k.startswith("_")}
            elif path == CONTROL + "rules" and req.method == "DELETE":
                self.clear()
            elif path == CONTROL + "rules" and req.method == "GET":
                with self._lock:
                    payload = {"rules": [asdict(r) for r in self.rules]}
            elif path == CONTROL + "log" and req.method == "GET":
                payload = {"requests": [asdict(r) for r in self.records()]}
            else:
                code, payload = 404, {"error": f"no {req.method} {path}"}
        except (TypeError, ValueError) as exc:
            code, payload = 400, {"error": str(exc)}
        body = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (code, len(body)) + body)
        await writer.drain()


async def _read_headers(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    headers = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return headers
        k, _, v = line.rstrip(b"\r\n").partition(b":")
        headers.append((k.strip(), v.strip()))


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]], until_eof: bool) -> bytes:
    h = {k.lower(): v for k, v in headers}
    if b"chunked" in h.get(b"transfer-encoding", b"").lower():
        out = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await _read_headers(reader)  # trailers
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    if b"content-length" in h:
        return await reader.readexactly(int(h[b"content-length"]))
    return await reader.read() if until_eof else b""


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, target, version = line.rstrip(b"\r\n").split(b" ", 2)
    headers = await _read_headers(reader)
    req = _Request(method.decode(), target.decode(), version, headers)
    if (req.header(b"expect") or b"").lower() == b"100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    req.body = await _read_body(reader, headers, until_eof=False)
    return req


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge.devcluster.faultproxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    proxy = FaultProxy(args.upstream, args.host, args.port).start()
    print(f"fault proxy on {proxy.url} -> {args.upstream}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
