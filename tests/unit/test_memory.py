"""The operator's malloc arena limit and trim (controller/memory.py), checked against glibc itself."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubeforge.controller import memory

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas are glibc's")

# Four threads each hold a malloc'd block (below the mmap threshold, so it comes from an arena) while the main
# thread asks glibc how many arenas ("heaps") the process has.
PROBE = textwrap.dedent("""
    import ctypes, re, sys, tempfile, threading
    from kubeforge.controller import memory

    applied = memory.limit_arenas(int(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.fopen.restype = ctypes.c_void_p
    both = threading.Barrier(5)

    def hold():
        block = libc.malloc(64 * 1024)
        both.wait()
        both.wait()
        libc.free(ctypes.c_void_p(block))

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    both.wait()
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        f = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(f))
        libc.fclose(ctypes.c_void_p(f))
        heaps = len(re.findall(r"<heap nr=", open(out.name).read()))
    both.wait()
    for t in threads:
        t.join()
    print(applied, heaps, memory.trim())
""")


def arenas_with_limit(limit: int) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONPATH": str(OPERATOR)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(limit)], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    return out[0], int(out[1]), out[2]


@glibc_only
def test_the_arena_limit_holds_however_many_threads_allocate() -> None:
    applied, heaps, trimmed = arenas_with_limit(1)
    assert (applied, heaps) == ("True", 1)
    assert trimmed in ("True", "False")  # malloc_trim ran (whether it had anything to give back)
    applied, heaps, _ = arenas_with_limit(2)
    assert (applied, heaps) == ("True", 2)


@glibc_only
def test_no_limit_leaves_glibc_one_arena_per_thread() -> None:
    """The probe can tell: without a limit the four threads get arenas of their own."""
    applied, heaps, _ = arenas_with_limit(0)
    assert applied == "False"
    assert heaps > 2


def test_the_operator_defaults_to_two_arenas_and_a_trim_every_30_s() -> None:
    from kubeforge.settings import OperatorSettings

    s = OperatorSettings()
    assert (s.malloc_arenas, s.memory_trim_seconds) == (2, 30.0)


def test_the_trim_loop_trims_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_trim() -> bool:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("a failing trim is logged, the loop goes on")
        return True

    monkeypatch.setattr(memory, "trim", fake_trim)

    async def run() -> None:
        task = asyncio.create_task(memory.trim_loop(0.001))
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(run(), 30))
    assert len(calls) >= 3
