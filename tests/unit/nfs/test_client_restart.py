"""Our NFS client across a `kill -9` of a real server process and its restart on the same ports.

UDP: the ICMP refusals while nothing listens leave the socket as it is (no reconnect storm) and
the retransmissions reach the restarted server.  TCP: refused connects are retried with a short
backoff, so the restarted server is found within seconds, not after `timeo` (60 s).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio

from emu.swapdev.endpoint import NfsEndpoint
from nfs.client import REEST_MAX, NfsClient
from nfs.nfs3 import CreateMode, StableHow
from restart import RestartableServer


@pytest.mark.parametrize("proto", ["udp", "tcp"])
async def test_a_write_in_flight_completes_on_the_restarted_server(proto: str) -> None:
    with tempfile.TemporaryDirectory(prefix="netswap-nfsrestart-") as d:
        srv = RestartableServer("nfs", Path(d))
        await trio.to_thread.run_sync(srv.start)
        try:
            ep = srv.endpoint
            assert isinstance(ep, NfsEndpoint)
            make = NfsClient.udp if proto == "udp" else NfsClient.tcp
            async with make("127.0.0.1", ep.nfsport, ep.mountport) as nfs:
                root = await nfs.mount(ep.export)
                fh, _ = await nfs.create(root, "f", how=CreateMode.UNCHECKED)
                await nfs.write(fh, 0, b"a" * 4096, stable=StableHow.FILE_SYNC)
                srv.kill9()
                began: list[float] = []
                ready: list[float] = []

                def restart() -> None:
                    time.sleep(1.0)
                    began.append(time.monotonic())
                    srv.start()
                    ready.append(time.monotonic())

                threading.Thread(target=restart, daemon=True).start()
                with trio.fail_after(30):
                    # the server is down: this write waits, then completes on the new server
                    await nfs.write(fh, 4096, b"b" * 4096, stable=StableHow.FILE_SYNC)
                done = time.monotonic()
                assert began and done > began[0], "completed before the server was back"
                with trio.fail_after(30):  # (start() returns once it has read the ready line: on a
                    while not ready:       # busy machine, maybe after the client found the server)
                        await trio.sleep(0.01)
                after = done - ready[0]
                # found soon after the server is ready: UDP's next retransmission (timeo 1.1 s,
                # doubling: at most 8.8 s away), TCP's next connect (backoff capped at REEST_MAX)
                assert after < (8.8 if proto == "udp" else REEST_MAX) + 1.5, after
                assert await nfs.read(fh, 0, 8192) == b"a" * 4096 + b"b" * 4096
                if proto == "udp":
                    assert nfs.stats["reconnects"] == 0  # one socket throughout
                else:
                    assert nfs.stats["reconnects"] >= 1
            assert srv.starts == 2
        finally:
            srv.stop()
