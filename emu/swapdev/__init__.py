"""Swap storage over the network: the address-space operations of emu/mm's `SwapStorage`.

- `nfs.NfsSwapFile`: a swap *file* on an NFS export (over UDP or TCP), activated as Linux's
  `nfs_swap_activate` does it;
- `iscsi.IscsiSwapLun`: an iSCSI LUN used as a swap block device.

Both track the I/O they have in flight (`inflight`) so the deadlock report can show which swap
writes are waiting for a reply, for how long, and how often they were sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.swapdev.endpoint import Endpoint, IscsiEndpoint, NfsEndpoint, nfs_transport
from emu.swapdev.remote import RemoteSwap

if TYPE_CHECKING:
    from emu.net.stack import NetStack


def make_swap(backend: str, endpoint: Endpoint, net: NetStack, *, initiator_name: str | None = None) -> RemoteSwap:
    """The swap storage for a backend (nfs-udp, nfs-tcp, iscsi) on a server, over `net`.
    `initiator_name`: the iSCSI initiator's IQN (hosts sharing a target need one each)."""
    if backend in ("nfs-udp", "nfs-tcp"):
        from emu.swapdev.nfs import NfsSwapFile

        if not isinstance(endpoint, NfsEndpoint):
            raise ValueError(f"backend {backend} needs an NFS server, not {endpoint.url()}")
        return NfsSwapFile(net, endpoint, nfs_transport(backend))
    from emu.swapdev.iscsi import IscsiSwapLun

    if not isinstance(endpoint, IscsiEndpoint):
        raise ValueError(f"backend iscsi needs an iSCSI server, not {endpoint.url()}")
    return IscsiSwapLun(net, endpoint, initiator_name=initiator_name)
