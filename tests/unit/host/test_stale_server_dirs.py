"""A run killed with SIGKILL cannot remove its server directory, whose swap file sits in tmpfs
(RAM): the next run removes the directories whose owning process is gone, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from emu.host.servers import SERVER_DIR_PREFIX, reap_stale_server_dirs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dirs_of_dead_owners_go_and_the_rest_stay(tmp_path: Path) -> None:
    dead = tmp_path / f"{SERVER_DIR_PREFIX}{_dead_pid()}-abc"
    (dead / "export").mkdir(parents=True)
    (dead / "export" / "swapfile").write_bytes(b"\0" * 4096)
    mine = tmp_path / f"{SERVER_DIR_PREFIX}{os.getpid()}-def"
    mine.mkdir()
    init = tmp_path / f"{SERVER_DIR_PREFIX}1-ghi"  # pid 1 is alive (and may not be ours to signal)
    init.mkdir()
    old_style = tmp_path / f"{SERVER_DIR_PREFIX}x7k2p"  # no owner recorded: cannot tell, kept
    old_style.mkdir()
    other = tmp_path / "unrelated-123-x"
    other.mkdir()
    assert reap_stale_server_dirs(tmp_path) == [dead]
    assert not dead.exists()
    assert mine.is_dir() and init.is_dir() and old_style.is_dir() and other.is_dir()


def test_a_run_names_its_server_dir_after_its_pid() -> None:
    from emu.host.servers import local_server

    base = Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    with local_server("nfs-udp", 1 << 20, None):
        ours = [p for p in base.iterdir() if p.name.startswith(f"{SERVER_DIR_PREFIX}{os.getpid()}-")]
        assert len(ours) == 1 and (ours[0] / "export").is_dir()
    assert not ours[0].exists()  # a clean exit removes it itself
