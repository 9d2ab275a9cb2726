"""Swap storage over the network: the address-space operations of emu/mm's `SwapStorage`.

- `nfs.NfsSwapFile`: a swap *file* on an NFS export (over UDP or TCP), activated as Linux's
  `nfs_swap_activate` does it;
- `iscsi.IscsiSwapLun`: an iSCSI LUN used as a swap block device.

Both track the I/O they have in flight (`inflight`) so the deadlock report can show which swap
writes are waiting for a reply, for how long, and how often they were sent.
"""
