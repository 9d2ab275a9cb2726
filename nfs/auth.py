"""Who a call acts as, and what it may do (knfsd's nfsd_setuser and nfsd_permission, in spirit).

The server runs as root, so the kernel checks nothing for it: every permission check is made
here, from the call's credential. AUTH_SYS gives uid, gid and groups; AUTH_NONE maps to the
anonymous user (`anonuid`/`anongid`, 65534 by default), and so does uid 0 under `root_squash`
(knfsd's export options; default `no_root_squash`, so a root client such as libnfs keeps
working). Mode bits are checked as the kernel does: owner, then group, then other; root may read
and write anything and execute anything with an x bit. As in knfsd, the owner of a file may
always READ and WRITE it (NFSD_MAY_OWNER_OVERRIDE: a client that opened a file keeps access when
it is chmod'ed), and READ is allowed with execute permission alone (NFSD_MAY_READ_IF_EXEC).
"""

from __future__ import annotations

import os
import stat as pystat
from dataclasses import dataclass

from nfs.nfs3 import Nfs3Error, Stat
from nfs.rpc import AuthSys

MAY_EXEC = 1
MAY_WRITE = 2
MAY_READ = 4
NOBODY = 65534


@dataclass(frozen=True)
class Squash:
    root_squash: bool = False
    anonuid: int = NOBODY
    anongid: int = NOBODY


@dataclass(frozen=True)
class Cred:
    uid: int
    gid: int
    gids: frozenset[int]

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids


def effective_cred(cred: AuthSys | None, squash: Squash) -> Cred:
    """The identity a call acts as: AUTH_NONE is anonymous, root is squashed if asked."""
    if cred is None or (squash.root_squash and cred.uid == 0):
        return Cred(squash.anonuid, squash.anongid, frozenset())
    if squash.root_squash:  # knfsd squashes root's group ids too
        return Cred(cred.uid, squash.anongid if cred.gid == 0 else cred.gid,
                    frozenset(squash.anongid if g == 0 else g for g in cred.gids))
    return Cred(cred.uid, cred.gid, frozenset(cred.gids))


def mode_bits(st: os.stat_result, who: Cred) -> int:
    """MAY_READ|MAY_WRITE|MAY_EXEC the mode bits give `who` on this object."""
    mode = st.st_mode
    if who.is_root:
        x = MAY_EXEC if (mode & 0o111 or pystat.S_ISDIR(mode)) else 0
        return MAY_READ | MAY_WRITE | x
    shift = 6 if who.uid == st.st_uid else 3 if who.in_group(st.st_gid) else 0
    return (mode >> shift) & 7


def check(st: os.stat_result, who: Cred, want: int, owner_override: bool = False) -> None:
    """Raise NFS3ERR_ACCES unless `who` may do `want` (MAY_* bits) on the object."""
    if owner_override and who.uid == st.st_uid:
        return
    have = mode_bits(st, who)
    if want & MAY_READ and not have & MAY_READ and owner_override and have & MAY_EXEC:
        have |= MAY_READ  # READ of an executable: the client may need to load it
    if want & ~have:
        raise Nfs3Error(Stat.NFS3ERR_ACCES, f"uid {who.uid} may not {_names(want & ~have)}")


def check_setattr(st: os.stat_result, who: Cred, *, size: bool, mode: bool, uid: int | None, gid: int | None,
                  times: bool, client_times: bool) -> None:
    """SETATTR's rules (the kernel's notify_change/setattr_prepare): a size change needs write
    permission; mode, times given by the client, and group changes need the owner (NFS3ERR_PERM
    otherwise); changing the owner needs root; setting times to the server's time needs the owner
    or write permission."""
    owner = who.is_root or who.uid == st.st_uid
    if uid is not None and uid != st.st_uid and not who.is_root:
        raise Nfs3Error(Stat.NFS3ERR_PERM, f"uid {who.uid} may not chown to {uid}")
    if gid is not None and gid != st.st_gid and not (who.is_root or (who.uid == st.st_uid and who.in_group(gid))):
        raise Nfs3Error(Stat.NFS3ERR_PERM, f"uid {who.uid} may not chgrp to {gid}")
    if (mode or client_times) and not owner:
        raise Nfs3Error(Stat.NFS3ERR_PERM, f"uid {who.uid} does not own the file")
    if size:
        check(st, who, MAY_WRITE, owner_override=True)
    if times and not owner:
        check(st, who, MAY_WRITE)


def check_delete(dir_st: os.stat_result, st: os.stat_result, who: Cred) -> None:
    """REMOVE: write and search permission on the directory; in a sticky directory also the
    file's or the directory's owner (or root)."""
    check(dir_st, who, MAY_WRITE | MAY_EXEC)
    if dir_st.st_mode & pystat.S_ISVTX and not (who.is_root or who.uid in (st.st_uid, dir_st.st_uid)):
        raise Nfs3Error(Stat.NFS3ERR_ACCES, f"uid {who.uid} may not remove another's file in a sticky directory")


def _names(bits: int) -> str:
    return "/".join(n for b, n in ((MAY_READ, "read"), (MAY_WRITE, "write"), (MAY_EXEC, "search/execute"))
                    if bits & b)
