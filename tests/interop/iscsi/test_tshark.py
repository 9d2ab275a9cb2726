"""tshark decodes a capture of real sessions with our target as valid iSCSI (no malformed PDU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from peers import require_binary, require_root

from emu.peers import iscsi as peer
from iscsi.initiator import Initiator, discover

pytestmark = pytest.mark.peers


async def test_capture_has_no_malformed_iscsi(tmp_path: Path) -> None:
    require_root()
    require_binary("tshark", "iscsi-inq", "iscsi-ls")
    cap = tmp_path / "cap.pcapng"
    with peer.netswap_target(tmp_path / "t", size="8M") as d:
        ts = subprocess.Popen(["tshark", "-q", "-i", "lo", "-f", f"tcp port {d.port}", "-w", str(cap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            seen = b""
            assert ts.stderr is not None
            os.set_blocking(ts.stderr.fileno(), False)
            while b"Capturing on" not in seen and time.monotonic() < deadline:
                seen += ts.stderr.read() or b""
                await trio.sleep(0.05)
            assert b"Capturing on" in seen, seen
            for args in (["iscsi-ls", "-s", f"iscsi://127.0.0.1:{d.port}"], ["iscsi-inq", d.url()]):
                assert subprocess.run(args, capture_output=True, timeout=30).returncode == 0

            async def connect() -> trio.SocketStream:
                return await trio.open_tcp_stream("127.0.0.1", d.port)

            await discover(connect)
            for digests in (False, True):
                async with Initiator(connect, d.iqn, header_digest=digests, data_digest=digests) as ini:
                    data = os.urandom(512 << 10)  # immediate + unsolicited data, then R2T
                    await ini.write(0, data, fua=True)
                    assert await ini.read(0, len(data) // 512) == data
                    await ini.nop(b"ping")
            await trio.sleep(0.5)
        finally:
            ts.send_signal(signal.SIGINT)
            try:
                ts.wait(15)
            except subprocess.TimeoutExpired:
                ts.kill()
                ts.wait()
    decode = ["tshark", "-r", str(cap), "-d", f"tcp.port=={d.port},iscsi", "-o", "iscsi.bogus_pdu_filter:FALSE"]
    bad = subprocess.run([*decode, "-Y", "_ws.malformed || (iscsi && _ws.expert.severity >= warning && !tcp.analysis.flags)"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0 and bad.stdout.strip() == "", bad.stdout[:3000]
    ops = subprocess.run([*decode, "-Y", "iscsi", "-T", "fields", "-e", "iscsi.opcode"], capture_output=True, text=True, timeout=60)
    seen_ops = {int(x, 16) for line in ops.stdout.split() for x in line.split(",") if x}
    # Login, Text, SCSI Command, Data-Out, NOP-Out, Logout and their answers, R2T, Data-In
    assert {0x03, 0x04, 0x01, 0x05, 0x00, 0x06, 0x23, 0x24, 0x21, 0x25, 0x26, 0x20, 0x31} <= seen_ops, sorted(seen_ops)
