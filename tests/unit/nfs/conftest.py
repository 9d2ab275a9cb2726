"""Fixtures for the NFS tests: a real netswap NFS server on loopback, in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from nfs.server import NfsServer, ServerConfig


@dataclass
class Running:
    server: NfsServer
    ports: dict[str, int]
    export: Path
    state_dir: Path
    cancel: trio.CancelScope

    @property
    def nfs_port(self) -> int:
        return self.ports["nfs"]

    @property
    def mount_port(self) -> int:
        return self.ports["mount"]


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    return d


@pytest.fixture
async def nfs_server(tmp_path: Path, export_dir: Path) -> AsyncIterator[Running]:
    """A server on free ports; its own nursery is cancelled at teardown."""
    async with trio.open_nursery() as nursery:
        state = tmp_path / "state"
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, portmap_port=0, state_dir=state))
        ports = await nursery.start(server.serve)
        yield Running(server, ports, export_dir, state, nursery.cancel_scope)
        nursery.cancel_scope.cancel()
