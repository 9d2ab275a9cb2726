"""The network part of the v12 reserve tree, as the seed's net/ code registers it.

    total reserve                      (emu.mm.reserve.ReserveRoot)
    └── total network reserve          hung under the root while a memalloc socket exists
        ├── network TX reserve
        │   └── protocol TX pages      TX_RESERVE_PAGES per memalloc user + the protocol's own
        └── network RX reserve
            ├── IPv4 route cache       kmem_cache estimate of ip_rt_max_size route entries
            └── SKB data reserve
                └── IPv4 fragment cache  kmalloc estimate of ipfrag_high_thresh bytes

Built in the kernel's init order, so that newest-first listing matches /proc/reserve_info.  With
the defaults of a 128 MiB machine and one NFS swapper this is, to the kilobyte, the sample Peter
Zijlstra published in mm/reserve.c (2008):

    1:0 "total reserve" 6232K 0/278581
    2:1 "total network reserve" 6232K 0/278581
    3:2 "network TX reserve" 212K 0/53
    4:3 "protocol TX pages" 212K 0/53
    5:2 "network RX reserve" 6020K 0/278528
    6:5 "IPv4 route cache" 5508K 0/16384
    7:5 "SKB data reserve" 512K 0/262144
    8:7 "IPv4 fragment cache" 512K 0/262144
"""

from __future__ import annotations

from emu.mm.reserve import MemReserve, ReserveRoot
from emu.mm.sizes import DST_ENTRY
from emu.net.ipfrag import IPFRAG_HIGH_THRESH
from emu.net.route import route_hash_defaults

MAX_PACKET = 65536  # "max packet 64k, double it"


def tx_reserve_pages(page_size: int = 4096) -> int:
    """TX_RESERVE_PAGES: DIV_ROUND_UP(2 * 64 KiB, PAGE_SIZE)."""
    return -(-2 * MAX_PACKET // page_size)


class NetReserve:
    """The network subtree of one host's reserve (module docstring)."""

    def __init__(self, top: ReserveRoot, *, route_max_size: int | None = None, dst_entry_size: int = DST_ENTRY,
                 ipfrag_high_thresh: int = IPFRAG_HIGH_THRESH) -> None:
        if dst_entry_size <= 0:
            raise ValueError(f"dst_entry_size must be positive, not {dst_entry_size}")
        if ipfrag_high_thresh < 0:
            raise ValueError(f"ipfrag_high_thresh must be >= 0, not {ipfrag_high_thresh}")
        self.top = top
        page_size = top.page_size
        self.page_size = page_size
        self.route = route_hash_defaults(top.ram_bytes, page_size)
        self.route_max_size = self.route.max_size if route_max_size is None else route_max_size
        if self.route_max_size < 0:
            raise ValueError(f"route_max_size must be >= 0, not {self.route_max_size}")
        self.dst_entry_size = dst_entry_size
        self.ipfrag_high_thresh = ipfrag_high_thresh
        self.sk_memalloc_socks = 0

        self.network = MemReserve("total network reserve")
        self.rx = MemReserve("network RX reserve", self.network)
        self.skb_data = MemReserve("SKB data reserve", self.rx, unit="bytes")
        self.tx = MemReserve("network TX reserve", self.network, unit="pages")
        self.tx_pages = MemReserve("protocol TX pages", self.tx, unit="pages")
        self.frag_cache = MemReserve("IPv4 fragment cache", self.skb_data, unit="bytes")
        self.route_cache = MemReserve("IPv4 route cache", self.rx, unit="objects")
        self.frag_cache.set_kmalloc(ipfrag_high_thresh, page_size)
        self.frag_cache.inputs = {"ipfrag_high_thresh": ipfrag_high_thresh, "page_size": page_size}
        self.route_cache.set_kmem_cache(self.route_max_size, dst_entry_size, page_size)
        self.route_cache.inputs = {"route_max_size": self.route_max_size,
                                   "route_max_size_default": self.route.max_size,
                                   "dst_entry_size": dst_entry_size, "page_size": page_size}
        self.tx_pages.inputs = {}

    # ---- memalloc sockets ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.network.parent is not None

    def connect(self) -> None:
        """sk_set_memalloc: the first memalloc socket hangs the network reserve under the root
        (raises ReserveError, changing nothing, if it cannot fit)."""
        if self.sk_memalloc_socks == 0:
            self.top.root.connect(self.network)
        self.sk_memalloc_socks += 1

    def disconnect(self) -> None:
        """sk_clear_memalloc: the last one removes it."""
        if self.sk_memalloc_socks <= 0:
            raise ValueError("disconnect() without connect()")
        self.sk_memalloc_socks -= 1
        if self.sk_memalloc_socks == 0:
            self.network.disconnect()

    # ---- terms other subsystems add -----------------------------------------------------------

    def add_tx_pages(self, user: str, pages: int) -> None:
        """A memalloc user (an NFS swap transport, an iSCSI session) adds its TX pages."""
        self.tx_pages.add_pages(pages)
        self.tx_pages.inputs[user] = self.tx_pages.inputs.get(user, 0) + 1

    def remove_tx_pages(self, user: str, pages: int) -> None:
        if self.tx_pages.inputs.get(user, 0) <= 0:
            raise ValueError(f"no TX reserve term of {user!r} to remove")
        self.tx_pages.add_pages(-pages)
        self.tx_pages.inputs[user] -= 1

    # ---- sysctls ------------------------------------------------------------------------------

    def set_route_max_size(self, max_size: int) -> None:
        """sysctl net.ipv4.route.max_size: resizes the route cache reserve."""
        if max_size < 0:
            raise ValueError(f"route max_size must be >= 0, not {max_size}")
        self.route_cache.set_kmem_cache(max_size, self.dst_entry_size, self.page_size)
        self.route_max_size = max_size
        self.route_cache.inputs["route_max_size"] = max_size

    def set_ipfrag_high_thresh(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"ipfrag_high_thresh must be >= 0, not {nbytes}")
        self.frag_cache.set_kmalloc(nbytes, self.page_size)
        self.ipfrag_high_thresh = nbytes
        self.frag_cache.inputs["ipfrag_high_thresh"] = nbytes
