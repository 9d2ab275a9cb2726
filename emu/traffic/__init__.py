"""Background traffic built with scapy and sent on loopback.

Public API (importing it does not import scapy):

    from emu.traffic import TrafficSpec, InjectStats, inject, run
"""

from __future__ import annotations

from emu.traffic.api import inject, make_spec, run
from emu.traffic.profiles import Profile
from emu.traffic.rawsend import NeedsRawError, have_cap_net_raw
from emu.traffic.spec import InjectStats, SpecError, TrafficSpec
from emu.traffic.target import TargetError

__all__ = ["InjectStats", "NeedsRawError", "Profile", "SpecError", "TargetError", "TrafficSpec", "have_cap_net_raw", "inject", "make_spec", "run"]
