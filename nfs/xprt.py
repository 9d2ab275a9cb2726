"""The RPC client's sans-IO core (Linux's sunrpc xprt/clnt, reduced to what matters here).

- XIDs: allocated from a random start, matched against replies; a reply with an xid nobody is
  waiting for (a late duplicate, a stray datagram) is counted and ignored.
- Retransmission: `RetransmitPolicy` is Linux's timeo/retrans: the first timeout is `timeo`,
  each retransmission doubles it up to `timeo_max`; after `retrans` retransmissions a *major
  timeout* happens: a soft client gives up (RpcTimeout), a hard one starts over.
- Slot table: `SlotTable` bounds the requests in flight and owns the queue of requests waiting
  for a slot (Linux's xprt backlog): a freed slot goes straight to the oldest waiter, so no
  request is overtaken. The waiters are opaque tokens (the driver's wake-up events).

No I/O and no clock here: the driver passes messages in and asks what to do.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass, field

from nfs.rpc import AUTH_NONE, OpaqueAuth, RpcError, decode_reply, encode_call, reply_xid
from nfs.xdr import Unpacker, XdrError


class RpcTimeout(Exception):
    """A soft request got no reply after its retransmissions (a major timeout)."""


@dataclass(frozen=True)
class RetransmitPolicy:
    timeo: float  # seconds before the first retransmission
    retrans: int  # retransmissions before a major timeout
    timeo_max: float = 60.0
    hard: bool = True

    @classmethod
    def udp(cls, hard: bool = True) -> RetransmitPolicy:
        return cls(1.1, 3, 60.0, hard)  # Linux: timeo=11 (deciseconds), retrans=3

    @classmethod
    def tcp(cls, hard: bool = True) -> RetransmitPolicy:
        return cls(60.0, 2, 600.0, hard)  # Linux: timeo=600, retrans=2

    def next_timeout(self, timeout: float) -> float:
        return min(timeout * 2, self.timeo_max)


@dataclass
class Rqst:
    """One request in flight: its message, and what the driver learned about it."""

    xid: int
    prog: int
    vers: int
    proc: int
    message: bytes | bytearray
    transmissions: int = 0
    timeout: float = 0.0
    retries: int = 0  # since the last major timeout
    major_timeouts: int = 0
    reply: Unpacker | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


@dataclass
class XprtStats:
    calls: int = 0
    transmissions: int = 0
    retransmissions: int = 0
    major_timeouts: int = 0
    bad_xids: int = 0
    bad_replies: int = 0
    reconnects: int = 0


@dataclass
class XprtCore:
    policy: RetransmitPolicy
    cred: OpaqueAuth = AUTH_NONE
    pending: dict[int, Rqst] = field(default_factory=dict)
    stats: XprtStats = field(default_factory=XprtStats)

    def __post_init__(self) -> None:
        self._xid = struct.unpack(">I", os.urandom(4))[0]

    def new_xid(self) -> int:
        while True:
            self._xid = (self._xid + 1) & 0xFFFF_FFFF
            if self._xid not in self.pending:
                return self._xid

    def start(self, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview) -> Rqst:
        xid = self.new_xid()
        rq = Rqst(xid, prog, vers, proc, encode_call(xid, prog, vers, proc, args, self.cred),
                  timeout=self.policy.timeo)
        self.pending[xid] = rq
        self.stats.calls += 1
        return rq

    def transmitted(self, rq: Rqst) -> None:
        rq.transmissions += 1
        self.stats.transmissions += 1
        if rq.transmissions > 1:
            self.stats.retransmissions += 1

    def timed_out(self, rq: Rqst) -> bool:
        """The reply did not come in time. Returns True to retransmit, False when a soft request
        has had its major timeout (rq.error is then RpcTimeout)."""
        rq.retries += 1
        if rq.retries > self.policy.retrans:
            rq.major_timeouts += 1
            self.stats.major_timeouts += 1
            if not self.policy.hard:
                rq.error = RpcTimeout(f"xid {rq.xid:#x}: no reply after {rq.transmissions} transmissions")
                return False
            rq.retries = 0  # hard: "server not responding, still trying"
            rq.timeout = self.policy.timeo
            return True
        rq.timeout = self.policy.next_timeout(rq.timeout)
        return True

    def receive(self, msg: bytes | bytearray | memoryview) -> Rqst | None:
        """A reply arrived: match it to its request and decode the RPC layer."""
        xid = reply_xid(msg)
        rq = self.pending.get(xid) if xid is not None else None
        if rq is None:
            self.stats.bad_xids += 1
            return None
        if rq.done:
            return None
        try:
            _, rq.reply = decode_reply(msg)
        except RpcError as e:
            rq.error = e
        except XdrError as e:
            self.stats.bad_replies += 1
            rq.error = RpcError(f"xid {xid:#x}: undecodable reply: {e}")
        return rq

    def finish(self, rq: Rqst) -> None:
        self.pending.pop(rq.xid, None)


class SlotTable:
    """Bounds the requests in flight (Linux: the xprt slot table, `tcp_slot_table_entries`).

    `reserve(waiter)` takes a slot (True) or queues the waiter (False); the driver then sleeps
    until `put()`, which frees a slot by handing it to the oldest waiter and returns that waiter
    for the driver to wake. `cancel(waiter)` withdraws a waiter that gave up: True if it had
    already been handed a slot (which the driver must then `put()`)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a slot table needs at least one slot")
        self.slots = slots
        self.in_use = 0
        self.high_water = 0
        self.waits = 0
        self._backlog: deque[object] = deque()

    def try_get(self) -> bool:
        if self.in_use >= self.slots or self._backlog:
            return False
        self._take()
        return True

    def _take(self) -> None:
        self.in_use += 1
        self.high_water = max(self.high_water, self.in_use)

    def reserve(self, waiter: object) -> bool:
        if self.try_get():
            return True
        self.waits += 1
        self._backlog.append(waiter)
        return False

    def put(self) -> object | None:
        assert self.in_use > 0
        self.in_use -= 1
        if self._backlog:
            self._take()  # the slot passes straight to the oldest waiter
            return self._backlog.popleft()
        return None

    def cancel(self, waiter: object) -> bool:
        try:
            self._backlog.remove(waiter)
        except ValueError:
            return True  # it was handed a slot already
        return False

    @property
    def waiting(self) -> int:
        return len(self._backlog)
