"""XDR, RPC messages, record marking, DRC, commit lists: the sans-IO pieces on their own."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfs.drc import DrcState, DuplicateRequestCache
from nfs.nfs3 import CreateMode, FType, Proc, StableHow, Stat
from nfs.nfs3xdr import (
    FATTR3_SIZE, NFS3_PROCEDURES, VOID, AccessArgs, AccessRes, CommitArgs, CommitRes, CreateArgs, CreateRes,
    DirOpArgs, Entry3, Fattr3, FhArgs, FsinfoRes, FsstatRes, GetattrRes, LinkArgs, LinkRes, LookupRes, MkdirArgs,
    MknodArgs, NfsTime, NullRes, PathconfRes, ReadArgs, ReaddirArgs, ReaddirplusArgs, ReaddirRes, ReadlinkRes,
    ReadRes, RenameArgs, RenameRes, Sattr3, SetattrArgs, SymlinkArgs, WccAttr, WccData, WccRes, WriteArgs,
    WriteRes, fattr3_bytes, wcc_attr_bytes,
)
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


def test_the_reply_encoders_give_the_codec_bytes_for_every_file_type(tmp_path: Path) -> None:
    """fattr3_bytes and wcc_attr_bytes (the encoders every reply runs, written out for speed)
    give exactly what Fattr3 and WccAttr encode, for each file type, times before 1970 and
    past 2106 (seconds wrap to 32 bits), and a device number."""
    (tmp_path / "reg").write_bytes(b"x" * 5000)
    (tmp_path / "dir").mkdir()
    os.symlink("reg", tmp_path / "lnk")
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sk:
        sk.bind(str(tmp_path / "sock"))
        os.utime(tmp_path / "reg", ns=(-1_500_000_001, 5_000_000_000_123_456_789))
        paths = [tmp_path / n for n in ("reg", "dir", "lnk", "fifo", "sock")] + [Path("/dev/null")]
        for path in paths:
            st_ = os.lstat(path)
            p = Packer()
            Fattr3.from_stat(st_, 7).pack(p)
            assert fattr3_bytes(st_, 7) == bytes(p.buf), path
            p = Packer()
            WccAttr.from_stat(st_).pack(p)
            assert wcc_attr_bytes(st_) == bytes(p.buf), path
    assert Fattr3.unpack(Unpacker(fattr3_bytes(os.lstat("/dev/null"), 7))).rdev == (1, 3)


def test_sattr3_round_trips() -> None:
    s = Sattr3(mode=0o600, size=4096, atime="server", mtime=NfsTime(10, 20))
    p = Packer()
    s.pack(p)
    assert Sattr3.unpack(Unpacker(p.buf)) == s


FH = b"h" * 44
ATTR = Fattr3(1, 0o644, 1, 0, 0, 5, 4096, (0, 0), 7, 99, NfsTime(1, 2), NfsTime(3, 4), NfsTime(5, 6))
WCC = WccData(WccAttr(5, NfsTime(3, 4), NfsTime(5, 6)), ATTR)
WHERE = DirOpArgs(FH, "n\udcff\udcfeme")  # not UTF-8: survives as the bytes it is
ARGS: dict[Proc, object] = {
    Proc.NULL: VOID, Proc.GETATTR: FhArgs(FH), Proc.SETATTR: SetattrArgs(FH, Sattr3(size=1), NfsTime(9, 9)),
    Proc.LOOKUP: WHERE, Proc.ACCESS: AccessArgs(FH, 0x3F), Proc.READLINK: FhArgs(FH),
    Proc.READ: ReadArgs(FH, 1 << 40, 4096), Proc.WRITE: WriteArgs(FH, 8192, 10, StableHow.DATA_SYNC, b"0123456789"),
    Proc.CREATE: CreateArgs(WHERE, CreateMode.GUARDED, Sattr3(mode=0o600)),
    Proc.MKDIR: MkdirArgs(WHERE, Sattr3(mode=0o700)), Proc.SYMLINK: SymlinkArgs(WHERE, "../t\udcff", Sattr3()),
    Proc.MKNOD: MknodArgs(WHERE, FType.NF3CHR, Sattr3(mode=0o600), (1, 3)), Proc.REMOVE: WHERE, Proc.RMDIR: WHERE,
    Proc.RENAME: RenameArgs(WHERE, DirOpArgs(FH, "to")), Proc.LINK: LinkArgs(FH, WHERE),
    Proc.READDIR: ReaddirArgs(FH, 3, b"verifier", 4096), Proc.READDIRPLUS: ReaddirplusArgs(FH, 3, b"v" * 8, 512, 8192),
    Proc.FSSTAT: FhArgs(FH), Proc.FSINFO: FhArgs(FH), Proc.PATHCONF: FhArgs(FH), Proc.COMMIT: CommitArgs(FH, 1, 2),
}
RESULTS: dict[Proc, object] = {
    Proc.NULL: NullRes(), Proc.GETATTR: GetattrRes(0, ATTR), Proc.SETATTR: WccRes(0, WCC),
    Proc.LOOKUP: LookupRes(0, FH, ATTR, ATTR), Proc.ACCESS: AccessRes(0, ATTR, 0x1F),
    Proc.READLINK: ReadlinkRes(0, ATTR, "/some/where"), Proc.READ: ReadRes(0, ATTR, 5, True, b"hello"),
    Proc.WRITE: WriteRes(0, WCC, 10, StableHow.FILE_SYNC, b"12345678"), Proc.CREATE: CreateRes(0, FH, ATTR, WCC),
    Proc.MKDIR: CreateRes(0, None, None, WCC), Proc.SYMLINK: CreateRes(0, FH, ATTR, WCC),
    Proc.MKNOD: CreateRes(0, FH, ATTR, WCC), Proc.REMOVE: WccRes(0, WCC), Proc.RMDIR: WccRes(0, WCC),
    Proc.RENAME: RenameRes(0, WCC, WccData()), Proc.LINK: LinkRes(0, ATTR, WCC),
    Proc.READDIR: ReaddirRes(0, ATTR, b"verifier", [Entry3(1, ".", 1), Entry3(2, "\udcff", 2)], True),
    Proc.READDIRPLUS: ReaddirRes(0, ATTR, b"verifier", [Entry3(1, "a", 1, ATTR, FH), Entry3(2, "b", 2)], False),
    Proc.FSSTAT: FsstatRes(0, ATTR, 1, 2, 3, 4, 5, 6, 7),
    Proc.FSINFO: FsinfoRes(0, None, 1 << 20, 1 << 20, 4096, 1 << 20, 1 << 20, 4096, 65536, 2**63 - 1, NfsTime(0, 1), 0x1B),
    Proc.PATHCONF: PathconfRes(0, ATTR, 32000, 255), Proc.COMMIT: CommitRes(0, WCC, b"87654321"),
}


def _wire(p: Packer) -> bytes:
    return b"".join(bytes(b) for b in p.iov())  # type: ignore[arg-type]


def _plain(x: object) -> object:
    """A decoded object with its memoryviews as bytes, to compare with what was encoded."""
    for f in getattr(x, "__slots__", ()):
        v = getattr(x, f)
        if isinstance(v, memoryview):
            object.__setattr__(x, f, bytes(v))
    return x


@pytest.mark.parametrize("proc", list(Proc))
def test_every_procedure_round_trips_both_ways(proc: Proc) -> None:
    """One table, both directions: what the client encodes the server decodes, and back."""
    x = NFS3_PROCEDURES[proc]
    p = Packer()
    x.encode_args(p, ARGS[proc])
    wire = _wire(p)
    assert len(wire) % 4 == 0
    u = Unpacker(wire)
    assert _plain(x.decode_args(u)) == ARGS[proc]
    u.done()
    p = Packer()
    x.encode_res(p, RESULTS[proc])
    wire = _wire(p)
    u = Unpacker(wire)
    assert _plain(x.decode_res(u)) == RESULTS[proc]
    u.done()
    for cut in range(0, len(wire), 4):  # every truncation is an XdrError, never a bad object
        if proc != Proc.NULL and cut < len(wire):
            with pytest.raises(XdrError):
                x.decode_res(Unpacker(wire[:cut]))
    failed = x.res(Stat.NFS3ERR_IO)  # every procedure has its failure result, and it encodes
    p = Packer()
    x.encode_res(p, failed)
    if proc != Proc.NULL:
        assert x.decode_res(Unpacker(_wire(p))).status == Stat.NFS3ERR_IO


def test_write_data_goes_by_reference_and_short_data_is_garbage() -> None:
    data = memoryview(bytearray(b"0123456789"))
    p = Packer()
    NFS3_PROCEDURES[Proc.WRITE].encode_args(p, WriteArgs(FH, 4096, 10, StableHow.DATA_SYNC, data))
    assert any(b is data for b in p.iov())  # not copied into the message
    msg = _wire(p)
    with pytest.raises(XdrError):  # data shorter than its length field
        NFS3_PROCEDURES[Proc.WRITE].decode_args(Unpacker(msg[:-6]))


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
