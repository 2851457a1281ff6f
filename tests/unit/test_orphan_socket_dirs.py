"""A killed ``imfast serve --workers N`` leaves its socket directory; the next one removes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imfast.workers import SOCKETS_DIR_PREFIX, remove_orphan_socket_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (until reused)


def _socket_dir(parent: Path, name: str, pid: int | None) -> Path:
    path = parent / f"{SOCKETS_DIR_PREFIX}{name}"
    path.mkdir()
    (path / "router.sock").write_text("")
    if pid is not None:
        (path / "pid").write_text(str(pid))
    return path


def test_only_dirs_of_supervisors_no_longer_running_are_removed(tmp_path: Path) -> None:
    orphan = _socket_dir(tmp_path, "dead", _dead_pid())
    live = _socket_dir(tmp_path, "live", os.getpid())
    unknown = _socket_dir(tmp_path, "nopid", None)  # an older node's, or still being made
    other = tmp_path / "other-dir"
    other.mkdir()
    (other / "pid").write_text(str(_dead_pid()))  # not named like ours
    assert remove_orphan_socket_dirs(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists()
    assert live.exists() and unknown.exists() and other.exists()
    assert remove_orphan_socket_dirs(str(tmp_path)) == []
