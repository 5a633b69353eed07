"""Debian tools run from their unpacked packages, never installed: ``apt-get download`` into a
cache, ``dpkg-deb -x`` beside it (as ``make container-check`` does with Docker). For the
promtool rule tests and the HAProxy rolling-restart check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CACHE = (
    Path(os.environ.get("SERESNET_CACHE_DIR") or Path.home() / ".cache" / "seresnet-serve") / "debs"
)


def unpacked(packages: list[str]) -> Path:
    """The root folder holding ``packages`` unpacked (downloaded once into the cache). Skips
    where apt-get or dpkg-deb are missing (not a Debian/Ubuntu machine)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: these checks unpack Debian packages ({packages})")
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / ("root-" + "+".join(packages))
    done = root / ".unpacked"
    if done.exists():
        return root
    missing = [p for p in packages if not list(CACHE.glob(f"{p}_*.deb"))]
    if missing:
        run = subprocess.run(
            ["apt-get", "download", *missing],
            cwd=CACHE,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(missing)} failed:\n{run.stderr}")
    root.mkdir(exist_ok=True)
    for package in packages:
        deb = sorted(CACHE.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
    done.touch()
    return root


def library_env(root: Path) -> dict[str, str]:
    """The environment that lets an unpacked binary find its unpacked shared libraries."""
    libs = [str(p) for p in (root / "usr" / "lib").glob("*-linux-gnu")] + [str(root / "usr/lib")]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(libs)}
