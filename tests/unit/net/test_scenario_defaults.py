"""A scenario's [host] defaults are the network stack's: emu.scenario writes the numbers out
(it may not import emu.net), and this keeps the two equal."""

from __future__ import annotations

from emu.net.ipfrag import IPFRAG_HIGH_THRESH, IPFRAG_LOW_THRESH, IPFRAG_TIME
from emu.net.sock import RMEM_DEFAULT
from emu.scenario import HostSection


def test_host_section_defaults_are_the_stacks() -> None:
    h = HostSection()
    assert h.ipfrag_high_thresh == IPFRAG_HIGH_THRESH
    assert h.ipfrag_low_thresh == IPFRAG_LOW_THRESH
    assert h.ipfrag_time == IPFRAG_TIME
    assert h.rmem_default == RMEM_DEFAULT
