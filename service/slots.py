"""Shared-memory image slots: preprocessed images go from ingress workers to the engine
without being copied through a socket or pickled.

The supervisor picks the file, the engine creates it (one slot per admissible image, each the
size of one model input) and maps it; every worker maps the same file and writes into the
slots the engine leased to it. The file lives on ``/dev/shm`` (tmpfs) when it fits there, so
the pages are plain shared memory; space is reserved with ``posix_fallocate`` at creation, so
a full tmpfs is a clear start-up error instead of a SIGBUS on first write.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import shutil
import tempfile
from math import prod
from pathlib import Path

import numpy as np

log = logging.getLogger("service.slots")

SHM_DIR = Path("/dev/shm")
# What this service leaves on disk carries its owner: "seresnet-<pid>-s<start>-..." where
# <start> is the process's start time in clock ticks since boot (/proc/PID/stat), so a pid
# reused by another process (pid 1 in every container) is not taken for the owner.
_OWNED = re.compile(r"seresnet-(\d+)-s(\d+)-")


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_tag() -> str:
    """``<pid>-s<start ticks>`` of this process, the prefix of every name it leaves."""
    pid = os.getpid()
    return f"{pid}-s{_start_ticks(pid) or 0}"


def _owner_gone(name: str) -> bool:
    match = _OWNED.match(name)
    if match is None:
        return False  # not named by this service (or by an older one): not ours to judge
    pid, start = int(match.group(1)), int(match.group(2))
    ticks = _start_ticks(pid)
    if ticks is None:
        return True
    return start != 0 and ticks != start


def remove_stale(shm_dir: Path = SHM_DIR, run_root: Path | None = None) -> list[Path]:
    """Remove the slot files and run directories of services that are gone (SIGKILL or the
    OOM killer leave them behind: 159 MB of /dev/shm for SE-ResNet-50 at the defaults, so a
    crash loop fills Docker's 64 MB). Only names that carry an owner that no longer runs are
    touched; returns what was removed."""
    removed: list[Path] = []
    roots = [shm_dir, run_root or Path(tempfile.gettempdir())]
    for root in roots:
        try:
            entries = list(root.glob("seresnet-*"))
        except OSError:
            continue
        for entry in entries:
            if not _owner_gone(entry.name):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as e:
                log.warning("stale_not_removed", extra={"path": str(entry), "error": str(e)})
                continue
            removed.append(entry)
    if removed:
        log.info("stale_removed", extra={"paths": [str(p) for p in removed]})
    return removed


class SlotArenaError(RuntimeError):
    """The shared-memory file cannot be created or mapped."""


def choose_path(tag: str, nbytes: int, fallback_dir: Path) -> Path:
    """``/dev/shm/seresnet-<tag>`` when that tmpfs has room (Docker's default is 64 MB),
    else a file in ``fallback_dir``."""
    shm = SHM_DIR
    try:
        stat = os.statvfs(shm)
        if shm.is_dir() and os.access(shm, os.W_OK) and stat.f_bavail * stat.f_frsize > 2 * nbytes:
            return shm / f"seresnet-{owner_tag()}-{tag}"
    except OSError:
        pass
    return fallback_dir / f"slots-{tag}"


def slot_count(max_queue_size: int, max_batch_size: int) -> int:
    """Slots an engine needs: one per admissible image plus one batch being run, so the bound
    is on images waiting (decoding or queued)."""
    return max_queue_size + max_batch_size


def arena_bytes(shape: tuple[int, ...], dtype: np.dtype | str, count: int) -> int:
    """Size of the file that holds ``count`` slots of ``shape``/``dtype``."""
    return prod(shape) * np.dtype(dtype).itemsize * count


class SlotArena:
    """``count`` slots of ``shape``/``dtype`` in one mapped file."""

    def __init__(
        self, path: Path, shape: tuple[int, ...], dtype: np.dtype | str, count: int, *, create: bool
    ) -> None:
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.count = count
        self.slot_bytes = arena_bytes(self.shape, self.dtype, 1)
        size = self.slot_bytes * count
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise SlotArenaError(f"cannot open shared memory {self.path}: {e}") from e
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    os.unlink(self.path)
                    raise SlotArenaError(
                        f"cannot reserve {size / 2**20:.0f} MiB of shared memory at {self.path} "
                        f"({e.strerror}); lower SERESNET_MAX_QUEUE_SIZE or give the container "
                        f"more /dev/shm (docker: shm_size)"
                    ) from e
            elif os.fstat(fd).st_size < size:
                raise SlotArenaError(f"{self.path} is smaller than {count} slots")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._map, dtype=self.dtype).reshape(count, *self.shape)

    def slot(self, index: int) -> np.ndarray:
        """A writable view of one slot (no copy)."""
        return self._array[index]

    def close(self) -> None:
        self._array = np.empty((0, *self.shape), self.dtype)
        # A view may still exist somewhere; then the mapping dies with the process.
        with contextlib.suppress(BufferError):
            self._map.close()

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def make_run_dir() -> Path:
    """A private directory (0700) for the engine socket, metrics files and fallback slots,
    made after removing what dead services left behind (:func:`remove_stale`)."""
    remove_stale()
    return Path(tempfile.mkdtemp(prefix=f"seresnet-{owner_tag()}-"))
