"""Loaded by every Python process the dev-cluster node agent runs (this dir is first on PYTHONPATH).

Pods here are plain local processes, so two things a container would give them are emulated:
- cluster DNS: `socket.getaddrinfo`/`gethostbyname*` consult the agent's hosts file first
  (`KUBEFORGE_DEVCLUSTER_HOSTS`), with the pod's resolv.conf search list (`<ns>.svc.cluster.local`,
  `svc.cluster.local`, `cluster.local`); `socket.gethostname()` returns the pod's hostname.
- volume mounts: paths under a mountPath (`KUBEFORGE_DEVCLUSTER_MOUNTS`, JSON {mountPath: hostDir}) are
  rewritten to the pod's host directory in open()/os.*/ssl (so `open("/etc/kubeforge/job.json")` and the
  in-cluster kubernetes client's token/CA files work).
Native code (C/C++ resolvers or file access) does not go through these; see docs/dev-cluster.md.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import ssl
import threading

_HOSTS = os.environ.get("KUBEFORGE_DEVCLUSTER_HOSTS", "")
_NS = os.environ.get("KUBEFORGE_DEVCLUSTER_NAMESPACE", "default")
_HOSTNAME = os.environ.get("KUBEFORGE_DEVCLUSTER_HOSTNAME", "")
_SUFFIX = "cluster.local"
try:
    _MOUNTS: list[tuple[str, str]] = sorted(
        json.loads(os.environ.get("KUBEFORGE_DEVCLUSTER_MOUNTS", "{}")).items(),
        key=lambda kv: len(kv[0]),
        reverse=True,
    )
except ValueError:
    _MOUNTS = []

# ---------------------------------------------------------------------------------------------- DNS
_lock = threading.Lock()
_cache: tuple[float, dict[str, list[str]]] = (-1.0, {})
_rr = 0


def _table() -> dict[str, list[str]]:
    global _cache
    try:
        mtime = os.stat(_HOSTS).st_mtime if _HOSTS else -1.0
    except OSError:
        return {}
    with _lock:
        if mtime == _cache[0]:
            return _cache[1]
        table: dict[str, list[str]] = {}
        try:
            with _real_open(_HOSTS, encoding="utf-8") as f:  # the original: the hosts file is a host path
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) >= 2:
                        for name in parts[1:]:
                            table.setdefault(name.lower(), []).append(parts[0])
        except OSError:
            return _cache[1]
        _cache = (mtime, table)
        return table


def lookup(host: str) -> list[str] | None:
    """Cluster IPs for `host`, or None when it is not a cluster name (fall through to the system)."""
    if not isinstance(host, str) or not host:
        return None
    name = host.rstrip(".").lower()
    table = _table()
    cands = [name]
    if name.endswith(".svc"):
        cands.insert(0, f"{name}.{_SUFFIX}")
    elif not host.endswith("."):
        # resolv.conf search list of a pod in namespace _NS
        cands += [f"{name}.{_NS}.svc.{_SUFFIX}", f"{name}.svc.{_SUFFIX}", f"{name}.{_SUFFIX}"]
    for c in cands:
        ips = table.get(c)
        if ips:
            if len(ips) > 1:  # rotate, like a DNS server does for multi-address answers
                global _rr
                _rr += 1
                k = _rr % len(ips)
                ips = ips[k:] + ips[:k]
            return ips
    if name.endswith((f".{_SUFFIX}", ".svc")):
        return []  # a cluster name that does not exist: NXDOMAIN, never ask the real DNS
    return None


_real_open = io.open
_orig_getaddrinfo = socket.getaddrinfo
_orig_gethostbyname = socket.gethostbyname
_orig_gethostbyname_ex = socket.gethostbyname_ex
_orig_gethostname = socket.gethostname


def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
    if isinstance(host, bytes):
        host = host.decode()
    ips = lookup(host) if host else None
    if ips is None:
        return _orig_getaddrinfo(host, port, family, type, proto, flags)
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    out = []
    for ip in ips:
        out += _orig_getaddrinfo(ip, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    if not out:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return out


def _gethostbyname(host):  # type: ignore[no-untyped-def]
    ips = lookup(host)
    if ips is None:
        return _orig_gethostbyname(host)
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return ips[0]


def _gethostbyname_ex(host):  # type: ignore[no-untyped-def]
    ips = lookup(host)
    if ips is None:
        return _orig_gethostbyname_ex(host)
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return host, [], list(ips)


def _gethostname():  # type: ignore[no-untyped-def]
    return _HOSTNAME or _orig_gethostname()


if _HOSTS:
    socket.getaddrinfo = _getaddrinfo
    socket.gethostbyname = _gethostbyname
    socket.gethostbyname_ex = _gethostbyname_ex
    socket.gethostname = _gethostname

# --------------------------------------------------------------------------------------------- paths


def _map(p):  # type: ignore[no-untyped-def]
    """Map a path under a mountPath to its host directory; anything else passes through unchanged."""
    if not _MOUNTS:
        return p
    raw = p
    if isinstance(p, os.PathLike):
        raw = os.fspath(p)
    if isinstance(raw, bytes):
        mapped = _map(raw.decode("utf-8", "surrogateescape"))
        return mapped.encode("utf-8", "surrogateescape") if isinstance(mapped, str) else raw
    if not isinstance(raw, str) or not raw.startswith("/"):
        return p
    for mp, host in _MOUNTS:
        if raw == mp:
            return host
        if raw.startswith(mp.rstrip("/") + "/"):
            return host + raw[len(mp.rstrip("/")):]
    return p


def _wrap1(fn):  # type: ignore[no-untyped-def]
    # The path may be omitted (os.listdir(), os.scandir()) or passed by keyword (open(file=...)).
    def w(*a, **k):  # type: ignore[no-untyped-def]
        if a:
            a = (_map(a[0]), *a[1:])
        else:
            for kw in ("file", "path"):
                if kw in k:
                    k[kw] = _map(k[kw])
        return fn(*a, **k)

    w.__wrapped__ = fn  # type: ignore[attr-defined]
    w.__name__ = getattr(fn, "__name__", "wrapped")
    return w


def _wrap2(fn):  # type: ignore[no-untyped-def]
    def w(src, dst, *a, **k):  # type: ignore[no-untyped-def]
        return fn(_map(src), _map(dst), *a, **k)

    w.__wrapped__ = fn  # type: ignore[attr-defined]
    w.__name__ = getattr(fn, "__name__", "wrapped")
    return w


if _MOUNTS:
    _open = _wrap1(io.open)
    builtins.open = _open
    io.open = _open
    for _n in ("open", "stat", "lstat", "listdir", "scandir", "mkdir", "makedirs", "remove", "unlink",
               "rmdir", "access", "chdir", "utime", "chmod", "truncate", "readlink", "statvfs"):
        if hasattr(os, _n):
            setattr(os, _n, _wrap1(getattr(os, _n)))
    for _n in ("rename", "replace", "symlink", "link"):
        setattr(os, _n, _wrap2(getattr(os, _n)))

    _load_verify = ssl.SSLContext.load_verify_locations
    _load_chain = ssl.SSLContext.load_cert_chain

    def _load_verify_locations(self, cafile=None, capath=None, cadata=None):  # type: ignore[no-untyped-def]
        return _load_verify(self, _map(cafile) if cafile else cafile, _map(capath) if capath else capath, cadata)

    def _load_cert_chain(self, certfile, keyfile=None, password=None):  # type: ignore[no-untyped-def]
        return _load_chain(self, _map(certfile), _map(keyfile) if keyfile else keyfile, password)

    ssl.SSLContext.load_verify_locations = _load_verify_locations  # type: ignore[method-assign]
    ssl.SSLContext.load_cert_chain = _load_cert_chain  # type: ignore[method-assign]
