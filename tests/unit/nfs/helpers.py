"""Helpers the NFS tests share: a client of the test server, and checks of statuses."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from nfs.client import NfsClient
from nfs.nfs3 import NFS_PROGRAM, Nfs3Error, Proc
from nfs.nfs3xdr import NFS3_PROCEDURES
from nfs.xdr import Packer

H = "127.0.0.1"


def fds_on(path: Path, *, removed_only: bool = False) -> int:
    """How many of this process's fds (an in-process server's, say) are open on `path`: by
    that name or removed (`removed_only`: removed)."""
    names = {f"{path} (deleted)"} if removed_only else {str(path), f"{path} (deleted)"}
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") in names
    return n


def client(proto: str, srv: Any, **kw: Any) -> NfsClient:
    """Our client of a running test server (soft, 2 s timeo unless told otherwise)."""
    ctor = NfsClient.tcp if proto == "tcp" else NfsClient.udp
    kw.setdefault("hard", False)
    kw.setdefault("timeo", 2.0)
    return ctor(H, srv.nfs_port, srv.mount_port, **kw)


async def expect(status: int, call: object) -> None:
    with pytest.raises(Nfs3Error) as ei:
        await call  # type: ignore[misc]
    assert ei.value.status == status, ei.value


async def raw(c: NfsClient, proc: Proc, args: object) -> Any:
    """A call whose result object comes back whatever its status (to see a failure's wcc)."""
    x = NFS3_PROCEDURES[proc]
    p = Packer()
    x.encode_args(p, args)
    return await c.rpc.call(NFS_PROGRAM, 3, proc, bytes(p.iov()[0]), x.decode_res)
