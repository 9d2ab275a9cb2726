"""Fixtures for the network stack's integration tests: real loopback sockets, real time."""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveRoot
from emu.mm.slab import Slabs
from emu.net.stack import NetStack

sys.path.insert(0, str(Path(__file__).parent))  # nethelp


@pytest.fixture
async def make_net() -> AsyncIterator[Callable[..., Any]]:
    """make_net(policy, ram=..., **NetStack kwargs) -> a running NetStack; torn down afterwards.

    No emulated clock (cpu=None): the NIC processes frames as soon as its wires read them."""
    async with trio.open_nursery() as nursery:
        stacks: list[NetStack] = []

        async def make(policy: str = "none", ram: int = 8 << 20, **kw: Any) -> NetStack:
            zone = Zone(ram, policy=Policy(policy))
            slabs = Slabs(zone)
            reserve = ReserveRoot(zone) if policy == "v12" else None
            net = NetStack(zone, slabs, reserve=reserve, **kw)
            assert net.clock is None and net.nic.rx_usecs == 0.0
            await nursery.start(net.run)
            stacks.append(net)
            return net

        yield make
        nursery.cancel_scope.cancel()
