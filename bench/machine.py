"""What a benchmark ran on, for its JSON: the CPU model and, where there is one, the GPU."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_name() -> str | None:
    return _nvidia_smi("--query-gpu=name") or None


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """GPU memory process ``pid`` (default: this one) holds, or None without a GPU."""
    out = _nvidia_smi("--query-compute-apps=pid,used_memory")
    if out is None:
        return None
    want = str(pid or os.getpid())
    for line in out.splitlines():
        owner, _, used = line.partition(",")
        if owner.strip() == want:
            return float(used.split()[0])
    return 0.0
