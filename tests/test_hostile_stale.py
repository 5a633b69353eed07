"""A SIGKILLed (or OOM-killed) service leaves its shared-memory slot file and run directory;
the next start removes them, and never what a live service still uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from service.slots import SHM_DIR
from testkit.processes import process_tree
from testkit.server import EMBEDDED_MODEL, running_service


def _owned_paths(pid: int, run_root: Path) -> list[Path]:
    return sorted([*SHM_DIR.glob(f"seresnet-{pid}-s*"), *run_root.glob(f"seresnet-{pid}-s*")])


def test_a_killed_services_files_are_removed_at_the_next_start(tmp_path: Path) -> None:
    env = {"SERESNET_WORKERS": "1", "TMPDIR": str(tmp_path)}
    with running_service(EMBEDDED_MODEL, env=env) as first:
        left = _owned_paths(first.proc.pid, tmp_path)
        assert any(p.parent == SHM_DIR for p in left), left
        assert any(p.parent == tmp_path and p.is_dir() for p in left), left
        for pid in process_tree(first.proc.pid):  # supervisor, engine, workers: no clean-up
            os.kill(pid, signal.SIGKILL)
        first.proc.wait(30)
        first._stopped = True
        # A live owner's file (this test process) must survive the clean-up.
        live = SHM_DIR / f"seresnet-{os.getpid()}-s{_ticks(os.getpid())}-test"
        live.write_bytes(b"x")
        try:
            with running_service(EMBEDDED_MODEL, env=env) as second:
                assert all(not p.exists() for p in left), [p for p in left if p.exists()]
                assert live.exists()
                assert _owned_paths(second.proc.pid, tmp_path)
                assert "stale_removed" in second.log_text()
        finally:
            live.unlink(missing_ok=True)


def test_files_of_a_reused_pid_are_stale(tmp_path: Path) -> None:
    """The pid lives but started at another time: another process now has it."""
    pid = os.getpid()
    stale = tmp_path / f"seresnet-{pid}-s1-old"
    stale.mkdir()
    code = (
        "from pathlib import Path; from service.slots import remove_stale; "
        f"print([str(p) for p in remove_stale(Path({str(tmp_path)!r}), Path({str(tmp_path)!r}))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert str(stale) in out.stdout
    assert not stale.exists()


def _ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
