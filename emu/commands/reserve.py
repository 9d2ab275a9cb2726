"""`netswap reserve`: size the v12 memory reserve tree, as /proc/reserve_info shows it.

With its defaults (128 MiB of RAM, 4 KiB pages, one NFS swapper) it reproduces the sample that
Peter Zijlstra published in mm/reserve.c (2008) to the kilobyte.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from emu.kernel.policy import Policy
from emu.mm.page_alloc import default_min_free_kbytes
from emu.mm.reserve import (
    ReserveError,
    ReserveRoot,
)
from emu.mm.sizes import DST_ENTRY, RPC_MAX_SLOT_TABLE, RPC_MIN_SLOT_TABLE, RPC_RQST
from emu.mm.slab import calculate_slab_order, hwcache_align, kmalloc_size_class
from emu.net.ipfrag import IPFRAG_HIGH_THRESH
from emu.net.reserve import NetReserve, tx_reserve_pages
from emu.swapdev.nfs import rpc_reserve_pages
from emu.util.cli import OneLineCommand, size_option


# Which flags feed each node of the tree (aggregates are sums of their children).
TERM_FLAGS = {
    "total reserve": "sum",
    "total network reserve": "sum",
    "network TX reserve": "sum",
    "protocol TX pages": "--nfs-swappers --iscsi-sessions --rpc-slot-table --rpc-rqst-size --page-size",
    "network RX reserve": "sum",
    "IPv4 route cache": "--route-max-size (default from --ram) --dst-entry-size --page-size",
    "SKB data reserve": "sum",
    "IPv4 fragment cache": "--ipfrag-high-thresh --page-size",
}


def _fmt_kib(pages: int, page_size: int) -> str:
    kib = pages * page_size // 1024
    return f"{kib:,} KiB" if kib < 10240 else f"{kib / 1024:,.1f} MiB"


def build(
    *,
    ram: int,
    page_size: int,
    route_max_size: int | None,
    dst_entry_size: int,
    ipfrag_high_thresh: int,
    nfs_swappers: int,
    iscsi_sessions: int,
    rpc_slot_table: int,
    rpc_rqst_size: int,
) -> HostReserve:
    """The tree of a host with these inputs and at least one memalloc socket (if any swapper)."""
    root = ReserveRoot(ram_bytes=ram, page_size=page_size)
    net = NetReserve(root, route_max_size=route_max_size, dst_entry_size=dst_entry_size,
                     ipfrag_high_thresh=ipfrag_high_thresh)
    # Protocol terms first (the network subtree is not yet under the root), then connect: the
    # connection is what makes the pages count against RAM.
    for _ in range(nfs_swappers):
        net.add_tx_pages("nfs_swappers", rpc_reserve_pages(page_size, rpc_slot_table, rpc_rqst_size))
    for _ in range(iscsi_sessions):
        net.add_tx_pages("iscsi_sessions", tx_reserve_pages(page_size))
    if nfs_swappers + iscsi_sessions > 0:
        net.connect()
    return HostReserve(root, net, nfs_swappers, iscsi_sessions, rpc_slot_table, rpc_rqst_size)


class HostReserve:
    """The tree `build` made, with the inputs the table explains."""

    def __init__(self, root: ReserveRoot, net: NetReserve, nfs_swappers: int, iscsi_sessions: int,
                 rpc_slot_table: int, rpc_rqst_size: int) -> None:
        self.root_reserve = root
        self.net = net
        self.root = root.root
        self.page_size = root.page_size
        self.route = net.route
        self.route_max_size = net.route_max_size
        self.dst_entry_size = net.dst_entry_size
        self.ipfrag_high_thresh = net.ipfrag_high_thresh
        self.route_cache, self.frag_cache, self.tx_pages = net.route_cache, net.frag_cache, net.tx_pages
        self.nr_nfs_swappers = nfs_swappers
        self.nr_iscsi_sessions = iscsi_sessions
        self.rpc_slot_table = rpc_slot_table
        self.rpc_rqst_size = rpc_rqst_size

    def nodes(self) -> list[Any]:
        return self.root_reserve.nodes()

    def reserve_info(self) -> str:
        return self.root_reserve.reserve_info()


def explain(tree: HostReserve) -> dict[str, str]:
    """For each node, the formula and the inputs that made its size."""
    ps = tree.page_size
    dst = hwcache_align(tree.dst_entry_size)
    order, num, off_slab = calculate_slab_order(dst, ps)
    rh = tree.route
    rq_class = kmalloc_size_class(tree.rpc_rqst_size) if tree.rpc_rqst_size <= 8192 else 0
    route_src = (
        f"--route-max-size {tree.route_max_size}"
        if tree.route_max_size != rh.max_size
        else f"ip_rt_max_size = {rh.buckets} buckets x 16 (from --ram: {rh.mempages} pages >> "
        f"({rh.scale} - PAGE_SHIFT), min PAGE_SIZE/8, pow2)"
    )
    p_route = tree.route_cache.pages
    P = p_route - 1 - (p_route.bit_length() - 1) if p_route else 0
    return {
        "total reserve": "sum of the children; sets pages_emerg",
        "total network reserve": "hung under the root while a memalloc socket exists",
        "network TX reserve": "sum of the TX terms",
        "protocol TX pages": (
            f"--nfs-swappers {tree.nr_nfs_swappers} x RPC_RESERVE_PAGES {rpc_reserve_pages(ps, tree.rpc_slot_table, tree.rpc_rqst_size)}"
            f" (kmalloc estimate of --rpc-slot-table {tree.rpc_slot_table} rpc_rqst of --rpc-rqst-size "
            f"{tree.rpc_rqst_size} in size-{rq_class} + TX_RESERVE_PAGES {tx_reserve_pages(ps)})"
            f" + --iscsi-sessions {tree.nr_iscsi_sessions} x TX_RESERVE_PAGES {tx_reserve_pages(ps)}"
        ),
        "network RX reserve": "route cache + SKB data",
        "IPv4 route cache": (
            f"kmem_cache estimate of {tree.route_max_size} objects of --dst-entry-size "
            f"{tree.dst_entry_size} ({dst} aligned, {num}/slab of {1 << order} page(s), "
            f"{'off' if off_slab else 'on'}-slab): P={P}, P+1+ilog2(P); {route_src}"
        ),
        "SKB data reserve": "sum of its children (RX emergency skbs charge here, in bytes)",
        "IPv4 fragment cache": f"kmalloc estimate of --ipfrag-high-thresh {tree.ipfrag_high_thresh} bytes: ceil(2 x bytes / --page-size {ps})",
    }


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ram", default="128M", show_default=True, callback=size_option(1, "must be positive"), metavar="SIZE",
              help="RAM of the host (sizes the route hash). 128M is the era's machine of the published sample.")
@click.option("--page-size", default=4096, show_default=True, type=int, help="PAGE_SIZE in bytes (a power of two, 512..65536).")
@click.option("--route-max-size", type=int, default=None, metavar="N",
              help="net.ipv4.route.max_size (route cache entries). Default: derived from --ram as ip_rt_init() does.")
@click.option("--dst-entry-size", default=DST_ENTRY, show_default=True, type=int, help="Bytes of one route cache entry (ip_dst_cache object).")
@click.option("--ipfrag-high-thresh", default=IPFRAG_HIGH_THRESH, show_default=True, type=int,
              help="net.ipv4.ipfrag_high_thresh in bytes.")
@click.option("--nfs-swappers", default=1, show_default=True, type=int, help="NFS swap transports (each adds RPC_RESERVE_PAGES).")
@click.option("--iscsi-sessions", default=0, show_default=True, type=int, help="iSCSI swap sessions (each adds TX_RESERVE_PAGES).")
@click.option("--rpc-slot-table", default=RPC_MAX_SLOT_TABLE, show_default=True, type=int, help="RPC slots per transport, 2..128 (RPC_MIN_SLOT_TABLE..RPC_MAX_SLOT_TABLE).")
@click.option("--rpc-rqst-size", default=RPC_RQST, show_default=True, type=int, help="Bytes of one struct rpc_rqst (kmalloc'ed).")
@click.option("--min-free-kbytes", type=int, default=None, help="vm.min_free_kbytes for the watermarks shown. Default: Linux's int_sqrt(lowmem_kb*16).")
@click.option("--policy", "policy_name", type=click.Choice([p.value for p in Policy]), default="v12", show_default=True,
              help="Whose reserve the last line states. v12 sizes this tree; pfmemalloc (3.6) has none (the tree is shown for comparison; its reserve is the min watermark); none reserves nothing for RX.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def reserve(
    ram: int,
    page_size: int,
    route_max_size: int | None,
    dst_entry_size: int,
    ipfrag_high_thresh: int,
    nfs_swappers: int,
    iscsi_sessions: int,
    rpc_slot_table: int,
    rpc_rqst_size: int,
    min_free_kbytes: int | None,
    policy_name: str,
    as_json: bool,
) -> None:
    """Size the v12 memory reserve tree and print it as /proc/reserve_info does.

    Each line reads `id:parent "name" <pages in K>K usage/limit`, limits in the node's unit
    (objects for a kmem_cache node, bytes for a kmalloc node, pages for a pages node). A table
    then names the inputs of every term; every input is a flag. With the defaults the output
    matches the sample Peter Zijlstra published in mm/reserve.c (2008) to the kilobyte.

    \b
    Examples:
      netswap reserve                           # the published sample (128M, one NFS swapper)
      netswap reserve --ram 16M --json          # what a 16 MiB emulated host reserves
      netswap reserve --ram 8G --route-max-size 100000   # the field fix for a huge route cache
    """
    policy = Policy(policy_name)
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise click.BadParameter(f"{page_size}: must be a power of two from 512 to 65536", param_hint="--page-size")
    for flag, value, minimum in (
        ("--dst-entry-size", dst_entry_size, 1),
        ("--rpc-rqst-size", rpc_rqst_size, 1),
        ("--route-max-size", route_max_size if route_max_size is not None else 0, 0),
        ("--ipfrag-high-thresh", ipfrag_high_thresh, 0),
        ("--nfs-swappers", nfs_swappers, 0),
        ("--iscsi-sessions", iscsi_sessions, 0),
    ):
        if value < minimum:
            raise click.BadParameter(f"{value}: must be >= {minimum}", param_hint=flag)
    if not RPC_MIN_SLOT_TABLE <= rpc_slot_table <= RPC_MAX_SLOT_TABLE:  # sunrpc's slot_table_entries range
        raise click.BadParameter(f"{rpc_slot_table}: a transport has {RPC_MIN_SLOT_TABLE} to {RPC_MAX_SLOT_TABLE} slots",
                                 param_hint="--rpc-slot-table")
    if dst_entry_size > page_size * 8:
        raise click.BadParameter(f"{dst_entry_size}: larger than a slab can hold", param_hint="--dst-entry-size")
    if rpc_rqst_size > 8192:
        raise click.BadParameter(f"{rpc_rqst_size}: rpc_rqst is kmalloc'ed, at most 8192", param_hint="--rpc-rqst-size")
    nr_pages = ram // page_size
    if nr_pages < 16:
        raise click.BadParameter(f"{ram} bytes is fewer than 16 pages of {page_size}", param_hint="--ram")
    lowmem_kb = nr_pages * page_size // 1024
    mfk = default_min_free_kbytes(lowmem_kb) if min_free_kbytes is None else min_free_kbytes
    if mfk < 0 or mfk * 1024 // page_size >= nr_pages:
        raise click.BadParameter(f"{mfk}: must be >= 0 and below RAM ({lowmem_kb} KiB)", param_hint="--min-free-kbytes")

    try:
        tree = build(
            ram=ram,
            page_size=page_size,
            route_max_size=route_max_size,
            dst_entry_size=dst_entry_size,
            ipfrag_high_thresh=ipfrag_high_thresh,
            nfs_swappers=nfs_swappers,
            iscsi_sessions=iscsi_sessions,
            rpc_slot_table=rpc_slot_table,
            rpc_rqst_size=rpc_rqst_size,
        )
    except ReserveError:
        t = build(ram=1 << 62, page_size=page_size, route_max_size=route_max_size if route_max_size is not None else
                  NetReserve(ReserveRoot(ram_bytes=ram, page_size=page_size)).route.max_size,
                  dst_entry_size=dst_entry_size, ipfrag_high_thresh=ipfrag_high_thresh, nfs_swappers=nfs_swappers,
                  iscsi_sessions=iscsi_sessions, rpc_slot_table=rpc_slot_table, rpc_rqst_size=rpc_rqst_size)
        terms = {"--route-max-size": t.route_cache.pages, "--ipfrag-high-thresh": t.frag_cache.pages,
                 "--nfs-swappers/--iscsi-sessions": t.tx_pages.pages}
        worst = max(terms, key=lambda k: terms[k])
        raise click.BadParameter(
            f"the reserve ({_fmt_kib(t.root.pages, page_size)}) is not smaller than RAM "
            f"({_fmt_kib(nr_pages, page_size)}); the largest term is {worst} "
            f"({_fmt_kib(terms[worst], page_size)}): lower it or raise --ram",
            param_hint="--ram",
        ) from None

    pages_min = mfk * 1024 // page_size
    wm = {"min": pages_min, "low": pages_min + pages_min // 4, "high": pages_min + pages_min // 2}
    if policy is Policy.V12 and tree.root.pages + wm["high"] >= nr_pages:
        raise click.BadParameter(
            f"the reserve ({_fmt_kib(tree.root.pages, page_size)}) plus the high watermark "
            f"({_fmt_kib(wm['high'], page_size)}) does not fit in RAM ({_fmt_kib(nr_pages, page_size)}); "
            f"lower --route-max-size (route cache term {_fmt_kib(tree.route_cache.pages, page_size)}) or raise --ram",
            param_hint="--ram",
        )
    why = explain(tree)
    nodes = [
        {
            "id": i,
            "parent": p,
            "name": n.name,
            "pages": n.pages,
            "kbytes": n.pages * page_size // 1024,
            "usage": n.usage,
            "limit": n.limit,
            "unit": n.unit or "mixed",
            "inputs": dict(n.inputs),
            "formula": why.get(n.name, ""),
        }
        for i, p, n in tree.nodes()
    ]
    total = tree.root.pages
    if policy is Policy.V12:
        reserve_pages = total
        meaning = "pages_emerg: above every watermark, reachable only with ALLOC_NO_WATERMARKS"
    elif policy is Policy.PFMEMALLOC:
        reserve_pages = wm["min"]
        meaning = "no accounting: the reserve is the min watermark (raise vm.min_free_kbytes)"
    else:
        reserve_pages = 0
        meaning = "the receive path never reaches the reserve"
    out: dict[str, Any] = {
        "inputs": {
            "ram": ram,
            "page_size": page_size,
            "route_max_size": tree.route_max_size,
            "route_max_size_derived": route_max_size is None,
            "dst_entry_size": dst_entry_size,
            "ipfrag_high_thresh": ipfrag_high_thresh,
            "nfs_swappers": nfs_swappers,
            "iscsi_sessions": iscsi_sessions,
            "rpc_slot_table": rpc_slot_table,
            "rpc_rqst_size": rpc_rqst_size,
            "min_free_kbytes": mfk,
            "policy": policy.value,
        },
        "route_hash": {
            "buckets": tree.route.buckets,
            "gc_thresh": tree.route.gc_thresh,
            "max_size": tree.route.max_size,
            "scale": tree.route.scale,
        },
        "reserve_info": tree.reserve_info(),
        "nodes": nodes,
        "total_pages": total,
        "total_kbytes": total * page_size // 1024,
        "ram_pages": nr_pages,
        "fraction_of_ram": total / nr_pages,
        "watermarks": wm,
        "policy_reserve_pages": reserve_pages,
        "policy_reserve_meaning": meaning,
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    console = Console()
    console.print("[bold]/proc/reserve_info[/bold]", highlight=False)
    console.print(tree.reserve_info().rstrip(), highlight=False, markup=False)
    table = Table(title=f"reserve tree for {_fmt_kib(nr_pages, page_size)} RAM, {page_size}-byte pages")
    # the inputs of each term are listed under the table, so it fits 80 columns
    for col in ("id", "node", "pages", "size", "limit", "unit"):
        table.add_column(col, justify="right" if col in ("id", "pages", "size", "limit") else "left", no_wrap=True)
    for n in nodes:
        depth = 0
        p = n["parent"]
        while p:
            depth += 1
            p = nodes[p - 1]["parent"]
        table.add_row(str(n["id"]), "  " * max(0, depth - 1) + n["name"], f"{n['pages']:,}",
                      _fmt_kib(n["pages"], page_size), f"{n['limit']:,}", n["unit"])
    console.print(table)
    console.print("[bold]inputs of each term[/bold] (every one a flag)", highlight=False)
    for n in nodes:
        flags = TERM_FLAGS.get(n["name"], "")
        if flags and flags != "sum":
            console.print(f"  {n['id']} {n['name']}: {' '.join(flags.split())}", highlight=False, markup=False,
                          soft_wrap=True)
    console.print("[bold]how each term is computed[/bold]", highlight=False)
    for n in nodes:
        console.print(f"  {n['id']} {n['name']}: {n['formula']}", highlight=False, markup=False, soft_wrap=True)
    frac = 100 * total / nr_pages
    console.print(
        f"total reserve {total:,} pages = {_fmt_kib(total, page_size)} = {frac:.1f}% of RAM; "
        f"watermarks min/low/high {wm['min']}/{wm['low']}/{wm['high']} pages (min_free_kbytes {mfk})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"policy {policy}: reserve {reserve_pages:,} pages: {meaning}", highlight=False, soft_wrap=True)
    if policy is Policy.V12:
        console.print(
            f"with pages_emerg the zone keeps min/low/high at {wm['min'] + total}/{wm['low'] + total}/"
            f"{wm['high'] + total} pages free for everyone not entitled to the reserve",
            highlight=False,
            soft_wrap=True,
        )
    if frac > 25:
        console.print(
            f"[yellow]warning:[/yellow] the reserve is {frac:.0f}% of RAM; the route cache term alone is "
            f"{_fmt_kib(tree.route_cache.pages, page_size)}: consider --route-max-size",
            highlight=False,
        )
