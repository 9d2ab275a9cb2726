"""Sizes as the kernel's command line writes them: `16M`, `512K`, `1G`, `4096`, `64MiB`.

One grammar for every size the project accepts (scenario files, `netswap reserve`, `serve`,
`bench`): a whole or decimal number, an optional unit K, M, G or T (powers of 1024, any case), an
optional `B` or `iB`; the result must be a whole number of bytes, at least 0 and below 2**63.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SIZE_MAX = (1 << 63) - 1
SIZE_HELP = "a size like 16M, 512K, 1G or a byte count"


def parse_size(text: str | int) -> int:
    """`16M` -> 16777216.  Raises ValueError (with a message fit for a user) on anything else:
    negative numbers, unit typos, fractions of a byte, booleans, sizes of 2**63 bytes or more."""
    if isinstance(text, bool):
        raise ValueError(f"expected {SIZE_HELP}, not a boolean")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"expected {SIZE_HELP}")
        num, unit = m.group(1), _UNITS[m.group(2).lower()]
        if "." in num:
            whole, frac = num.split(".")
            scaled = int(whole) * unit + int(frac) * unit // 10 ** len(frac)
            if int(frac) * unit % 10 ** len(frac):
                raise ValueError("not a whole number of bytes")
            value = scaled
        else:
            value = int(num) * unit
    else:
        raise ValueError(f"expected {SIZE_HELP}")
    if value < 0:
        raise ValueError("a size cannot be negative")
    if value > SIZE_MAX:
        raise ValueError(f"too large (at most {format_size(SIZE_MAX)} bytes)")
    return value


def format_size(n: int) -> str:
    """16777216 -> `16M` (the largest unit that divides it), else the byte count."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
