"""The RPC client's sans-IO core (Linux's sunrpc xprt/clnt, reduced to what matters here).

- XIDs: allocated from a random start, matched against replies; a reply with an xid nobody is
  waiting for (a late duplicate, a stray datagram) is counted and ignored.
- Timers, aioquic style: the core knows every request's deadline; the driver sleeps until
  `get_timer()` and then calls `handle_timer(now)`, and does what the core's events say
  (`next_event()`): retransmit a request, give one up, drop a silent TCP connection, log.
- Retransmission: `RetransmitPolicy` is Linux's timeo/retrans: the first timeout is `timeo`,
  each retransmission doubles it up to `timeo_max`; after `retrans` retransmissions a *major
  timeout* happens: a soft client gives the request up (RpcTimeout), a hard one starts over.
  The first major timeout makes the core say the server is not responding ("server H not
  responding, still trying"), the next reply that it is back ("server H OK"), once each, as
  Linux's call_timeout and call_decode do.
- Slot table: `SlotTable` bounds the requests in flight and owns the queue of requests waiting
  for a slot (Linux's xprt backlog): a freed slot goes straight to the oldest waiter, so no
  request is overtaken. The waiters are opaque tokens (the driver's wake-up events).

No I/O and no clock here: the driver passes messages and the time in, and asks what to do.
"""

from __future__ import annotations

import math
import os
import struct
from collections import deque
from dataclasses import dataclass, field

from nfs.rpc import AUTH_NONE, AcceptStat, OpaqueAuth, RpcError, decode_reply, encode_call, reply_xid
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


@dataclass(eq=False)
class Rqst:
    """One request in flight (Linux's rpc_rqst): its message and its timer."""

    xid: int
    prog: int
    vers: int
    proc: int
    message: bytes | bytearray
    transmissions: int = 0
    timeout: float = 0.0
    retries: int = 0  # since the last major timeout
    major_timeouts: int = 0
    deadline: float = math.inf  # when its timer fires (inf: not armed)
    reply: Unpacker | None = None
    error: BaseException | None = None
    last_error: str = ""  # why the last attempt failed (cannot connect, ...), for the error
    refused: bool = False  # the transport said nobody listens (ICMP port unreachable)

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


# -- events the driver acts on ------------------------------------------------------------------


@dataclass(frozen=True)
class Retransmit:
    """The request's timer fired: send it again (a stream transport: on a new connection)."""

    rqst: Rqst


@dataclass(frozen=True)
class Completed:
    """The request got its reply, or gave up (rqst.error): wake its caller."""

    rqst: Rqst


@dataclass(frozen=True)
class Reconnect:
    """A stream transport went silent: close it; the requests go again on a new one."""


@dataclass(frozen=True)
class NotResponding:
    """The first major timeout since the server last answered: 'not responding, still trying'
    (hard) or 'timed out' (soft)."""

    hard: bool


@dataclass(frozen=True)
class ServerOk:
    """A reply after NotResponding: 'server OK'."""


Event = Retransmit | Completed | Reconnect | NotResponding | ServerOk


@dataclass
class XprtStats:
    calls: int = 0
    transmissions: int = 0
    retransmissions: int = 0
    major_timeouts: int = 0
    bad_xids: int = 0
    bad_replies: int = 0
    reconnects: int = 0
    not_responding: int = 0  # times the server was declared not responding


@dataclass
class XprtCore:
    policy: RetransmitPolicy
    cred: OpaqueAuth = AUTH_NONE
    stream: bool = False  # a TCP-like transport: a timeout means a new connection
    pending: dict[int, Rqst] = field(default_factory=dict)
    stats: XprtStats = field(default_factory=XprtStats)
    not_responding: bool = False

    def __post_init__(self) -> None:
        self._xid: int = struct.unpack(">I", os.urandom(4))[0]
        self._events: deque[Event] = deque()

    def new_xid(self) -> int:
        while True:
            self._xid = (self._xid + 1) & 0xFFFF_FFFF
            if self._xid not in self.pending:
                return self._xid

    # -- requests --------------------------------------------------------------------------

    def start(self, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview) -> Rqst:
        xid = self.new_xid()
        rq = Rqst(xid, prog, vers, proc, encode_call(xid, prog, vers, proc, args, self.cred),
                  timeout=self.policy.timeo)
        self.pending[xid] = rq
        self.stats.calls += 1
        return rq

    def transmitted(self, rq: Rqst, now: float) -> None:
        """The request went out: its timer runs from now."""
        rq.transmissions += 1
        rq.last_error = ""
        self.stats.transmissions += 1
        if rq.transmissions > 1:
            self.stats.retransmissions += 1
        rq.deadline = now + rq.timeout

    def not_sent(self, rq: Rqst, now: float, why: str, delay: float) -> None:
        """No connection could be had (or the send failed): try again after `delay` seconds,
        which count against the request's timeout like a lost transmission."""
        rq.last_error = why
        rq.deadline = now + min(delay, rq.timeout)

    def refused(self) -> None:
        """The transport said the port is closed (ICMP port unreachable for a datagram): the
        requests sent wait on, but say so if they time out."""
        for rq in self.pending.values():
            if rq.transmissions:
                rq.refused = True

    def finish(self, rq: Rqst) -> None:
        self.pending.pop(rq.xid, None)

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When handle_timer must next be called (None: no timer armed)."""
        t = min((rq.deadline for rq in self.pending.values() if not rq.done), default=math.inf)
        return None if t == math.inf else t

    def handle_timer(self, now: float) -> None:
        silent = False
        for rq in list(self.pending.values()):
            if rq.done or rq.deadline > now:
                continue
            rq.deadline = math.inf
            silent |= rq.transmissions > 0 and not rq.last_error
            if self._timed_out(rq):
                self._events.append(Retransmit(rq))
            else:
                self._events.append(Completed(rq))
        if silent and self.stream:
            self._events.append(Reconnect())

    def _timed_out(self, rq: Rqst) -> bool:
        """The reply did not come in time. True: retransmit; False: a soft request had its
        major timeout (rq.error is then RpcTimeout)."""
        rq.retries += 1
        if rq.retries <= self.policy.retrans:
            rq.timeout = self.policy.next_timeout(rq.timeout)
            return True
        rq.major_timeouts += 1
        self.stats.major_timeouts += 1
        if not self.not_responding:
            self.not_responding = True
            self.stats.not_responding += 1
            self._events.append(NotResponding(self.policy.hard))
        if not self.policy.hard:
            why = rq.last_error or ("connection refused" if rq.refused else "")
            why = f" ({why})" if why else ""
            rq.error = RpcTimeout(f"xid {rq.xid:#x}: no reply after {rq.transmissions} transmissions{why}")
            return False
        rq.retries = 0  # hard: start over
        rq.timeout = self.policy.timeo
        return True

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- replies ---------------------------------------------------------------------------

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
            rq.error = RpcError(f"xid {xid:#x}: undecodable reply: {e}", accept_stat=AcceptStat.GARBAGE_ARGS)
        rq.deadline = math.inf
        if self.not_responding:
            self.not_responding = False
            self._events.append(ServerOk())
        self._events.append(Completed(rq))
        return rq


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
