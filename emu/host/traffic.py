"""Background traffic paced in emulated time, from a task of the host.

The packets are the injector's (emu.traffic): built once with scapy, spoofed sources and IP
fragments, sent as raw bytes on one IPPROTO_RAW socket (or, without CAP_NET_RAW, the same
datagrams from 127.0.0.1 over an ordinary UDP socket: no spoofing; the emulated NIC still cuts
the big ones into fragments by its own MTU).  They cross the real loopback to the application
sockets' real sockets.  What is paced is the *emulated* rate: message i leaves at
`t0 + i / rate` emulated seconds, on any machine, and reaches this host's NIC `wire_latency`
later.  Each message sent to a port the host listens on is awaited by that port's wire
(`Wire.expect_datagrams`), so the clock does not pass its due time before the real kernel has
delivered it (emu.kernel.clock); the wire is pulled at once, as loopback delivers within the send.

`offered` counts the messages due by the rate, `unsent` those due before their port's socket was
open (a real host would discard them unseen; they are not sent, since Apps binds the real sockets
at start to keep the ports), `expected` those sent to a listening port, `arrived` those the wires
read, `lost` those loopback never delivered.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import trio

from emu.traffic.profiles import Datagram, frag_pool, payload, udp_pool
from emu.traffic.rawsend import have_cap_net_raw, open_raw_socket
from emu.traffic.target import Target, spread_sources

if TYPE_CHECKING:
    from emu.kernel.cpu import Costs
    from emu.net.stack import NetStack
    from emu.scenario import TrafficSection

TICK = 0.001  # the generator sends each emulated millisecond's messages together, ahead of time
MIXED_FRAG_SHARE = 0.25  # mixed: 6 plain datagrams to 2 fragmented ones (its TCP share needs TCP listeners)


class HostTraffic:
    def __init__(self, tr: TrafficSection, net: NetStack, ports: list[int], costs: Costs, *, raw: bool = True) -> None:
        self.tr = tr
        self.net = net
        self.ports = list(ports)
        self.latency = costs.wire_latency
        self.privileged = raw and have_cap_net_raw()
        self.offered = 0
        self.expected = 0
        self.send_errors = 0
        self.unsent = 0
        self.packets = 0
        self.bytes = 0
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.generator = ""
        self.note = ""
        self._sock: socket.socket | None = None
        self._plain: list[Datagram] = []
        self._frag: list[Datagram] = []
        self._frag_share = {"udp-flood": 0.0, "frag": 1.0, "mixed": MIXED_FRAG_SHARE}.get(tr.profile, 0.0)

    # ---- the packets ---------------------------------------------------------------------------

    def build(self) -> None:
        """Build the packets (scapy, real time: no emulated time passes) and open the socket."""
        tr = self.tr
        host = self.net.local_addr  # the host's own address (127.0.1.N in a cluster)
        targets = [Target(host, p) for p in self.ports]
        if self.privileged:
            sources = spread_sources(ipaddress.ip_network(tr.spoof, strict=False), tr.distinct)  # type: ignore[arg-type]
            if self._frag_share < 1:
                self._plain = udp_pool(targets, sources, tr.size, tr.distinct)
            if self._frag_share > 0:
                self._frag = frag_pool(targets, sources, tr.frag_size, tr.distinct, 1480, False)
            self._sock = open_raw_socket(tr.profile)
            self.generator = "emu.traffic (scapy, raw socket: spoofed sources, IP fragments)"
        else:
            if self._frag_share < 1:
                self._plain = [Datagram((payload(tr.size),), (host, p), p) for p in self.ports]
            if self._frag_share > 0:
                self._frag = [Datagram((payload(tr.frag_size),), (host, p), p) for p in self.ports]
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            self.generator = "ordinary UDP socket (no CAP_NET_RAW: no spoofed sources)"
            self.note = "no CAP_NET_RAW: the datagrams come from 127.0.0.1 (one route cache entry)"
        self._sock.setblocking(False)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- pacing --------------------------------------------------------------------------------

    def _message(self, i: int) -> Datagram:
        """Message i: the frag share spread evenly (Bresenham), each kind cycling its pool."""
        f = self._frag_share
        nf = int((i + 1) * f) - int(i * f)
        if nf:
            return self._frag[int(i * f) % len(self._frag)]
        return self._plain[(i - int(i * f)) % len(self._plain)]

    async def run(self, duration: float) -> None:
        """Send the traffic for `duration` emulated seconds (or until cancelled)."""
        tr = self.tr
        if self._sock is None:
            self.build()
        assert self._sock is not None
        sendto = self._sock.sendto
        net = self.net
        rate = float(tr.rate)
        t0 = self.started_at = trio.current_time()
        end = t0 + duration
        i = 0
        tick = t0
        try:
            while True:
                # this tick's messages, each due at the NIC at its own time (the wire holds them)
                tick += TICK
                n = min(int((tick - t0) * rate - 1e-9) + 1, int(duration * rate))
                dues: dict[int, list[float]] = defaultdict(list)
                listening = {p: net.udp_wire(p) is not None for p in self.ports}
                while i < n:
                    d = self._message(i)
                    t_i = t0 + i / rate
                    if not listening[d.port]:
                        # No socket yet: a real host discards it unseen.  Not sent, as the port's
                        # real socket is already bound (Apps reserves it), and would queue it.
                        self.offered += 1
                        self.unsent += 1
                        i += 1
                        continue
                    try:
                        for p in d.packets:
                            sendto(p, d.dst)
                    except OSError:  # ENOBUFS, a full socket buffer: the message is lost here
                        self.send_errors += 1
                    else:
                        self.offered += 1
                        self.packets += len(d.packets)
                        self.bytes += sum(len(p) for p in d.packets)
                        dues[d.port].append(t_i + self.latency)
                    i += 1
                for port, ds in dues.items():
                    wire = net.udp_wire(port)
                    if wire is None:  # its socket closed within this tick: the real kernel discards it
                        continue
                    self.expected += len(ds)
                    wire.expect_datagrams(ds)
                    wire.pull()
                if tick >= end:
                    break
                await trio.sleep_until(tick)
        finally:
            self.stopped_at = trio.current_time()

    # ---- what happened -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        tr = self.tr
        size = tr.frag_size if tr.profile == "frag" else tr.size
        arrived = lost = 0
        for p in self.ports:
            w = self.net.udp_wire(p)
            if w is not None:
                arrived += w.datagrams
                lost += w.lost
        d: dict[str, Any] = {"profile": tr.profile, "rate": tr.rate, "size": size, "ports": self.ports,
                             "generator": self.generator, "spoof": tr.spoof if self.privileged else None,
                             "offered": self.offered, "unsent": self.unsent, "expected": self.expected, "arrived": arrived,
                             "lost_on_loopback": lost, "send_errors": self.send_errors, "packets": self.packets,
                             "bytes": self.bytes}
        if self.started_at is not None:
            span = (self.stopped_at if self.stopped_at is not None else trio.current_time()) - self.started_at
            d["emulated_s"] = round(span, 6)
            d["offered_rate"] = round(self.offered / span) if span > 0 else 0
        if self.note:
            d["note"] = self.note
        return d
