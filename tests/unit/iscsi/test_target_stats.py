"""The target's per-initiator service times: real target, real initiators over loopback TCP.

The session (sans-IO) gives each answered command the arrival time of its own command PDU: a
command queued behind a CmdSN gap and a write that waits for Data-Out keep theirs.  Our
initiator from two client addresses (127.0.1.1, 127.0.1.2) sends a known number of SCSI
commands down every path of the target (fast READ/WRITE, FUA writes answered after an fsync, a
1 MiB write solicited by R2Ts, the general path); the target must count exactly those, per address and per initiator name, with ordered, plausible
percentiles.  Then `netswap serve iscsi --stats` with libiscsi's iscsi-inq as the initiator:
the file names it, as `netswap serve nfs --stats` names its clients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from iscsi import scsi
from iscsi.initiator import Initiator
from iscsi.lun import DiskLun
from iscsi.target import Target
from iscsi.target_stats import Histogram, TargetStats, bucket_of, bucket_upper
from tests.peers import require_binary
from tests.unit.iscsi.test_session import Pair, scsi_task

IQN = "iqn.2024-01.test:stats"
ROOT = Path(__file__).parents[3]


def test_histogram_batches_and_percentiles() -> None:
    h = Histogram()
    h.add(100e-6, 98)
    h.add(10e-3, 2)
    assert (h.n, h.max) == (100, 10e-3)
    assert 100e-6 <= h.percentile(50) <= bucket_upper(bucket_of(100e-6)) < h.percentile(99) == 10e-3
    stats = TargetStats(max_clients=1)
    a, name = stats.login("127.0.1.1", "iqn.a")
    a.answered(name, [1.0, 1.0, 1.5], sent=2.0)  # two arrived together, one later
    assert (a.calls, a.initiators, a.latency.n, a.latency.max) == (3, {"iqn.a": 3}, 3, 1.0)
    other, _ = stats.login("127.0.1.2", "iqn.b")  # past max_clients: counted, under "other"
    assert set(stats.clients) == {"127.0.1.1", "other"} and other is stats.clients["other"]


def _feed(p: Pair, chunks: list[bytes], now: float) -> None:
    """Bytes that arrived at `now`, as the driver hands them over."""
    p.ts.now = now
    p.to_target.feed(b"".join(chunks))
    while (pdu := p.to_target.next()) is not None:
        p.ts.receive(pdu)


def test_session_gives_each_answer_its_commands_arrival(tmp_path: Path) -> None:
    p = Pair(tmp_path, window=8)
    first = p.submit(scsi_task(scsi.cdb_read(0, 8), read_len=4096))  # CmdSN 1
    second = p.submit(scsi_task(scsi.cdb_read(8, 8), read_len=4096))  # CmdSN 2
    _feed(p, second, 1.0)  # ahead of ExpCmdSN: waits for the gap
    assert p.ts.done == [] and len(p.ts.pending) == 1
    _feed(p, first, 2.0)  # answered, then the queued one: it keeps its own arrival
    assert p.ts.done == [2.0, 1.0]
    p.ts.done.clear()
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False)
    cmd = p.submit(scsi_task(scsi.cdb_write(0, 8), data=os.urandom(4096)))
    _feed(p, cmd, 3.0)  # solicits the data with an R2T
    assert p.ts.done == []
    p.to_initiator.feed(b"".join(p.ts.out))
    p.ts.out.clear()
    data_out: list[bytes] = []
    while (pdu := p.to_initiator.next()) is not None:
        data_out += p.ic.receive(pdu)
    _feed(p, data_out, 4.0)  # the Data-Out completes it: its time runs from the command
    assert p.ts.done == [3.0]


async def _host(port: int, addr: str, name: str, reads: int, lun: int = 0) -> int:
    """One initiator from `addr`; returns the SCSI commands it sent."""
    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", port, local_address=addr)

    sent = 1  # the login's READ CAPACITY (16)
    async with Initiator(connect, IQN, initiator_name=name, lun=lun) as ini:
        async with trio.open_nursery() as nursery:  # many in flight: several per read and write
            for i in range(reads):
                nursery.start_soon(ini.read, 8 * i, 8)
        sent += reads
        for i in range(4):
            await ini.write(8 * i, os.urandom(4096), fua=True)  # answered after an fsync
        await ini.write(64, os.urandom(1 << 20))  # beyond FirstBurstLength: R2Ts, Data-Out
        await ini.synchronize_cache()
        await ini.inquiry()  # the general path
        await ini.test_unit_ready()
        sent += 8
    return sent


async def test_counts_per_initiator_equal_commands_sent(tmp_path: Path) -> None:
    luns = {n: DiskLun(tmp_path / f"lun{n}.img", size=4 << 20, lun=n) for n in range(2)}
    target = Target(IQN, luns)
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(target.serve, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            sent: dict[str, int] = {}

            async def host(addr: str, reads: int, lun: int) -> None:
                sent[addr] = await _host(port, addr, f"iqn.2026-01.test:{addr}", reads, lun)

            async with trio.open_nursery() as hosts:
                hosts.start_soon(host, "127.0.1.1", 64, 0)
                hosts.start_soon(host, "127.0.1.2", 16, 1)
            nursery.cancel_scope.cancel()
    finally:
        for lun in luns.values():
            lun.close()
    js = target.clients.to_json()
    assert set(js["clients"]) == {"127.0.1.1", "127.0.1.2"}
    for addr, c in js["clients"].items():
        assert c["calls"] == sent[addr] == c["latency"]["calls"], (addr, c["calls"], sent)
        assert c["initiators"] == {f"iqn.2026-01.test:{addr}": sent[addr]} and c["sessions"] == 1
        assert c["bytes_in"] > (1 << 20) and c["bytes_out"] > 4096 * (64 if addr.endswith("1") else 16)
        lat = c["latency"]
        assert 1e-6 <= lat["p50_s"] <= lat["p90_s"] <= lat["p99_s"] <= lat["max_s"] < 10, lat
        assert lat["mean_s"] <= lat["max_s"]
    total = js["latency"]
    assert js["calls"] == total["calls"] == sum(sent.values())
    assert 0 < total["p50_s"] <= total["p99_s"] <= total["max_s"]


def test_serve_stats_file_with_libiscsi(tmp_path: Path) -> None:
    tools = require_binary("iscsi-inq")
    stats = tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "emu", "serve", "iscsi", "--lun", str(tmp_path / "lun0.img"),
                             "--size", "1M", "--port", "0", "--iqn", IQN, "--stats", str(stats)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert " ready on 127.0.0.1:" in line, line + proc.stderr.read() if proc.stderr else ""
        port = int(line.split(" ready on 127.0.0.1:")[1].split()[0])
        name = "iqn.2026-01.test:libiscsi"
        for _ in range(2):
            r = subprocess.run([tools["iscsi-inq"], "-i", name, f"iscsi://127.0.0.1:{port}/{IQN}/0"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    js = json.loads(stats.read_text())
    [c] = js["clients"].values()
    assert list(js["clients"]) == ["127.0.0.1"] and c["sessions"] == 2
    assert c["initiators"] == {name: c["calls"]} and c["calls"] >= 2 and js["calls"] == c["calls"]
    assert 0 < c["latency"]["p50_s"] <= c["latency"]["p99_s"] <= c["latency"]["max_s"]
    assert js["target"]["logins"] == 2


def test_serve_stats_to_an_unwritable_place_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "emu", "serve", "iscsi", "--lun", str(tmp_path / "lun0.img"),
                        "--size", "1M", "--port", "0", "--stats", str(tmp_path / "no" / "such" / "stats.json")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("netswap: error: --stats ") and not (tmp_path / "lun0.img").exists()
