"""Object sizes of the kernel structures the emulator allocates, in one place.

64-bit 2.6.2x-era figures (pahole-style, rounded where the config varies).  The reserve sizing
(`reserve.py`) and the slab caches (`slab.py`) both read them from here.
"""

from __future__ import annotations

PAGE_SIZE = 4096
CACHE_LINE = 64  # L1_CACHE_BYTES: SLAB_HWCACHE_ALIGN alignment

# SLAB allocator bookkeeping (mm/slab.c): struct slab header and one kmem_bufctl_t per object.
SLAB_HEADER = 48
SLAB_BUFCTL = 4

# Networking.
SKB_HEAD = 232  # struct sk_buff
SKB_SHARED_INFO = 320  # struct skb_shared_info at the end of the data buffer
DST_ENTRY = 320  # struct rtable (dst_entry + IPv4 route key): the "ip_dst_cache" object
IPQ = 200  # struct ipq: one IPv4 fragment reassembly queue
INET_PEER = 128
SOCK_UDP = 832  # struct udp_sock
SOCK_TCP = 1600  # struct tcp_sock

# Sun RPC / NFS client.
RPC_RQST = 424  # struct rpc_rqst: a size-512 kmalloc object (8 per page, off-slab)
RPC_TASK = 256
RPC_MIN_SLOT_TABLE = 2  # RPC_MIN_SLOT_TABLE: the least slots sunrpc's slot_table_entries sysctl takes
RPC_MAX_SLOT_TABLE = 128  # RPC_MAX_SLOT_TABLE: slots per transport (and that sysctl's most)

# iSCSI initiator.
ISCSI_TASK = 384  # struct iscsi_task + its PDU header buffer
ISCSI_HDR = 48  # basic header segment

# kmalloc size classes (bytes); larger requests come straight from the page allocator.
# (no size-96 with 64-byte cache lines, as in 2.6.2x kmalloc_sizes.h)
KMALLOC_SIZES = (32, 64, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
KMALLOC_MAX_CACHE_SIZE = KMALLOC_SIZES[-1]


def K(pages: int, page_size: int) -> int:
    """The kernel's K(x): pages to KiB, exact for every page size (512-byte pages included)."""
    return pages * page_size // 1024
