"""Process identity and signalling shared by the launcher and the node agent (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path


def proc_start_ticks(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/<pid>/stat): with the pid, an identity reuse cannot fake."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: not alive
        return None
    return fields[19]


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
