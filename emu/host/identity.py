"""Who a host is to its server: its loopback address and, on iSCSI, its initiator name.

One host alone is 127.0.0.1 with the initiator's default name.  Host i (1-based) of a cluster is
127.0.1.i and `iqn.2026-01.org.netswap:host<i>`: every socket it opens is bound to its address, so
the server sees N distinct clients.
"""

from __future__ import annotations

from dataclasses import dataclass

CLUSTER_NET = "127.0.1."  # host i is 127.0.1.i; 127.0.0.1 stays the lone host's address
IQN_PREFIX = "iqn.2026-01.org.netswap:host"


@dataclass(frozen=True)
class HostIdentity:
    """A host's address (every socket it opens is bound to it) and its iSCSI initiator name
    (None: the initiator's default)."""

    addr: str = "127.0.0.1"
    initiator_name: str | None = None


def host_addr(i: int) -> str:
    return f"{CLUSTER_NET}{i}"


def host_label(i: int) -> str:
    return f"host{i}"


def host_identity(i: int, backend: str) -> HostIdentity:
    return HostIdentity(host_addr(i), f"{IQN_PREFIX}{i}" if backend == "iscsi" else None)
