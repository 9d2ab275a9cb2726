"""The allocator's decision for every policy x context x gfp, and its effect."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from emu.mm.gfp import (
    GFP_ATOMIC,
    GFP_HIGHUSER,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    Gfp,
    gfp_name,
)
from emu.kernel.policy import Policy
from emu.mm.page_alloc import AllocFlags, Page, Zone, gfp_to_alloc_flags
from emu.kernel.sched import Task, TaskFlags, current, softirq, task

PF = TaskFlags.PF_MEMALLOC
KSWAPD = TaskFlags.PF_MEMALLOC | TaskFlags.PF_KSWAPD | TaskFlags.PF_KTHREAD

# context name -> (task flags, TIF_MEMDIE, in softirq)
CONTEXTS: dict[str, tuple[TaskFlags, bool, bool]] = {
    "process": (TaskFlags(0), False, False),
    "softirq": (TaskFlags(0), False, True),
    "PF_MEMALLOC": (PF, False, False),
    "PF_MEMALLOC in softirq": (PF, False, True),
    "TIF_MEMDIE": (TaskFlags(0), True, False),
    "TIF_MEMDIE in softirq": (TaskFlags(0), True, True),
    "kswapd": (KSWAPD, False, False),
    "kswapd in softirq": (KSWAPD, False, True),
}

BASE_GFPS = {
    "GFP_NOWAIT": GFP_NOWAIT,
    "GFP_ATOMIC": GFP_ATOMIC,
    "GFP_NOIO": GFP_NOIO,
    "GFP_NOFS": GFP_NOFS,
    "GFP_KERNEL": GFP_KERNEL,
    "GFP_HIGHUSER": GFP_HIGHUSER,
}
MODIFIERS = {
    "": Gfp(0),
    "|__GFP_MEMALLOC": Gfp.MEMALLOC,
    "|__GFP_EMERGENCY": Gfp.EMERGENCY,
    "|__GFP_NOMEMALLOC": Gfp.NOMEMALLOC,
    "|__GFP_MEMALLOC|__GFP_NOMEMALLOC": Gfp.MEMALLOC | Gfp.NOMEMALLOC,
}

# The policy table (README, "Allocation"), written out: which contexts get ALLOC_NO_WATERMARKS with a plain gfp.
ENTITLED_PLAIN = {
    # 2.6.22: PF_MEMALLOC tasks and OOM victims, never in interrupt or softirq.
    Policy.NONE: {"PF_MEMALLOC", "TIF_MEMDIE", "kswapd"},
    # v12: as none, plus PF_MEMALLOC in softirq (TIF_MEMDIE still not in softirq).
    Policy.V12: {"PF_MEMALLOC", "TIF_MEMDIE", "kswapd", "PF_MEMALLOC in softirq", "kswapd in softirq"},
    # 3.6: PF_MEMALLOC in softirq; PF_MEMALLOC/TIF_MEMDIE outside interrupt.
    Policy.PFMEMALLOC: {"PF_MEMALLOC", "TIF_MEMDIE", "kswapd", "PF_MEMALLOC in softirq", "kswapd in softirq"},
}


def expected_entitled(policy: Policy, ctx: str, mod: Gfp) -> bool:
    if mod & Gfp.NOMEMALLOC:
        return False  # overrides everything, in every policy
    if mod & Gfp.MEMALLOC and policy is not Policy.NONE:
        return True  # __GFP_MEMALLOC (3.6; v12's later name for __GFP_EMERGENCY): any context
    if mod & Gfp.EMERGENCY and policy is Policy.V12:
        return True  # __GFP_EMERGENCY exists only in the v12 series
    return ctx in ENTITLED_PLAIN[policy]


@contextlib.contextmanager
def in_context(ctx: str) -> Iterator[Task]:
    flags, memdie, in_softirq = CONTEXTS[ctx]
    with task(ctx.replace(" ", "_"), flags, tif_memdie=memdie) as t:
        if in_softirq:
            with softirq():
                yield t
        else:
            yield t


CELLS = [
    (policy, ctx, gname, mname)
    for policy in Policy
    for ctx in CONTEXTS
    for gname in BASE_GFPS
    for mname in MODIFIERS
]


@pytest.mark.parametrize("policy,ctx,gname,mname", CELLS)
def test_alloc_flags_cell(policy: Policy, ctx: str, gname: str, mname: str) -> None:
    gfp = BASE_GFPS[gname] | MODIFIERS[mname]
    with in_context(ctx) as t:
        flags = gfp_to_alloc_flags(gfp, t, policy)
    assert bool(flags & AllocFlags.NO_WATERMARKS) == expected_entitled(policy, ctx, MODIFIERS[mname])
    assert bool(flags & AllocFlags.HIGH) == (gname == "GFP_ATOMIC")
    assert bool(flags & AllocFlags.HARDER) == (gname in ("GFP_ATOMIC", "GFP_NOWAIT"))
    assert flags & AllocFlags.WMARK_MIN


def _drain(zone: Zone, target: int) -> list[Page]:
    held: list[Page] = []
    with task("drain", PF):
        while zone.nr_free > target:
            pages = zone.alloc_pages(GFP_KERNEL)
            assert pages is not None
            held.extend(pages)
    return held


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("ctx", list(CONTEXTS))
@pytest.mark.parametrize("mname", list(MODIFIERS))
def test_allocation_below_every_discount(policy: Policy, ctx: str, mname: str) -> None:
    """With free pages under even the GFP_ATOMIC floor, exactly the entitled contexts get a page,
    and the page is tagged pfmemalloc; the others get None."""
    zone = Zone(4 << 20, policy=policy)  # min 64 pages: atomic floor 24
    _drain(zone, 10)
    gfp = GFP_ATOMIC | MODIFIERS[mname]
    with in_context(ctx):
        pages = zone.alloc_pages(gfp)
    if expected_entitled(policy, ctx, MODIFIERS[mname]):
        assert pages is not None and pages[0].pfmemalloc
        assert zone.nr_free == 9
    else:
        assert pages is None
        assert zone.nr_free == 10


def test_gfp_str_uses_kernel_names() -> None:
    assert str(Gfp.HIGH | Gfp.MEMALLOC) == "__GFP_HIGH|__GFP_MEMALLOC"
    assert str(GFP_KERNEL) == "__GFP_WAIT|__GFP_IO|__GFP_FS"
    assert str(GFP_NOWAIT) == "0"
    assert f"{GFP_ATOMIC}" == "__GFP_HIGH"
    assert gfp_name(GFP_NOIO | Gfp.MEMALLOC) == "GFP_NOIO|__GFP_MEMALLOC"
    assert gfp_name(GFP_HIGHUSER) == "GFP_HIGHUSER"
    assert GFP_HIGHUSER == GFP_KERNEL | Gfp.HARDWALL | Gfp.HIGHMEM
    assert GFP_NOFS == Gfp.WAIT | Gfp.IO and GFP_NOIO == Gfp.WAIT


def test_policy_parses_and_rejects() -> None:
    assert Policy("pfmemalloc") is Policy.PFMEMALLOC
    assert str(Policy.V12) == "v12"
    with pytest.raises(ValueError):
        Policy("v13")
    with pytest.raises(ValueError):
        Zone(4 << 20, policy="bogus")


def test_current_defaults_to_swapper_and_task_nests() -> None:
    assert current().comm == "swapper"
    with task("a") as a:
        assert current() is a
        with task("b", PF) as b:
            assert current() is b and b.flags & PF
        assert current() is a
    assert current().comm == "swapper"


def test_reserve_sizes_in_kib_are_exact_with_small_pages() -> None:
    from emu.mm.reserve import ReserveRoot
    from emu.mm.sizes import K
    from emu.net.reserve import NetReserve
    from emu.swapdev.nfs import rpc_reserve_pages

    assert K(3, 512) == 1 and K(2, 512) == 1 and K(1, 4096) == 4
    root = ReserveRoot(ram_bytes=128 << 20, page_size=512)
    net = NetReserve(root)
    net.add_tx_pages("nfs_swappers", rpc_reserve_pages(512))
    net.connect()
    first = root.reserve_info().splitlines()[0]
    kib = int(first.split('"')[2].split()[0].rstrip("K"))
    assert kib == K(root.pages, 512) > 0
