"""XDR, RPC messages, record marking, DRC, commit lists: the sans-IO pieces on their own."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfs.drc import DrcState, DuplicateRequestCache
from nfs.nfs3 import FATTR3_SIZE, Fattr3, FsInfo, NfsTime, Sattr3, StableHow, decode_write_args, encode_write_args_head
from nfs.record import LAST_FRAG, RecordDecoder, RecordTooLarge, encode_record
from nfs.rpc import (
    AcceptStat, AuthFlavor, AuthStat, AuthSys, RejectStat, RpcError, RpcVersionMismatch, decode_call, decode_reply,
    encode_call, encode_reply_accepted, encode_reply_denied,
)
from nfs.write import CommitList
from nfs.xdr import Packer, Unpacker, XdrError


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300), st.text(max_size=50),
       st.lists(st.integers(0, 2**32 - 1), max_size=16), st.booleans())
def test_xdr_round_trip(a: int, b: int, blob: bytes, text: str, arr: list[int], flag: bool) -> None:
    p = Packer()
    p.u32(a)
    p.u64(b)
    p.opaque(blob)
    p.string(text)
    p.array(arr, p.u32, 16)
    p.bool(flag)
    p.optional(None, p.u32)
    assert len(p.buf) % 4 == 0
    u = Unpacker(p.bytes())
    assert (u.u32(), u.u64(), u.opaque(), u.string(), u.array(u.u32, 16), u.bool(), u.optional(u.u32)) == (
        a, b, blob, text, arr, flag, None)
    u.done()


def test_xdr_rejects_truncation_limits_and_bad_bools() -> None:
    p = Packer()
    p.opaque(b"abcdef")
    data = p.bytes()
    for cut in range(len(data)):
        with pytest.raises(XdrError):
            Unpacker(data[:cut]).opaque()
    with pytest.raises(XdrError):
        Unpacker(data).opaque(limit=5)
    with pytest.raises(XdrError):
        Unpacker(struct.pack(">I", 2)).bool()
    with pytest.raises(XdrError):  # a huge array count cannot allocate a huge list
        Unpacker(struct.pack(">I", 0xFFFFFFFF)).array(lambda: 0)
    with pytest.raises(XdrError):
        Packer().opaque(b"x" * 65, limit=64)


def test_fattr3_is_84_bytes_and_round_trips() -> None:
    a = Fattr3(1, 0o644, 1, 0, 0, 12345, 16384, (0, 0), 7, 99, NfsTime(1, 2), NfsTime(3, 4), NfsTime(5, 6))
    p = Packer()
    a.pack(p)
    assert len(p.buf) == FATTR3_SIZE == 84
    assert Fattr3.unpack(Unpacker(p.buf)) == a
    bad = bytearray(p.buf)
    bad[3] = 9  # no such ftype3
    with pytest.raises(XdrError):
        Fattr3.unpack(Unpacker(bad))


def test_sattr3_and_fsinfo_round_trip() -> None:
    s = Sattr3(mode=0o600, size=4096, atime="server", mtime=NfsTime(10, 20))
    p = Packer()
    s.pack(p)
    assert Sattr3.unpack(Unpacker(p.buf)) == Sattr3(mode=0o600, size=4096, atime="server", mtime=NfsTime(10, 20))
    f = FsInfo(None, 1 << 20, 1 << 20, 4096, 1 << 20, 1 << 20, 4096, 65536, 2**63 - 1, NfsTime(0, 1), 0x1B)
    p = Packer()
    f.pack(p)
    assert FsInfo.unpack(Unpacker(p.buf)) == f


def test_write_args_fast_codec() -> None:
    fh = b"h" * 44
    data = b"0123456789"
    msg = encode_write_args_head(fh, 4096, len(data), StableHow.DATA_SYNC) + data + b"\0\0"
    got = decode_write_args(Unpacker(msg))
    assert got[:4] == (fh, 4096, 10, StableHow.DATA_SYNC) and bytes(got[4]) == data
    with pytest.raises(XdrError):  # data shorter than its length field
        decode_write_args(Unpacker(msg[:-6]))


def test_rpc_call_and_replies() -> None:
    cred = AuthSys(stamp=7, machinename="host", uid=1000, gid=100, gids=(4, 5)).to_auth()
    msg = encode_call(0x1234, 100003, 3, 7, b"ARGS", cred)
    hdr, u = decode_call(msg)
    assert (hdr.xid, hdr.prog, hdr.vers, hdr.proc) == (0x1234, 100003, 3, 7)
    assert AuthSys.from_auth(hdr.cred) == AuthSys(7, "host", 1000, 100, (4, 5))
    assert bytes(u.rest()) == b"ARGS"
    bad = bytearray(msg)
    bad[8:12] = struct.pack(">I", 3)  # rpcvers 3
    with pytest.raises(RpcVersionMismatch):
        decode_call(bad)
    with pytest.raises(XdrError):
        decode_call(msg[:10])
    xid, body = decode_reply(encode_reply_accepted(9, AcceptStat.SUCCESS, b"\0\0\0\5"))
    assert xid == 9 and body.u32() == 5
    for stat in (AcceptStat.PROG_UNAVAIL, AcceptStat.PROC_UNAVAIL, AcceptStat.GARBAGE_ARGS):
        with pytest.raises(RpcError) as ei:
            decode_reply(encode_reply_accepted(9, stat))
        assert ei.value.accept_stat == stat
    with pytest.raises(RpcError, match="supported 3..3"):
        decode_reply(encode_reply_accepted(9, AcceptStat.PROG_MISMATCH, low=3, high=3))
    with pytest.raises(RpcError) as ei:
        decode_reply(encode_reply_denied(9, RejectStat.AUTH_ERROR, AuthStat.AUTH_BADCRED))
    assert ei.value.auth_stat == AuthStat.AUTH_BADCRED
    assert AuthFlavor.AUTH_SYS == 1


@settings(max_examples=60)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=6), st.integers(1, 700), st.data())
def test_records_survive_any_split_and_fragmentation(msgs: list[bytes], frag: int, data: st.DataObject) -> None:
    wire = b"".join(encode_record(m, max_fragment=frag) for m in msgs)
    dec = RecordDecoder(max_record=1 << 20)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    out = []
    prev = 0
    use_buffer = data.draw(st.booleans())
    for cut in [*cuts, len(wire)]:
        chunk = memoryview(wire)[prev:cut]
        prev = max(prev, cut)
        while len(chunk):
            buf = dec.get_buffer() if use_buffer else None
            if buf is not None:  # the zero-copy path: write straight into the record
                n = min(len(buf), len(chunk))
                buf[:n] = chunk[:n]
                buf.release()
                dec.commit(n)
                chunk = chunk[n:]
            else:
                dec.feed(chunk[:1] if use_buffer else chunk)
                chunk = chunk[1:] if use_buffer else chunk[len(chunk):]
            while (r := dec.next_record()) is not None:
                out.append(bytes(r))
    assert out == msgs


def test_record_size_cap_is_enforced_before_buffering() -> None:
    dec = RecordDecoder(max_record=1000)
    with pytest.raises(RecordTooLarge):
        dec.feed(struct.pack(">I", LAST_FRAG | 0x7FFFFFFF))
    dec = RecordDecoder(max_record=1000)
    dec.feed(struct.pack(">I", 600) + b"x" * 600)  # first fragment fine...
    with pytest.raises(RecordTooLarge):  # ...but the record as a whole is too big
        dec.feed(struct.pack(">I", LAST_FRAG | 600))
    assert dec.buffered <= 1000


def test_drc_states_and_bound() -> None:
    drc = DuplicateRequestCache(capacity=4)
    k = drc.key(1, "127.0.0.1", 100003, 3, 8, b"args")
    assert drc.lookup(k) == (DrcState.NEW, None)
    assert drc.lookup(k) == (DrcState.IN_PROGRESS, None)  # original still running: drop
    drc.done(k, b"reply")
    assert drc.lookup(k) == (DrcState.DONE, b"reply")
    assert drc.key(1, "127.0.0.1", 100003, 3, 8, b"other") != k  # same xid, other call
    for xid in range(2, 10):
        drc.lookup(drc.key(xid, "h", 1, 1, 1, b""))
    assert len(drc) == 4 and drc.stats.evictions > 0
    assert drc.lookup(k)[0] is DrcState.NEW  # evicted


def test_commit_list_finds_writes_lost_by_a_restart() -> None:
    cl = CommitList()
    cl.record(b"fh", 0, b"a" * 10, StableHow.UNSTABLE, b"V1")
    cl.record(b"fh", 10, b"b" * 10, StableHow.FILE_SYNC, b"V1")  # stable: nothing to keep
    cl.record(b"fh", 20, b"c" * 10, StableHow.UNSTABLE, b"V2")
    assert cl.nbytes(b"fh") == 20
    covered = cl.take(b"fh")
    cl.record(b"fh", 30, b"d", StableHow.UNSTABLE, b"V2")  # after the COMMIT was sent: next time
    lost = cl.lost(covered, b"V2")
    assert [w.offset for w in lost] == [0] and cl.resends == 1
    assert cl.nbytes(b"fh") == 1
    cl.restore(b"fh", covered)
    assert cl.nbytes(b"fh") == 21
