"""`netswap serve iscsi`: one ready line, clean stop on SIGINT/SIGTERM, usage errors exit 2."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from emu.peers import iscsi as peer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_and_clean_stop(tmp_path: Path, sig: signal.Signals) -> None:
    with peer.netswap_target(tmp_path, size="1M") as d:
        assert (tmp_path / "lun0.img").stat().st_size == 1 << 20
        with socket.create_connection(("127.0.0.1", d.port), timeout=5):
            pass
        d.proc.send_signal(sig)
        assert d.proc.wait(10) == 0
        assert d.proc.stdout is not None and d.proc.stdout.read() == b""  # exactly one line on stdout


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--port", "70000"], "--port"),
        (["--size", "lots"], "--size"),
        (["--chap", "nosecret"], "--chap"),
        (["--iqn", "not-an-iqn"], "--iqn"),
        (["--block-size", "999"], "--block-size"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    r = subprocess.run([sys.executable, "-m", "emu", "serve", "iscsi", "--lun", str(tmp_path / "x.img"), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and flag in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "emu", "serve", "iscsi", "--lun", str(tmp_path / "x.img"), "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot listen" in r.stderr
