"""Where traffic may go: loopback (127.0.0.0/8) only, checked before any socket or packet exists.

Everything here is pure: it parses and validates text and addresses and never touches the network,
so a wrong check could at worst raise, never send.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
DEFAULT_SPOOF = "127.64.0.0/10"


class TargetError(ValueError):
    """A destination or source range outside loopback, or one that does not parse.

    `param` names the setting at fault ("to", "host", "ports", "spoof") so the CLI can name its flag.
    """

    def __init__(self, message: str, param: str = "to") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, order=True)
class Target:
    host: str  # dotted-quad IPv4 inside 127.0.0.0/8
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


def check_loopback(host: str, param: str = "host") -> str:
    """Return `host` as a dotted quad if it is an IPv4 address inside 127.0.0.0/8, else raise.

    Names are not resolved (no DNS, no /etc/hosts surprises); "localhost" means 127.0.0.1.
    """
    text = host.strip()
    if text.lower() == "localhost":
        text = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise TargetError(
            f"{host!r} is not an IPv4 address; only literal addresses in {LOOPBACK} are allowed", param
        ) from None
    if addr.version != 4:
        raise TargetError(f"{host} is not IPv4; traffic is injected on IPv4 loopback ({LOOPBACK}) only", param)
    if addr not in LOOPBACK:
        raise TargetError(f"refusing {host}: only loopback addresses ({LOOPBACK}) may be targets", param)
    return str(addr)


def check_port(port: object, param: str = "ports") -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        try:
            port = int(str(port).strip())
        except ValueError:
            raise TargetError(f"port {port!r} is not a number", param) from None
    if not 1 <= port <= 65535:
        raise TargetError(f"port {port} is outside 1..65535", param)
    return port


def parse_targets(text: str) -> tuple[Target, ...]:
    """Parse `127.0.0.1:9000[,9001...]` (also `HOST:P1,HOST2:P2`) into targets, validated.

    A bare port after a comma reuses the previous host.
    """
    targets: list[Target] = []
    host: str | None = None
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise TargetError(f"empty entry in {text!r}; expected HOST:PORT[,PORT...]", "to")
        if ":" in item:
            h, _, p = item.rpartition(":")
            host = check_loopback(h, "to")
        elif _looks_like_host(item):
            raise TargetError(f"{item!r} has no port; expected HOST:PORT[,PORT...] e.g. {item}:9000", "to")
        elif host is None:
            raise TargetError(f"{item!r} has no host; expected HOST:PORT[,PORT...] e.g. 127.0.0.1:{item}", "to")
        else:
            p = item
        targets.append(Target(host, check_port(p, "to")))
    return tuple(dict.fromkeys(targets))  # de-duplicated, order kept


def _looks_like_host(item: str) -> bool:
    """An entry that names a host rather than a port: a dotted address or any name."""
    return not item.isdigit() and ("." in item or item.isidentifier() or item.lower() == "localhost")


def parse_spoof(cidr: str) -> ipaddress.IPv4Network:
    """A source range for spoofed packets: must lie entirely inside 127.0.0.0/8."""
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise TargetError(f"--spoof {cidr!r} is not a CIDR range like {DEFAULT_SPOOF}", "spoof") from None
    if net.version != 4 or not net.subnet_of(LOOPBACK):  # type: ignore[arg-type]
        raise TargetError(f"refusing spoof range {cidr}: it must lie inside {LOOPBACK}", "spoof")
    return net  # type: ignore[return-value]


def spread_sources(net: ipaddress.IPv4Network, n: int) -> list[str]:
    """`n` distinct source addresses spread over `net` (fewer if the range is smaller).

    Steps through the range with an odd stride near the golden ratio of its size, so the addresses
    differ in their high bits too (a route cache hashes on them) and never repeat before n.
    """
    base = int(net.network_address)
    size = net.num_addresses
    if size > 2:  # skip the range's own network and broadcast addresses
        base, size = base + 1, size - 2
    n = max(1, min(n, size))
    stride = int(size * 0.6180339887) | 1
    while _gcd(stride, size) != 1:
        stride += 2
    return [str(ipaddress.IPv4Address(base + (i * stride) % size)) for i in range(n)]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
