"""Server URLs as libnfs and libiscsi spell them, and our servers as separate processes."""

from __future__ import annotations

import pytest

from emu.swapdev.endpoint import IscsiEndpoint, NfsEndpoint, ServerURLError, parse_server_url, server_for_backend


def test_nfs_url() -> None:
    s = parse_server_url("nfs://127.0.0.1/srv/export?nfsport=2049&mountport=20048")
    assert s == NfsEndpoint("127.0.0.1", "/srv/export", 2049, 20048)
    assert parse_server_url(s.url()) == s
    s2 = parse_server_url("nfs://127.0.0.2/e/?version=3&nfsport=1&mountport=2&swapfile=sw")
    assert s2.export == "/e" and s2.swapfile == "sw"


def test_iscsi_url() -> None:
    s = parse_server_url("iscsi://127.0.0.1:3261/iqn.2024-01.test:tgt/1")
    assert s == IscsiEndpoint("127.0.0.1", 3261, "iqn.2024-01.test:tgt", 1)
    assert parse_server_url("iscsi://127.0.0.1/iqn.2024-01.test:tgt/0").port == 3260
    assert server_for_backend("iscsi", s.url()) == s
    with pytest.raises(ServerURLError, match="nfs-udp needs an nfs:// server"):
        server_for_backend("nfs-udp", s.url())
    # The wrong scheme is named before what only the right one would ask for (NFS's ports).
    with pytest.raises(ServerURLError, match="iscsi needs an iscsi:// server"):
        server_for_backend("iscsi", "nfs://127.0.0.1/x")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nfs://10.0.0.1/export?nfsport=1&mountport=2", "127.0.0.0/8"),
        ("nfs://example.com/export?nfsport=1&mountport=2", "IPv4"),
        ("nfs://127.0.0.1:2049/export?nfsport=1&mountport=2", "host:port"),
        ("nfs://127.0.0.1/export?nfsport=1", "mountport"),
        ("nfs://127.0.0.1/export?nfsport=x&mountport=2", "nfsport"),
        ("nfs://127.0.0.1/export?nfsport=1&mountport=2&version=4", "version"),
        ("nfs://127.0.0.1/?nfsport=1&mountport=2", "export"),
        ("iscsi://127.0.0.1:3260/iqn.x:y", "<lun>"),
        ("iscsi://127.0.0.1:3260/target/0", "iSCSI name"),
        ("iscsi://127.0.0.1:3260/iqn.x:y/lun", "LUN"),
        ("iscsi://192.168.1.1:3260/iqn.x:y/0", "127.0.0.0/8"),
        ("http://127.0.0.1/", "nfs:// or iscsi://"),
    ],
)
def test_bad_urls(url: str, needle: str) -> None:
    with pytest.raises(ServerURLError, match=None) as ei:
        parse_server_url(url)
    assert needle in str(ei.value)


@pytest.mark.parametrize(("scenario", "url", "backend"), [
    ("small", "iscsi://127.0.0.1:3260/iqn.2024-01.org.netswap:disk/0", "iscsi"),
    ("iscsi-random", "nfs://127.0.0.1/x?nfsport=2049&mountport=20048", "nfs-udp"),
    ("nfs-tcp", "nfs://127.0.0.1/x?nfsport=2049&mountport=20048", "nfs-tcp"),  # NFS keeps its transport
])
def test_the_server_urls_scheme_picks_the_backend(scenario: str, url: str, backend: str) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "emu", "run", scenario, "--server", url, "--print-scenario"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f'backend = "{backend}"' in r.stdout.splitlines()
