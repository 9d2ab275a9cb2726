"""NFS version 3 (RFC 1813): the protocol's numbers and names.

The types and the per-procedure codecs (both directions) are in nfs/nfs3xdr.py.
"""

from __future__ import annotations

import enum

NFS_PROGRAM = 100003
NFS_V3 = 3
NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8
NAME_MAX = 255
PATH_MAX = 1024
MAX_FILE_SIZE = 0x7FFF_FFFF_FFFF_FFFF  # off_t: FSINFO's maxfilesize


class Proc(enum.IntEnum):
    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


class Stat(enum.IntEnum):
    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


def status_name(stats: type[enum.IntEnum], status: int) -> str:
    """NFS3ERR_NOENT for 2 (or `status N` for a value the enum does not have)."""
    try:
        return stats(status).name
    except ValueError:
        return f"status {status}"


class Nfs3Error(Exception):
    """An NFS3ERR_* status from the server (client side) or to return (server side)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"{status_name(Stat, status)}{': ' + message if message else ''}")
        self.status = status


class FType(enum.IntEnum):
    NF3REG = 1
    NF3DIR = 2
    NF3BLK = 3
    NF3CHR = 4
    NF3LNK = 5
    NF3SOCK = 6
    NF3FIFO = 7


class StableHow(enum.IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


UNSTABLE = StableHow.UNSTABLE
DATA_SYNC = StableHow.DATA_SYNC
FILE_SYNC = StableHow.FILE_SYNC


class CreateMode(enum.IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class TimeHow(enum.IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020

FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010

# The procedures whose replies the duplicate request cache keeps (knfsd: RC_REPLBUFF/REPLSTAT).
NON_IDEMPOTENT = frozenset({Proc.SETATTR, Proc.WRITE, Proc.CREATE, Proc.MKDIR, Proc.SYMLINK,
                            Proc.MKNOD, Proc.REMOVE, Proc.RMDIR, Proc.RENAME, Proc.LINK})

