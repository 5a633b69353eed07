"""The CPU's int8 instructions, as the card records them and the service compares them: int8
convolutions are fast only with VNNI (AVX-512 or AVX), so a timing taken on one CPU says
nothing about a CPU without them."""

from __future__ import annotations

from pathlib import Path

# Best first: the first flag /proc/cpuinfo lists names the CPU's int8 dot-product path.
INT8_ISAS = ("avx512_vnni", "avx_vnni", "avx512bw", "avx2")


def cpu_int8_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The best of :data:`INT8_ISAS` this CPU has, or None (not Linux, or none of them)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return next((isa for isa in INT8_ISAS if isa in flags), None)
