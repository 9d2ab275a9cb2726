"""The client's sans-IO core (xids, retransmit policy, slots) and the export's file handles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfs.nfs3 import Nfs3Error, Stat
from nfs.rpc import AcceptStat, RpcError, decode_call, encode_reply_accepted
from nfs.store import FH_SIZE, Export, load_key
from nfs.xprt import (
    Completed, NotResponding, Reconnect, Retransmit, RetransmitPolicy, RpcTimeout, Rqst, ServerOk, SlotTable, XprtCore,
)


def _drain(core: XprtCore) -> list[object]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def _run_timers(core: XprtCore, rq: Rqst, rounds: int) -> tuple[list[float], list[object]]:
    """Drive the core's timer as the trio driver does: sleep until get_timer(), then
    handle_timer(now), and retransmit what it says. Returns the timeouts seen and the events."""
    now = 0.0
    core.transmitted(rq, now)
    timeouts: list[float] = []
    events: list[object] = []
    for _ in range(rounds):
        t = core.get_timer()
        if t is None:
            break
        timeouts.append(t - now)
        now = t
        core.handle_timer(now)
        evs = _drain(core)
        events += evs
        if Retransmit(rq) in evs:
            core.transmitted(rq, now)
    return timeouts, events


def test_retransmit_backoff_and_soft_major_timeout() -> None:
    core = XprtCore(RetransmitPolicy(timeo=0.5, retrans=3, timeo_max=1.5, hard=False))
    rq = core.start(100003, 3, 0, b"")
    timeouts, events = _run_timers(core, rq, 10)
    assert timeouts == [0.5, 1.0, 1.5, 1.5]  # doubled, capped at timeo_max
    assert isinstance(rq.error, RpcTimeout) and core.stats.major_timeouts == 1
    assert events[-2:] == [NotResponding(hard=False), Completed(rq)] and core.get_timer() is None


def test_hard_requests_start_over_and_say_so_once() -> None:
    core = XprtCore(RetransmitPolicy(timeo=1.0, retrans=1, timeo_max=60, hard=True))
    rq = core.start(100003, 3, 0, b"")
    timeouts, events = _run_timers(core, rq, 5)
    assert timeouts == [1.0, 2.0, 1.0, 2.0, 1.0] and rq.error is None and rq.major_timeouts == 2
    assert events.count(NotResponding(hard=True)) == 1  # "not responding, still trying" once
    assert core.not_responding
    core.receive(encode_reply_accepted(rq.xid, AcceptStat.SUCCESS))
    assert _drain(core) == [ServerOk(), Completed(rq)] and not core.not_responding  # "server OK"


def test_a_silent_stream_asks_for_a_new_connection() -> None:
    core = XprtCore(RetransmitPolicy(timeo=1.0, retrans=2), stream=True)
    rq = core.start(100003, 3, 0, b"")
    core.transmitted(rq, 0.0)
    core.handle_timer(0.5)
    assert _drain(core) == []  # not yet
    core.handle_timer(1.0)
    assert _drain(core) == [Retransmit(rq), Reconnect()]


def test_linux_defaults() -> None:
    assert (RetransmitPolicy.udp().timeo, RetransmitPolicy.udp().retrans) == (1.1, 3)
    assert (RetransmitPolicy.tcp().timeo, RetransmitPolicy.tcp().retrans) == (60.0, 2)


def test_xid_matching_ignores_strays_and_decodes_errors() -> None:
    core = XprtCore(RetransmitPolicy.udp())
    a = core.start(100003, 3, 1, b"x")
    b = core.start(100003, 3, 1, b"y")
    assert a.xid != b.xid
    assert decode_call(a.message)[0].xid == a.xid
    assert core.receive(encode_reply_accepted(a.xid ^ 0xFFFF, AcceptStat.SUCCESS)) is None
    assert core.receive(b"\x00\x01") is None
    assert core.stats.bad_xids == 2
    got = core.receive(encode_reply_accepted(b.xid, AcceptStat.PROC_UNAVAIL))
    assert got is b and isinstance(b.error, RpcError)
    got = core.receive(encode_reply_accepted(a.xid, AcceptStat.SUCCESS, b"\0\0\0\7"))
    assert got is a and a.reply is not None and a.reply.u32() == 7
    assert core.receive(encode_reply_accepted(a.xid, AcceptStat.SUCCESS, b"\0\0\0\7")) is None  # duplicate
    core.finish(a)
    assert a.xid not in core.pending


def test_slot_table_bounds() -> None:
    s = SlotTable(2)
    assert s.try_get() and s.try_get() and not s.try_get()
    s.put()
    assert s.try_get() and s.high_water == 2
    with pytest.raises(ValueError):
        SlotTable(0)


def test_handles_survive_restart_and_resist_forgery(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    key = load_key(tmp_path / "state")
    assert load_key(tmp_path / "state") == key  # kept across restarts
    exp = Export(root, key)
    st = os.lstat(root / "d" / "f")
    fh = exp.fh_for(str(root / "d" / "f"), st, os.lstat(root / "d").st_ino)
    assert len(fh) == FH_SIZE <= 64
    # A new Export (a restarted server) with an empty cache finds the file again.
    again = Export(root, key)
    path, st2 = again.resolve(fh)
    assert path == str(root / "d" / "f") and st2.st_ino == st.st_ino
    # Forged: flip a bit of the inode number, or sign with another key.
    forged = bytearray(fh)
    forged[20] ^= 1
    for bad in (bytes(forged), Export(root, os.urandom(32)).make_fh(st.st_ino, 0), b"short", b"\0" * 64):
        with pytest.raises(Nfs3Error) as ei:
            again.resolve(bad)
        assert ei.value.status == Stat.NFS3ERR_BADHANDLE
    # Stale: the file is gone.
    os.unlink(root / "d" / "f")
    with pytest.raises(Nfs3Error) as ei:
        again.resolve(fh)
    assert ei.value.status == Stat.NFS3ERR_STALE

    def no_walk(ino: int, parent: int) -> None:
        raise AssertionError("walked the export again for a handle known to be stale")

    again.find = no_walk  # type: ignore[method-assign]
    with pytest.raises(Nfs3Error) as ei:
        again.resolve(fh)
    assert ei.value.status == Stat.NFS3ERR_STALE


def test_handles_never_leave_the_export(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "link")
    exp = Export(root, os.urandom(32))
    rst = os.lstat(root)
    assert exp.child_path(exp.root, rst, "..") == exp.root  # .. of the root is the root
    for bad in ("a/b", "", "x\0y"):
        with pytest.raises(Nfs3Error):
            exp.child_path(exp.root, rst, bad)
    # A validly signed handle for an inode outside the export does not resolve to it.
    sst = os.lstat(outside)
    with pytest.raises(Nfs3Error) as ei:
        exp.resolve(exp.make_fh(sst.st_ino, rst.st_ino))
    assert ei.value.status == Stat.NFS3ERR_STALE
    # The symlink is an object of the export itself, never followed to its target.
    lst = os.lstat(root / "link")
    fh = exp.fh_for(str(root / "link"), lst, rst.st_ino)
    path, st = exp.resolve(fh)
    assert st.st_ino == lst.st_ino != sst.st_ino
    with pytest.raises(Nfs3Error):
        exp.fd(path, st)  # READ/WRITE through a symlink is refused
