"""Skips for tests that need root or a Debian peer — turned into failures when CI sets
NETSWAP_REQUIRE_PEERS=1, so a missing peer can never pass silently there."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_PEERS = os.environ.get("NETSWAP_REQUIRE_PEERS") == "1"


def unavailable(reason: str) -> None:
    if REQUIRE_PEERS:
        pytest.fail(f"{reason} (NETSWAP_REQUIRE_PEERS=1: this may not be skipped)", pytrace=False)
    pytest.skip(reason)


def require_binary(*names: str) -> dict[str, str]:
    """Return {name: path} for each program, or skip naming the Debian package to install."""
    found: dict[str, str] = {}
    missing = []
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        unavailable(f"needs {', '.join(missing)} (apt-get install tgt nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils libiscsi-bin tshark chromium)")
    return found


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (raw sockets / peer daemons); run the tests with sudo")
