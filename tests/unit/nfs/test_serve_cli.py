"""`netswap serve nfs` failures: one line, exit 2 for a bad option and 1 for the rest, no
traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

NETSWAP = [sys.executable, "-m", "emu", "serve", "nfs"]


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--bind", "0.0.0.0"], 2, "--bind 0.0.0.0: not a loopback address"),
    (["--bind", "localhost.example"], 2, "not an IP address"),
    (["--port", "5000", "--mount-port", "5000"], 2, "--port and --mount-port are both 5000"),
    (["--idle-timeout", "nan"], 2, "--idle-timeout nan: must be a number of seconds above 0"),
    (["--idle-timeout", "-1"], 2, "--idle-timeout -1.0: must be"),
    (["--record-timeout", "nan"], 2, "--record-timeout nan: must be"),
    (["--max-buffered", "12Q"], 2, "--max-buffered 12Q: expected a size"),
    (["--allow", "not-a-cidr"], 2, "--allow"),
    (["--write-behind", "4Q"], 2, "--write-behind 4Q: expected a size"),
    (["--write-behind", "-1"], 2, "--write-behind -1"),
])
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    r = subprocess.run([*NETSWAP, "--export", str(tmp_path), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == code
    assert r.stderr.startswith("netswap: error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*NETSWAP, "--export", str(tmp_path), "--port", str(port), "--mount-port", "0",
                            "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == f"netswap: error: cannot listen on 127.0.0.1:{port}: address in use"
