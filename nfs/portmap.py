"""Portmap version 2 (RFC 1833 §3): the server program and the client's GETPORT codec.

Needed only by clients that do not take explicit ports; `netswap serve nfs --portmap-port N`
serves it and registers MOUNT and NFS on it (in-process, not through RPC).

Who may change the table (rpcbind's rule, security.c check_access, plus portmap's CHECK_PORT):
SET and UNSET are answered FALSE unless they come from a loopback address *and* a privileged
source port (< 1024, i.e. from root on this host, as libtirpc's registration does). Every local
user can reach loopback, so the address alone would let anyone redirect clients to their own
port. GETPORT, DUMP and NULL are open to all.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from nfs.svc import Buffer, CallContext, peer_address
from nfs.xdr import Packer, Unpacker

PMAP_PROGRAM = 100000
PMAP_V2 = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class PmapProc(enum.IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETPORT = 3
    DUMP = 4


@dataclass(frozen=True)
class Mapping:
    prog: int
    vers: int
    prot: int
    port: int

    def pack(self, p: Packer) -> None:
        for v in (self.prog, self.vers, self.prot, self.port):
            p.u32(v)

    @classmethod
    def unpack(cls, u: Unpacker) -> Mapping:
        return cls(u.u32(), u.u32(), u.u32(), u.u32())


class PortmapProgram:
    prog = PMAP_PROGRAM
    versions = (PMAP_V2,)
    name = "PORTMAP2"

    def __init__(self, max_mappings: int = 256) -> None:
        self.mappings: OrderedDict[tuple[int, int, int], int] = OrderedDict()
        self.max_mappings = max_mappings
        self.refused = 0  # SET/UNSET calls refused by may_change

    def set(self, m: Mapping) -> bool:
        key = (m.prog, m.vers, m.prot)
        if key in self.mappings or len(self.mappings) >= self.max_mappings:
            return False
        self.mappings[key] = m.port
        return True

    def unset(self, prog: int, vers: int) -> bool:
        keys = [k for k in self.mappings if k[0] == prog and k[1] == vers]
        for k in keys:
            del self.mappings[k]
        return bool(keys)

    def getport(self, prog: int, vers: int, prot: int) -> int:
        return self.mappings.get((prog, vers, prot), 0)

    def has_proc(self, vers: int, proc: int) -> bool:
        return proc in PmapProc._value2member_map_

    def non_idempotent(self, vers: int, proc: int) -> bool:
        return False

    async def call(self, vers: int, proc: int, args: Unpacker, ctx: CallContext) -> list[Buffer]:
        p = Packer()
        if proc == PmapProc.NULL:
            return []
        if proc == PmapProc.DUMP:
            for (prog, v, prot), port in self.mappings.items():
                p.bool(True)
                Mapping(prog, v, prot, port).pack(p)
            p.bool(False)
            return [p.buf]
        m = Mapping.unpack(args)
        if proc in (PmapProc.SET, PmapProc.UNSET) and not may_change(ctx.host, ctx.port):
            self.refused += 1
            p.bool(False)
        elif proc == PmapProc.SET:
            p.bool(self.set(m))
        elif proc == PmapProc.UNSET:
            p.bool(self.unset(m.prog, m.vers))
        else:
            p.u32(self.getport(m.prog, m.vers, m.prot))
        return [p.buf]


IPPORT_RESERVED = 1024


def may_change(host: str, port: int) -> bool:
    """SET/UNSET only from loopback and a privileged port (see the module's docstring)."""
    addr = peer_address(host)
    return addr is not None and addr.is_loopback and 0 < port < IPPORT_RESERVED


def encode_getport_args(prog: int, vers: int, prot: int) -> bytes:
    p = Packer()
    Mapping(prog, vers, prot, 0).pack(p)
    return p.bytes()


def decode_getport_res(u: Unpacker) -> int:
    return u.u32()


def decode_dump_res(u: Unpacker) -> list[Mapping]:
    out = []
    while u.bool():
        out.append(Mapping.unpack(u))
        if len(out) > 65536:
            break
    return out
