"""What a process tree costs, read from /proc (Linux): its pids, the peak RSS of each process
since a reset, and the CPU time it has used. Each takes the root pid (a service's
``proc.pid``: the supervisor, its engine and workers are its children)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant still running."""
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += process_tree(int(k))
    return out


def reset_peaks(pid: int) -> None:
    """Start every process's peak RSS (VmHWM) afresh from its current RSS."""
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> dict[int, float]:
    """Peak RSS of each process of the tree since :func:`reset_peaks` (or its start), MiB."""
    peaks = {}
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[p] = int(line.split()[1]) / 1024
    return peaks


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the tree's running processes have used so far."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
