"""CRC32C header and data digests (RFC 7143 §13.1), least significant byte first on the wire."""

from __future__ import annotations

import crc32c as _crc32c

DIGEST_LEN = 4


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli): "123456789" -> 0xE3069283."""
    return _crc32c.crc32c(data, value)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 4 digest bytes as iSCSI puts them on the wire (libiscsi and Wireshark agree: LSB first)."""
    return _crc32c.crc32c(data).to_bytes(4, "little")
