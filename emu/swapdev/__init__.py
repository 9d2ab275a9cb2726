"""Swap storage over the network: the address-space operations of emu/mm's `SwapStorage`.

- `nfs.NfsSwapFile`: a swap *file* on an NFS export (over UDP or TCP), activated as Linux's
  `nfs_swap_activate` does it;
- `iscsi.IscsiSwapLun`: an iSCSI LUN used as a swap block device.

Both track the I/O they have in flight (`inflight`) so the deadlock report can show which swap
writes are waiting for a reply, for how long, and how often they were sent.
"""

from __future__ import annotations

from typing import Any


def make_storage(host: Any, server: Any) -> Any:
    """The swap storage for a host's backend and server (NFS swap file or iSCSI LUN)."""
    from emu.servers import IscsiServer, NfsServer

    sc = host.sc
    if sc.backend in ("nfs-udp", "nfs-tcp"):
        from emu.swapdev.nfs import NfsSwapFile

        if not isinstance(server, NfsServer):
            raise ValueError(f"backend {sc.backend} needs an NFS server, not {server}")
        return NfsSwapFile(host.net, server, "udp" if sc.backend == "nfs-udp" else "tcp",
                           reserve=host.reserve, policy=sc.policy)
    from emu.swapdev.iscsi import IscsiSwapLun

    if not isinstance(server, IscsiServer):
        raise ValueError(f"backend iscsi needs an iSCSI server, not {server}")
    return IscsiSwapLun(host.net, server, reserve=host.reserve, policy=sc.policy)
