"""Which bytes of a swap transport answer which request (emu.net.link.Framer), per protocol.

The host's clock awaits every reply a request asks for (emu.kernel.clock); these framers find the
requests in what the host sends and the replies in what it receives, by the tag both carry:

- ONC RPC: the xid (RFC 5531), the first word of a message: one datagram per message over UDP,
  record marking (RFC 5531 §11: a 4-byte mark, bit 31 = last fragment) over TCP.
- iSCSI: the Initiator Task Tag of the PDU's basic header segment (RFC 7143 §11.2); a PDU's length
  comes from its BHS (`iscsi.pdu.pdu_length`).  A command awaits its final PDU (a SCSI Response,
  a Data-In with status, an R2T asking for more data, or the response of a NOP-Out, task
  management, login, text or logout request).
"""

from __future__ import annotations

import struct

from iscsi.pdu import BHS_LEN, F_FINAL, F_STATUS, RESERVED_TAG, Op, bhs_itt, pdu_length

_U32 = struct.Struct(">I")


RPC_CALL = 0
RPC_REPLY = 1


class RpcDatagramFramer:
    """RPC over UDP: a datagram is a message; calls await the reply with their xid."""

    in_order = False  # each datagram stands alone

    def sent(self, data: bytes | bytearray | memoryview) -> list[object]:
        if len(data) >= 8 and _U32.unpack_from(data, 4)[0] == RPC_CALL:
            return [_U32.unpack_from(data, 0)[0]]
        return []

    def received(self, data: bytes | bytearray | memoryview) -> list[tuple[int, object | None, bool]]:
        if len(data) >= 8 and _U32.unpack_from(data, 4)[0] == RPC_REPLY:
            return [(len(data), _U32.unpack_from(data, 0)[0], True)]
        return [(len(data), None, True)]


class _RecordParser:
    """Walks a record-marked byte stream: where records start and end, and each one's xid."""

    def __init__(self) -> None:
        self.frag_left = 0  # bytes of the current fragment still to come
        self.last = False  # the current fragment is the record's last
        self.head = b""  # a mark or the record's first 8 bytes, while incomplete
        self.xid: int | None = None
        self.kind: int | None = None  # CALL or REPLY, once known
        self.in_record = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int | None, int | None, bool]]:
        """(bytes, xid, msg_type, record ends here) pieces covering `data`."""
        out: list[tuple[int, int | None, int | None, bool]] = []
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        while pos < n:
            start = pos
            if self.frag_left == 0:  # a record mark
                need = 4 - len(self.head)
                take = min(need, n - pos)
                self.head += bytes(mv[pos:pos + take])
                pos += take
                if len(self.head) < 4:
                    out.append((pos - start, self.xid, self.kind, False))
                    break
                mark = _U32.unpack(self.head)[0]
                self.head = b""
                self.last = bool(mark & 0x80000000)
                self.frag_left = mark & 0x7FFFFFFF
                if not self.in_record:
                    self.in_record = True
                    self.xid = self.kind = None
                    self._msg = b""
                if self.frag_left == 0:
                    ended = self.last
                    out.append((pos - start, self.xid, self.kind, ended))
                    if ended:
                        self.in_record = False
                    continue
            take = min(self.frag_left, n - pos)
            if self.xid is None or self.kind is None:
                self._msg += bytes(mv[pos:pos + min(take, 8 - len(self._msg))])
                if len(self._msg) >= 8:
                    self.xid, self.kind = _U32.unpack_from(self._msg, 0)[0], _U32.unpack_from(self._msg, 4)[0]
            pos += take
            self.frag_left -= take
            ended = self.frag_left == 0 and self.last
            out.append((pos - start, self.xid, self.kind, ended))
            if ended:
                self.in_record = False
        return out

    _msg = b""


class RpcStreamFramer:
    """RPC over TCP (record marking).  Replies stand alone (the client matches them by xid, and a
    server may answer in any order), so the model may deliver them in the order they are due."""

    in_order = False

    def __init__(self) -> None:
        self._out = _RecordParser()
        self._in = _RecordParser()

    def sent(self, data: bytes | bytearray | memoryview) -> list[object]:
        return [xid for _, xid, kind, end in self._out.feed(data) if end and kind == RPC_CALL and xid is not None]

    def received(self, data: bytes | bytearray | memoryview) -> list[tuple[int, object | None, bool]]:
        return [(n, xid if kind == RPC_REPLY else None, end) for n, xid, kind, end in self._in.feed(data)]


# the requests that await a response, and the responses that end an exchange (RFC 7143 §11.2.1.2)
_AWAITING_REQUESTS = frozenset({Op.NOP_OUT, Op.SCSI_CMD, Op.TASK_MGMT_REQ, Op.LOGIN_REQ, Op.TEXT_REQ, Op.LOGOUT_REQ})
_FINAL_RESPONSES = frozenset({Op.NOP_IN, Op.SCSI_RSP, Op.TASK_MGMT_RSP, Op.LOGIN_RSP, Op.TEXT_RSP, Op.LOGOUT_RSP,
                              Op.R2T})


class _PduParser:
    """Walks an iSCSI byte stream PDU by PDU."""

    def __init__(self, header_digest: bool, data_digest: bool) -> None:
        self.hd = header_digest
        self.dd = data_digest
        self.bhs = b""
        self.left = 0  # bytes of the current PDU still to come after its BHS
        self.tag: int | None = None
        self.final = False  # the current PDU ends its task's exchange (or is a request awaiting one)

    def feed(self, data: bytes | bytearray | memoryview, classify: object) -> list[tuple[int, int | None, bool]]:
        out: list[tuple[int, int | None, bool]] = []
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        while pos < n:
            start = pos
            if self.left == 0:
                take = min(BHS_LEN - len(self.bhs), n - pos)
                self.bhs += bytes(mv[pos:pos + take])
                pos += take
                if len(self.bhs) < BHS_LEN:
                    out.append((pos - start, None, False))
                    break
                bhs = self.bhs
                self.bhs = b""
                self.left = pdu_length(bhs, header_digest=self.hd, data_digest=self.dd) - BHS_LEN
                itt = bhs_itt(bhs)
                self.tag, self.final = classify(bhs[0] & 0x3F, bhs[1], itt)  # type: ignore[operator]
                if self.left == 0:
                    out.append((pos - start, self.tag, self.final))
                    continue
            take = min(self.left, n - pos)
            pos += take
            self.left -= take
            out.append((pos - start, self.tag, self.left == 0 and self.final))
        return out


def _request(op: int, flags: int, itt: int) -> tuple[int | None, bool]:
    if itt == RESERVED_TAG:
        return None, False
    if op in _AWAITING_REQUESTS or (op == Op.DATA_OUT and flags & F_FINAL):
        return itt, True
    return itt, False


def _response(op: int, flags: int, itt: int) -> tuple[int | None, bool]:
    if itt == RESERVED_TAG:
        return None, False
    if op in _FINAL_RESPONSES or (op == Op.DATA_IN and flags & F_STATUS):
        return itt, True
    return itt, False


class IscsiFramer:
    """An iSCSI connection (digests as negotiated: the swap session uses none).  The target
    answers in StatSN order (RFC 7143, "Response/Status Numbering"), so its stream's order is kept."""

    in_order = True

    def __init__(self, header_digest: bool = False, data_digest: bool = False) -> None:
        self._out = _PduParser(header_digest, data_digest)
        self._in = _PduParser(header_digest, data_digest)

    def sent(self, data: bytes | bytearray | memoryview) -> list[object]:
        return [tag for _, tag, end in self._out.feed(data, _request) if end and tag is not None]

    def received(self, data: bytes | bytearray | memoryview) -> list[tuple[int, object | None, bool]]:
        return list(self._in.feed(data, _response))
