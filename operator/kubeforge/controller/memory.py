"""The operator's resident memory under glibc's allocator.

CPython hands every allocation above 512 bytes (a pod's dicts, its JSON text) to malloc. glibc gives each
thread that allocates its own arena, up to 8 per core, and an arena's freed memory goes back to the system only
from its top: the reconcile workers and the API-call pool (two dozen threads) each keep the high-water mark of
a burst, long after the burst. Fewer arenas and a periodic trim give most of it back. Nothing here changes
what the operator does; on another libc (musl images) both are no-ops.

No library does this for a Python process (glibc's own tunables need GLIBC_TUNABLES set before the process
starts, which an operator cannot rely on its deployment to do).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import platform
from functools import cache

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc malloc.h


@cache
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas for the whole process (0: glibc's default). Call before any thread starts:
    arenas already made stay. Whether it was applied."""
    libc = _libc()
    if arenas <= 0 or libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Give the free memory at the top of every arena back to the system; whether any was."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


async def trim_loop(interval: float) -> None:
    """trim() every `interval` seconds, off the event loop (it walks every arena)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(trim)
        except Exception:  # noqa: BLE001
            log.exception("malloc_trim failed; trying again in %.0fs", interval)


__all__ = ["limit_arenas", "trim", "trim_loop"]
