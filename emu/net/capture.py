"""`--pcap`: every frame the emulated NIC saw, with its fate, as a pcapng file (scapy's writer).

`tcpdump -i lo` sees what the *real* kernel delivered; it cannot see what the emulated receive
stage did with a frame.  `PacketTap` can: the receive path (`RxPath.trace`, one entry per frame
where its counters are bumped) and the transmit path (`NetStack.xmit`) hand it their frames, and
it keeps them in a ring bounded in bytes (the last `ring_bytes`, as dumpcap's ring buffer keeps
the last files).  `write()` turns the ring into pcapng (LINKTYPE_RAW: IPv4 packets) with one
packet comment per frame:

    RX delivered to udp 127.0.0.1:9000 app3        queued on that socket (step 8)
    RX fragment queued for reassembly, for ...     step 4, waiting for the rest
    RX dropped: SKB_DROP_REASON_PFMEMALLOC (pfmemalloc_drop), for udp 127.0.0.1:9000 app3
                                                   the kernel's drop reason name (include/net/
                                                   dropreason-core.h), netswap's counter, the socket
    ...; skb from the reserve (pfmemalloc)         allocated below the watermarks (v12: emergency)
    TX                                             sent by the host

so `tshark -r F -Y 'frame.comment contains "PFMEMALLOC"'` finds the reserve drops.  TCP segments
carry sequence numbers from the byte stream (a dropped segment offered again has the same
sequence number: a retransmission), so tshark reassembles RPC records and iSCSI PDUs whole.

The tap is an observer: it reads frames and verdicts and never touches memory, the clock or the
CPU model, so a run with it gives the same outcome as without it.  Headers are packed with
`struct` while the run goes (a few microseconds per frame); checksums are filled in at `write()`.
"""

from __future__ import annotations

import collections
import socket as _socket
import struct
from typing import TYPE_CHECKING, Any

from emu.net.netstat import FRAG_QUEUED, MISSED, QUEUED, RESERVE_SKB, VERDICTS

if TYPE_CHECKING:
    from emu.net.sock import Sock

LINKTYPE_RAW = 101  # raw IPv4/IPv6, no link-layer header
RESERVE = RESERVE_SKB  # a trace entry's flag: the skb came from the reserve
PER_FRAME_OVERHEAD = 160  # bytes of Python objects per ringed frame, counted against the ring
MTU = 1500
_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
TCP_ACK_PSH = 0x18


def fate(verdict: int, reserve_name: str = "", sock: str = "") -> str:
    """The comment of an RX frame with this verdict (reserve flag included), for `sock`."""
    v = verdict & ~RESERVE
    name, reason = VERDICTS[v]
    if v == QUEUED:
        text = "RX delivered" + (f" to {sock}" if sock else "")
    elif v == FRAG_QUEUED:
        text = "RX fragment queued for reassembly" + (f", for {sock}" if sock else "")
    else:
        text = f"RX dropped: {reason} ({name})" + (f", for {sock}" if sock else "")
    if verdict & RESERVE:
        text += f"; skb from the reserve ({reserve_name or 'reserve'})"
    return text


def _checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class PacketTap:
    """Frames and their fates, in a ring of the last `ring_bytes` (module docstring)."""

    def __init__(self, *, snaplen: int = 0, ring_bytes: int = 64 << 20, mtu: int = MTU,
                 reserve_name: str = "", t0: float = 0.0) -> None:
        if snaplen < 0 or ring_bytes <= 0:
            raise ValueError("snaplen must be >= 0 and the ring > 0 bytes")
        self.snaplen = snaplen
        self.ring_max = ring_bytes
        self.mtu = mtu
        self.max_single = mtu - 28
        self.t0 = t0  # added to emulated time in the file (the run's wall-clock start)
        # (t, header, payload piece, length on the wire, comment, direction): packet = header + piece
        self.ring: collections.deque[tuple[float, bytes, bytes, int, str, int]] = collections.deque()
        self.ring_bytes = 0
        self.left_out = 0  # frames pushed out of the ring (older than its last ring_bytes)
        self.rx_frames = 0
        self.tx_frames = 0
        self.counts = [0] * len(VERDICTS)  # RX frames per verdict, the left-out ones included
        self.reserve_frames = 0
        self.stopped = False
        self.reserve_name = reserve_name
        self._fates = {v | r: fate(v | r, reserve_name) for v in range(len(VERDICTS)) for r in (0, RESERVE)}
        self._sock_fates: dict[int, tuple[Sock, dict[int, str]]] = {}  # id(sock) -> its comments
        self._addr: dict[str, bytes] = {}
        self._ip_id = 0
        self._tcp: dict[tuple[str, int, str, int], list[int]] = {}  # -> [rcv_nxt, snd_nxt]

    # ---- recording (called from the host's receive and transmit paths) -----------------------

    def _a(self, addr: str) -> bytes:
        b = self._addr.get(addr)
        if b is None:
            try:
                b = _socket.inet_aton(addr)
            except OSError:
                b = bytes(4)
            self._addr[addr] = b
        return b

    def _put(self, t: float, hdr: bytes, payload: bytes, lo: int, hi: int, comment: str, direction: int,
             whole: bool) -> None:
        wire = len(hdr) + hi - lo
        snap = self.snaplen
        if snap and not whole and wire > snap:
            hi = lo + max(0, snap - len(hdr))
        piece = payload if lo == 0 and hi == len(payload) else payload[lo:hi]
        ring = self.ring
        ring.append((t, hdr, piece, wire, comment, direction))
        self.ring_bytes += len(hdr) + len(piece) + PER_FRAME_OVERHEAD
        if self.ring_bytes > self.ring_max:
            while ring and self.ring_bytes > self.ring_max:
                _, h, p, _, _, _ = ring.popleft()
                self.ring_bytes -= len(h) + len(p) + PER_FRAME_OVERHEAD
                self.left_out += 1

    def fates(self, sk: Sock | None) -> dict[int, str]:
        """The comments of frames for `sk` (naming it: `tshark -Y 'frame.comment contains "app3"'`)."""
        if sk is None:
            return self._fates
        got = self._sock_fates.get(id(sk))
        if got is None or got[0] is not sk:
            name = f"{sk.proto} {sk.local_str()} {sk.owner_name()}"
            got = (sk, {v | r: fate(v | r, self.reserve_name, name) for v in range(len(VERDICTS)) for r in (0, RESERVE)})
            self._sock_fates[id(sk)] = got
        return got[1]

    def udp(self, frames: Any, daddr: str, dport: int, sk: Sock | None, trace: list[int], now: float) -> None:
        """One poll's datagrams for a port (its socket `sk`), (due, data, saddr, sport) each, and
        the receive path's trace: one entry per frame (a fragmented datagram has one per fragment)."""
        if self.stopped:
            return
        whole = sk is not None and sk.memalloc
        dst = self._a(daddr)
        fates = self.fates(sk)
        counts = self.counts
        max_single = self.max_single
        k = 0
        for f in frames:
            data, saddr, sport = f[1], f[2], f[3]
            src = self._a(saddr)
            n = len(data)
            udph = _UDP.pack(sport, dport, n + 8, 0)
            if n <= max_single:
                v = trace[k]
                k += 1
                counts[v & ~RESERVE] += 1
                self.reserve_frames += v >> 4
                self._put(now, _IP.pack(0x45, 0, n + 28, 0, 0x4000, 64, 17, 0, src, dst) + udph, data, 0, n,
                          fates[v], 1, whole)
                continue
            self._ip_id = ident = (self._ip_id + 1) & 0xFFFF
            off = 0
            total = n + 8
            per = (self.mtu - 20) & ~7
            while off < total:
                length = min(per, total - off)
                more = off + length < total
                v = trace[k] if k < len(trace) else MISSED
                k += 1
                counts[v & ~RESERVE] += 1
                self.reserve_frames += v >> 4
                ip = _IP.pack(0x45, 0, length + 20, ident, (0x2000 if more else 0) | (off >> 3), 64, 17, 0, src, dst)
                if off == 0:
                    self._put(now, ip + udph, data, 0, length - 8, fates[v], 1, whole)
                else:
                    self._put(now, ip, data, off - 8, off - 8 + length, fates[v], 1, whole)
                off += length
        self.rx_frames += k

    def tcp(self, sk: Sock, chunk: bytes, verdict: int, reserve: bool, now: float) -> None:
        """One TCP segment offered to the receive path (again, after a drop: same sequence)."""
        if self.stopped:
            return
        key = (sk.laddr, sk.lport, sk.raddr, sk.rport)
        st = self._tcp.get(key)
        if st is None:
            st = self._tcp[key] = [1, 1]
        v = verdict | (RESERVE if reserve else 0)
        n = len(chunk)
        hdr = (_IP.pack(0x45, 0, n + 40, 0, 0x4000, 64, 6, 0, self._a(sk.raddr), self._a(sk.laddr))
               + _TCP.pack(sk.rport, sk.lport, st[0] & 0xFFFFFFFF, st[1] & 0xFFFFFFFF, 0x50, TCP_ACK_PSH, 65535, 0, 0))
        self._put(now, hdr, chunk, 0, n, self.fates(sk)[v], 1, sk.memalloc)
        self.counts[verdict] += 1
        self.reserve_frames += reserve
        self.rx_frames += 1
        if verdict == QUEUED:
            st[0] += n

    def tx(self, sk: Sock, data: Any, addr: tuple[str, int] | None, now: float, mss: int) -> None:
        """What the host sent on `sk` (to `addr`, or its peer)."""
        if self.stopped:
            return
        payload = bytes(data)
        n = len(payload)
        whole = sk.memalloc
        src = self._a(sk.laddr)
        if sk.proto == "udp":
            daddr, dport = addr if addr is not None else (sk.raddr, sk.rport)
            dst = self._a(daddr)
            udph = _UDP.pack(sk.lport, dport, n + 8, 0)
            if n <= self.max_single:
                self._put(now, _IP.pack(0x45, 0, n + 28, 0, 0x4000, 64, 17, 0, src, dst) + udph, payload, 0, n, "TX", 2, whole)
                self.tx_frames += 1
                return
            self._ip_id = ident = (self._ip_id + 1) & 0xFFFF
            per = (self.mtu - 20) & ~7
            off, total = 0, n + 8
            while off < total:
                length = min(per, total - off)
                more = off + length < total
                ip = _IP.pack(0x45, 0, length + 20, ident, (0x2000 if more else 0) | (off >> 3), 64, 17, 0, src, dst)
                if off == 0:
                    self._put(now, ip + udph, payload, 0, length - 8, "TX", 2, whole)
                else:
                    self._put(now, ip, payload, off - 8, off - 8 + length, "TX", 2, whole)
                self.tx_frames += 1
                off += length
            return
        key = (sk.laddr, sk.lport, sk.raddr, sk.rport)
        st = self._tcp.get(key)
        if st is None:
            st = self._tcp[key] = [1, 1]
        dst = self._a(sk.raddr)
        for o in range(0, n, mss):
            m = min(mss, n - o)
            hdr = (_IP.pack(0x45, 0, m + 40, 0, 0x4000, 64, 6, 0, src, dst)
                   + _TCP.pack(sk.lport, sk.rport, st[1] & 0xFFFFFFFF, st[0] & 0xFFFFFFFF, 0x50, TCP_ACK_PSH, 65535, 0, 0))
            self._put(now, hdr, payload, o, o + m, "TX", 2, whole)
            st[1] += m
            self.tx_frames += 1

    def stop(self) -> None:
        """Nothing more is recorded (the run's result was taken: the file matches its counters)."""
        self.stopped = True

    # ---- the file ------------------------------------------------------------------------------

    def summary(self) -> str:
        drops = {VERDICTS[v][0]: n for v, n in enumerate(self.counts) if n}
        s = (f"netswap --pcap: {self.rx_frames} RX frames, {self.tx_frames} TX frames; "
             f"RX verdicts {drops}; {self.reserve_frames} RX skbs from the reserve")
        if self.left_out:
            s += f"; ring of {self.ring_max} bytes: the oldest {self.left_out} frames were left out"
        if self.snaplen:
            s += f"; snaplen {self.snaplen}"
        return s

    def write(self, path: str, comment: str = "") -> int:
        """The ring as pcapng at `path` (scapy's writer); returns the frames written."""
        t0 = self.t0
        header_comment = "\n".join(x for x in (comment, self.summary()) if x)
        with _Writer(path, header_comment) as w:
            w.linktype = LINKTYPE_RAW
            w._write_header(None)
            wp = w._write_packet
            for t, hdr, piece, wire, cm, direction in self.ring:
                pkt = hdr[:10] + _checksum(hdr[:20]).to_bytes(2, "big") + hdr[12:] + piece
                wp(pkt, LINKTYPE_RAW, sec=t0 + t, caplen=len(pkt), wirelen=wire, comments=[cm.encode()],
                   direction=direction)
        return len(self.ring)


def _writer_class() -> type:
    from scapy.utils import RawPcapNgWriter

    class Writer(RawPcapNgWriter):  # type: ignore[misc]
        """scapy's pcapng writer, with a section comment and the interface named emu0."""

        def __init__(self, filename: str, shb_comment: str) -> None:
            super().__init__(filename)
            self.shb_comment = shb_comment.encode()

        def _write_block_shb(self) -> None:
            body = self.endian_magic + struct.pack(self.endian + "HHq", 1, 0, -1)
            c = self.shb_comment
            opts = b""
            if c:
                opts = struct.pack(self.endian + "HH", 1, len(c)) + self._add_padding(c)
            opts += struct.pack(self.endian + "HH", 0, 0)
            self.f.write(self.build_block(b"\x0A\x0D\x0D\x0A", body, options=opts))

        def _write_block_idb(self, linktype: int, ifname: bytes | None = None) -> None:
            super()._write_block_idb(linktype, ifname if ifname is not None else b"emu0")

    return Writer


def _Writer(path: str, comment: str) -> Any:
    return _writer_class()(path, comment)
