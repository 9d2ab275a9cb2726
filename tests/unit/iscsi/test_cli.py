"""`netswap serve iscsi`: one ready line, clean stop, one-line errors that leave nothing behind,
several LUNs, and what -v logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from emu.peers import iscsi as peer
from iscsi.initiator import Initiator
from iscsi.pdu import TmfFunction, TmfResponse


def serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emu", "serve", "iscsi", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netswap: error: "), r.stderr
    return lines[0].removeprefix("netswap: error: ")


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
    "args,message",
    [
        (["--port", "70000"], "'--port': 70000 is not in the range"),
        (["--size", "lots"], "--size lots: expected a size"),
        (["--size", "0"], "--size 0: a LUN needs at least one block of 512 bytes"),
        (["--size", "1000"], "--size 1000: not a multiple of the block size 512"),
        (["--size", "99999T"], "--size 99999T: larger than the whole filesystem"),
        (["--size", "99999999999999999999999"], "--size 99999999999999999999999: too large"),
        (["--chap", "nosecret"], "--chap nosecret: not USER:SECRET"),
        (["--iqn", "not-an-iqn"], "--iqn not-an-iqn: not an iqn."),
        (["--block-size", "999"], "'--block-size'"),
        (["--bind", "0.0.0.0"], "--bind 0.0.0.0: not a loopback address"),
        (["--bind", "localhost:99"], "--bind localhost:99: not an IP address"),
        (["--login-timeout", "nan"], "'nan' is not a finite number of seconds"),
        (["--nop-interval", "nan"], "'nan' is not a finite number of seconds"),
    ],
)
def test_usage_errors_exit_2_in_one_line_and_create_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    r = serve("--lun", str(tmp_path / "x.img"), *args)
    assert r.returncode == 2 and message in one_line_error(r)
    assert not (tmp_path / "x.img").exists()


def test_port_in_use_is_one_line_and_creates_no_lun_file(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = serve("--lun", str(tmp_path / "x.img"), "--port", str(port))
    assert r.returncode == 1
    assert one_line_error(r) == f"cannot listen on 127.0.0.1:{port}: address in use"
    assert not (tmp_path / "x.img").exists()


def test_a_lun_file_that_cannot_be_opened_is_one_line_and_removes_the_ones_it_made(tmp_path: Path) -> None:
    r = serve("--lun", str(tmp_path / "new.img"), "--lun", str(tmp_path / "missing-dir" / "x.img"), "--port", "0")
    assert r.returncode == 1 and "missing-dir/x.img: cannot serve it as 64M: no such file or directory" in one_line_error(r)
    assert not (tmp_path / "new.img").exists()


async def test_several_luns_and_what_verbose_logs(tmp_path: Path) -> None:
    with peer.netswap_target(tmp_path, size="1M", luns=3, extra=["-v", "--nop-interval", "0"]) as d:
        async def connect() -> trio.SocketStream:
            return await trio.open_tcp_stream("127.0.0.1", d.port)

        data = os.urandom(4096)
        async with Initiator(connect, d.iqn, lun=2) as ini:
            assert await ini.report_luns() == [0, 1, 2]
            await ini.write(8, data, fua=True)
            assert await ini.task_management(TmfFunction.LOGICAL_UNIT_RESET) == TmfResponse.FUNCTION_COMPLETE
            with trio.fail_after(5):
                assert await ini.read(8, 8) == data  # the UNIT ATTENTION of the reset is retried
        with open(tmp_path / "lun2.img", "rb") as f:
            f.seek(8 * 512)
            assert f.read(4096) == data
        assert (tmp_path / "lun0.img").read_bytes() == bytes(1 << 20)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
    assert d.stderr is not None
    log = d.stderr.read_text()
    assert "Traceback" not in log
    logins = [line for line in log.splitlines() if ": login: iqn.2024-01.org.netswap:initiator ISID 0x" in line]
    assert len(logins) == 1 and "HeaderDigest=None DataDigest=None MaxRecvDataSegmentLength=" in logins[0]
    assert sum("LOGICAL UNIT RESET of LUN 2" in line for line in log.splitlines()) == 1
