"""A userspace kube-proxy for the dev cluster.

The API server's service CIDR is a loopback range (127.100.0.0/16), so every ClusterIP is an address this
machine already owns. For each Service port the proxy listens on clusterIP:port and splices each connection
to a ready pod selected by the Service (round-robin), at podIP:targetPort (named target ports resolved from
the pod's container ports). The `kubernetes` Service forwards to the API server. This gives real ClusterIP
semantics — port remapping, only-ready backends, reachability from the host and from the API server (admission
webhooks registered by Service) — without root-wide changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kubeforge.devcluster.proxy")

Backends = Callable[[str, dict[str, Any]], list[tuple[str, int]]]


def target_port(pod: dict[str, Any], port: dict[str, Any]) -> int | None:
    tp = port.get("targetPort", port.get("port"))
    if isinstance(tp, int) or (isinstance(tp, str) and tp.isdigit()):
        return int(tp)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for cp in c.get("ports") or []:
            if cp.get("name") == tp and (cp.get("protocol") or "TCP") == "TCP":
                return int(cp["containerPort"])
    return None


class ServiceProxy:
    def __init__(self, backends: Backends) -> None:
        """`backends(service_key, service_port)` -> [(ip, port)] of ready endpoints, evaluated per connection."""
        self.backends = backends
        self.loop = asyncio.new_event_loop()
        self.servers: dict[tuple[str, int], tuple[asyncio.AbstractServer, str, dict[str, Any]]] = {}
        self.failed: set[tuple[str, int]] = set()
        self.rr = itertools.count()
        self.lock = threading.Lock()
        threading.Thread(target=self.loop.run_forever, name="service-proxy", daemon=True).start()

    def listening(self, ip: str, port: int) -> bool:
        with self.lock:
            return (ip, port) in self.servers

    def sync(self, desired: dict[tuple[str, int], tuple[str, dict[str, Any]]]) -> None:
        """Make the listeners exactly `desired`: {(clusterIP, port): (service key, service port spec)}."""
        asyncio.run_coroutine_threadsafe(self._sync(desired), self.loop).result(timeout=30)

    async def _sync(self, desired: dict[tuple[str, int], tuple[str, dict[str, Any]]]) -> None:
        for addr in list(self.servers):
            if addr not in desired:
                srv, _, _ = self.servers.pop(addr)
                srv.close()
        for addr, (key, port) in desired.items():
            cur = self.servers.get(addr)
            if cur is not None:
                if cur[1:] != (key, port):
                    with self.lock:
                        self.servers[addr] = (cur[0], key, port)
                continue
            try:
                srv = await asyncio.start_server(
                    lambda r, w, a=addr: self._handle(r, w, a), host=addr[0], port=addr[1], reuse_address=True)
            except OSError as e:
                if addr not in self.failed:
                    log.warning("service %s: cannot listen on %s:%d: %s", key, addr[0], addr[1], e)
                    self.failed.add(addr)
                continue
            self.failed.discard(addr)
            with self.lock:
                self.servers[addr] = (srv, key, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, addr: tuple[str, int]) -> None:
        entry = self.servers.get(addr)
        cands = self.backends(entry[1], entry[2]) if entry else []
        if not cands:
            writer.close()  # no ready endpoint: refuse, like kube-proxy's REJECT rule
            return
        start = next(self.rr)
        for i in range(len(cands)):
            ip, port = cands[(start + i) % len(cands)]
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout=5)
                break
            except (OSError, TimeoutError):
                continue
        else:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    if dst.can_write_eof():
                        dst.write_eof()
                except (OSError, RuntimeError):
                    pass

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        for w in (writer, up_w):
            w.close()
