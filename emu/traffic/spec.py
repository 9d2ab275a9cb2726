"""What to inject (`TrafficSpec`, which a scenario's TOML table maps onto) and what happened
(`InjectStats`).

`TrafficSpec.validate()` is pure: it checks every address against loopback before any socket
exists or any packet is built.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from emu.traffic.profiles import DEFAULT_SIZE, IPV4_MAX_PAYLOAD, Profile
from emu.traffic.target import DEFAULT_SPOOF, Target, TargetError, check_loopback, check_port, parse_spoof, parse_targets

MAX_DURATION = 3600.0
MAX_RATE = 10_000_000.0
MAX_CONNECTIONS = 1024
MAX_DISTINCT = 65536
DEFAULT_DURATION = 5.0
DEFAULT_RATE = 10_000.0

Method = Literal["auto", "raw", "socket"]


class SpecError(ValueError):
    """A setting out of range. `param` is the TrafficSpec field (the CLI flag is --param)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TrafficSpec:
    """Background traffic, bounded by rate, duration and count. Units: one *message* is a UDP
    datagram (udp-flood, frag: one datagram = several IP fragments) or one TCP write of `size` bytes.

    - `profile`: "udp-flood" | "frag" | "tcp-stream" | "mixed"
    - `host`, `ports`: destinations (`host` must be in 127.0.0.0/8)
    - `rate`: messages/s (None: as fast as possible); `duration`: seconds (always finite);
      `count`: messages (None: until the duration ends)
    - `spoof`: CIDR inside 127.0.0.0/8 to take UDP source addresses from (None: no spoofing, and
      `udp-flood` then goes over an ordinary socket, no root needed); for tcp-stream the connections
      bind() their sources in this range (real addresses, every one of 127/8 is local)
    - `size`: payload bytes per message (None: the profile's default)
    - `incomplete`: frag/mixed leave out the last fragment of each datagram
    - `fragsize`: IP payload bytes per fragment (1480: a 1500-byte MTU)
    - `connections`: TCP connections for tcp-stream/mixed
    - `distinct`: distinct packets built (sources x IP IDs) before the pool repeats
    - `method`: "auto" (raw socket when spoofing or fragmenting, else ordinary sockets), "raw", "socket"
    """

    profile: Profile | str = Profile.UDP_FLOOD
    ports: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    rate: float | None = DEFAULT_RATE
    duration: float = DEFAULT_DURATION
    count: int | None = None
    spoof: str | None = DEFAULT_SPOOF
    size: int | None = None
    incomplete: bool = False
    fragsize: int = 1480
    connections: int = 8
    distinct: int = 1024
    method: Method = "auto"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> TrafficSpec:
        """From a scenario's TOML table: keys are the field names (dashes allowed), plus
        `to = "127.0.0.1:9000,9001"` as an alternative to host/ports, and `spoof = false` for None.
        `overrides` (e.g. ports=(port,) known only at run time) win over the table. Validated,
        except that a table without ports and no ports override is accepted: pass them later
        with .replace(ports=...); run() and inject() validate again."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            k = key.replace("-", "_")
            if k == "to":
                targets = parse_targets(str(value))
                hosts = {t.host for t in targets}
                if len(hosts) != 1:
                    raise TargetError("a TrafficSpec has one host; give one entry per host", "to")
                kw["host"], kw["ports"] = hosts.pop(), tuple(t.port for t in targets)
            elif k not in names:
                raise SpecError(f"unknown traffic setting {key!r} (known: to, {', '.join(sorted(names))})", k)
            elif k == "spoof" and value is False:
                kw[k] = None
            elif k == "ports":
                kw[k] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            else:
                kw[k] = value
        kw.update(overrides)
        spec = cls(**kw)
        if not spec.ports:
            spec.replace(ports=(9,)).validate()  # everything but the ports, which come later
            return spec
        return spec.validate()

    def to_mapping(self) -> dict[str, Any]:
        """The inverse of from_mapping (JSON/TOML-friendly: profile as text, ports as a list)."""
        d = dataclasses.asdict(self)
        d["profile"], d["ports"] = str(self.profile), list(self.ports)
        return d

    def replace(self, **changes: Any) -> TrafficSpec:
        return dataclasses.replace(self, **changes)

    # ---- validation (pure: no sockets, no scapy) ----------------------------------------------
    def validate(self) -> TrafficSpec:
        """Return a normalised copy, or raise TargetError/SpecError. Addresses first."""
        host = check_loopback(self.host, "host")
        if not self.ports:
            raise TargetError("no destination ports given", "ports")
        ports = tuple(dict.fromkeys(check_port(p, "ports") for p in self.ports))
        spoof = str(parse_spoof(self.spoof)) if self.spoof is not None else None
        try:
            profile = Profile(self.profile)
        except ValueError:
            raise SpecError(f"unknown profile {self.profile!r}; choose from {', '.join(p.value for p in Profile)}", "profile") from None
        if self.rate is not None and not (0 < self.rate <= MAX_RATE):
            raise SpecError(f"rate must be > 0 and <= {MAX_RATE:,.0f} messages/s (or None for unpaced)", "rate")
        if not (0 < self.duration <= MAX_DURATION):
            raise SpecError(f"duration must be > 0 and <= {MAX_DURATION:.0f} s: every flood stops by itself", "duration")
        if self.count is not None and self.count < 1:
            raise SpecError("count must be at least 1 (leave it out to send until the duration ends)", "count")
        size = DEFAULT_SIZE[profile] if self.size is None else self.size
        if not 1 <= size <= IPV4_MAX_PAYLOAD:
            raise SpecError(f"size must be 1..{IPV4_MAX_PAYLOAD} bytes", "size")
        if self.fragsize % 8 or not 64 <= self.fragsize <= 65528:
            raise SpecError("fragsize must be a multiple of 8 in 64..65528 (IP payload bytes per fragment)", "fragsize")
        if profile is Profile.FRAG and size + 8 <= self.fragsize:
            raise SpecError(f"frag needs size > fragsize - 8 = {self.fragsize - 8} so the datagram is cut in pieces", "size")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise SpecError(f"connections must be 1..{MAX_CONNECTIONS}", "connections")
        if not 1 <= self.distinct <= MAX_DISTINCT:
            raise SpecError(f"distinct must be 1..{MAX_DISTINCT}", "distinct")
        if self.method not in ("auto", "raw", "socket"):
            raise SpecError("method must be auto, raw or socket", "method")
        if self.method == "socket" and profile in (Profile.FRAG, Profile.MIXED):
            raise SpecError(f"{profile} needs a raw socket (it crafts IP fragments); ordinary sockets cannot", "method")
        if self.method == "socket" and profile is Profile.UDP_FLOOD and spoof is not None:
            raise SpecError("ordinary sockets cannot spoof sources: set spoof=None (--no-spoof)", "spoof")
        if self.incomplete and profile not in (Profile.FRAG, Profile.MIXED):
            raise SpecError("incomplete applies to the frag and mixed profiles only", "incomplete")
        return dataclasses.replace(self, profile=profile, host=host, ports=ports, spoof=spoof, size=size, rate=None if self.rate is None else float(self.rate), duration=float(self.duration))

    # ---- derived ------------------------------------------------------------------------------
    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(Target(self.host, p) for p in self.ports)

    @property
    def needs_raw(self) -> bool:
        """True when this spec crafts IP headers (spoofed sources, fragments): root/CAP_NET_RAW."""
        profile = Profile(self.profile)
        if profile is Profile.TCP_STREAM:
            return False
        if profile is Profile.UDP_FLOOD:
            return self.method == "raw" or (self.method == "auto" and self.spoof is not None)
        return True

    def without_raw(self) -> TrafficSpec:
        """The fallback without privileges: udp-flood, no spoofing, over ordinary sockets."""
        size = self.size if Profile(self.profile) in (Profile.UDP_FLOOD, Profile.MIXED) else None
        return dataclasses.replace(self, profile=Profile.UDP_FLOOD, spoof=None, incomplete=False, method="socket", size=size).validate()

    def spoof_network(self) -> ipaddress.IPv4Network | None:
        return parse_spoof(self.spoof) if self.spoof is not None else None


@dataclass
class InjectStats:
    """What a run did. `sent` counts messages (datagrams, or TCP writes); `packets` IP packets put on
    the wire by us (fragments count one each; TCP segments are the kernel's and not counted)."""

    profile: str
    method: str  # "raw", "socket", or "raw+tcp" for mixed
    sent: int = 0
    packets: int = 0
    bytes: int = 0
    errors: int = 0
    elapsed: float = 0.0
    connections: int = 0  # TCP connections established
    refused: int = 0  # TCP connections that could not be made
    first_error: str | None = None
    stopped: str = ""  # why it stopped: "count", "duration", "cancelled"
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Achieved messages per second."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def pps(self) -> float:
        """Achieved IP packets per second (fragments counted one each)."""
        return self.packets / self.elapsed if self.elapsed > 0 else 0.0

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InjectStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rate"] = self.rate
        d["pps"] = self.pps
        return d
