"""A login by hand, for tests that then speak raw PDUs to the target (malformed ones included)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from iscsi.pdu import Op, Pdu, PduReader, encode_text


@dataclass
class RawSession:
    reader: PduReader  # holds whatever came after the Login Response
    cmd_sn: int  # the first CmdSN to use (the target's ExpCmdSN)
    exp_stat_sn: int  # the StatSN expected next


async def raw_login(stream: trio.SocketStream, target: str, initiator: str = "iqn.x:raw",
                    keys: tuple[tuple[str, str], ...] = ()) -> RawSession:
    """One Login Request going straight to the full feature phase (CSG 1 -> NSG 3, T bit) with no
    digests; asserts the target accepted it."""
    req = Pdu.new(Op.LOGIN_REQ, 0x87, immediate=True, itt=1, data=encode_text([
        ("InitiatorName", initiator), ("TargetName", target), ("HeaderDigest", "None"), ("DataDigest", "None"),
        *keys]))
    req.bhs[8:14] = os.urandom(6)  # ISID
    await stream.send_all(req.encode())
    reader = PduReader()
    while (rsp := reader.next()) is None:
        reader.feed(await stream.receive_some(65536))
    assert rsp.opcode == Op.LOGIN_RSP and rsp.bhs[36] == 0, "login refused"
    stat_sn = int.from_bytes(rsp.bhs[24:28], "big")
    return RawSession(reader, int.from_bytes(rsp.bhs[28:32], "big"), (stat_sn + 1) & 0xFFFFFFFF)
