"""Units: the one parser and formatter each for bandwidths, durations and byte sizes.

Every place in pycoll that reads a unit (topology files, ``link=``, the network emulator, the
benchmarks) goes through this module, so a spelling means the same thing everywhere.

Bandwidth (:func:`parse_bandwidth`, result in **bytes per second**). A number, an optional
prefix and a unit::

    bits:   bit  bit/s  bps  b/s      "100mbit", "100mbps", "100 Mbit/s", "2.5Gbps", "8bit"
    bytes:  B    B/s    Bps           "1.25GB", "125 MB/s", "3MBps", "1 GiB/s"

Prefixes: ``k m g t`` in either case are powers of 1000; ``Ki Mi Gi Ti`` (any case) are powers of
1024. **"mbps" is megabits per second**, networking's convention, whatever the case of the prefix:
the lowercase ``b`` of ``bps``/``b/s`` means bits, the uppercase ``B`` of ``B``/``B/s``/``Bps``
means bytes; ``bit`` and ``bit/s`` mean bits in any case (``"10GBIT"``). This is *not* tc's
convention (in tc, "mbps" is megabytes per second): the network emulator never hands a user's
string to tc, it gives tc plain bits (:func:`pycoll.emulator.spec.tc_rate`). Spellings that
could be read either way are refused: ``"10gb"`` (bits or bytes?), ``"10GBPS"``, ``"10gbits"``.
``"unlimited"`` (or ``"inf"``) is ``math.inf``. A number without a unit is refused unless the
caller says what it means (``bare=``).

Duration (:func:`parse_duration`, result in **seconds**): a number and ``ns``, ``us`` (``µs``,
``usec``), ``ms`` (``msec``) or ``s`` (``sec``): ``"50us"``, ``"25ms"``, ``"1.5 s"``. A bare 0 is
allowed; other numbers without a unit are refused unless the caller passes ``bare="s"``.

Size (:func:`parse_size`, result in **bytes**, an int): a number and an optional binary prefix
``K M G T`` (either case), optionally followed by ``B`` or ``iB``: ``"4K"``, ``"64KiB"``, ``"1M"``,
``"16MiB"``, ``"1048576"``. Message and buffer sizes are binary: ``K``, ``KB`` and ``KiB`` are
all 1024 bytes (unlike bandwidth, where ``KB/s`` is 1000 bytes/s and ``KiB/s`` 1024).

Formatting: :func:`human_size` (``"16 MiB"``), :func:`format_bandwidth` (``"10 Gbit/s"``, bits,
as links are quoted), :func:`format_duration` (``"50 us"``).

Errors are :class:`ValueError` naming the offending value (and the field, when given).
This module imports nothing from pycoll.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

__all__ = [
    "parse_bandwidth",
    "parse_duration",
    "parse_size",
    "human_size",
    "format_bandwidth",
    "format_duration",
]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BANDWIDTH_RE = re.compile(
    r"\s*(?P<num>" + _NUMBER + r")\s*(?P<prefix>[kKmMgGtT][iI]?)?"
    r"(?P<unit>(?i:bit/s|bit)|bps|b/s|B/s|Bps|B)\s*\Z"
)
_DURATION_RE = re.compile(r"\s*(?P<num>" + _NUMBER + r")\s*(?P<unit>ns|us|µs|usec|ms|msec|s|sec)?\s*\Z")
_SIZE_RE = re.compile(r"\s*(?P<num>" + _NUMBER + r")\s*(?P<prefix>[kKmMgGtT])?(?P<unit>[iI][bB]|[bB])?\s*\Z")
_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BIT_UNITS = ("bit/s", "bit", "bps", "b/s")  # "bit" in any case; "bps"/"b/s" lowercase b only
# Divisors rather than factors: 200 / 1e6 rounds to 0.0002 exactly, 200 * 1e-6 does not.
_PER_SECOND = {"ns": 1e9, "us": 1e6, "µs": 1e6, "usec": 1e6, "ms": 1e3, "msec": 1e3, "s": 1.0, "sec": 1.0}

_BANDWIDTH_HELP = ("use a number, an optional k/m/g/t (x1000) or Ki/Mi/Gi/Ti (x1024) prefix and "
                   "'bit', 'bit/s', 'bps' (bits/s; 'mbps' = megabits/s) or 'B', 'B/s', 'Bps' (bytes/s), "
                   "e.g. '10gbit', '100mbps', '1.25GB/s', '1 GiB/s'")


def _where(field: Optional[str]) -> str:
    return f"{field}: " if field else ""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def parse_bandwidth(value: Any, field: Optional[str] = None, *, bare: Optional[str] = None) -> float:
    """A bandwidth such as ``"10gbit"``, ``"100mbps"`` or ``"1.25GB/s"`` -> bytes per second.

    ``"unlimited"``/``"inf"`` -> ``math.inf``. ``bare``: what a number without a unit means,
    ``"bit"`` (bits/s) or ``"B"`` (bytes/s); None (the default) refuses it. ``field`` names the
    setting in error messages. Zero and negative bandwidths are errors.
    """
    where = _where(field)
    if bare not in (None, "bit", "B"):
        raise ValueError(f"bare must be None, 'bit' or 'B', got {bare!r}")
    if _is_number(value) or (isinstance(value, str) and re.fullmatch(r"\s*[+-]?" + _NUMBER + r"\s*", value)):
        if bare is None:
            raise ValueError(f"{where}bandwidth {value!r} needs a unit; {_BANDWIDTH_HELP}")
        number = float(value)
        if math.isnan(number):
            raise ValueError(f"{where}bad bandwidth {value!r}")
        result = number if bare == "B" else number / 8
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("unlimited", "inf"):
            return math.inf
        if text.startswith("-"):
            raise ValueError(f"{where}bandwidth must not be negative, got {value!r}")
        match = _BANDWIDTH_RE.match(text)
        if not match:
            raise ValueError(f"{where}bad bandwidth {value!r}; {_BANDWIDTH_HELP}")
        prefix = (match["prefix"] or "").lower()
        scale = _BINARY[prefix[0]] if prefix.endswith("i") else _DECIMAL[prefix]
        number = float(match["num"]) * scale
        unit = match["unit"]
        result = number / 8 if unit.lower().startswith("bit") or unit in _BIT_UNITS else number
    else:
        raise ValueError(f"{where}expected a bandwidth string such as '10gbit' or '1.25GB/s', got {value!r}")
    if result < 0:
        raise ValueError(f"{where}bandwidth must not be negative, got {value!r}")
    if result == 0:
        raise ValueError(f"{where}bandwidth must be positive, got {value!r}")
    return result


def parse_duration(value: Any, field: Optional[str] = None, *, bare: Optional[str] = None,
                   what: str = "duration") -> float:
    """A duration such as ``"50us"``, ``"25ms"`` or ``"1.5s"`` -> seconds.

    A bare 0 is allowed; ``bare="s"`` accepts other numbers without a unit as seconds (None, the
    default, refuses them). Negative durations are errors. ``field`` names the setting in errors and
    ``what`` the quantity ("latency", "timeout").
    """
    where = _where(field)
    if bare not in (None, "s"):
        raise ValueError(f"bare must be None or 's', got {bare!r}")
    if _is_number(value):
        if math.isnan(value):
            raise ValueError(f"{where}bad {what} {value!r}")
        if value < 0:
            raise ValueError(f"{where}{what} must not be negative, got {value!r}")
        if value == 0 or bare == "s":
            return float(value)
        raise ValueError(f"{where}{what} {value!r} needs a unit (ns, us, ms, s), e.g. '50us'")
    if not isinstance(value, str):
        raise ValueError(f"{where}expected a {what} string such as '50us' or '25ms', got {value!r}")
    if value.strip().startswith("-"):
        raise ValueError(f"{where}{what} must not be negative, got {value!r}")
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"{where}bad {what} {value!r}; use a number and ns, us, ms or s, "
                         "e.g. '50us', '25ms'")
    number = float(match["num"])
    if match["unit"] is None:
        if number != 0 and bare != "s":
            raise ValueError(f"{where}{what} {value!r} needs a unit (ns, us, ms, s), e.g. '50us'")
        return number
    return number / _PER_SECOND[match["unit"]]


def parse_size(value: Any, field: Optional[str] = None, *, multiple: int = 1) -> int:
    """A size such as ``"4K"``, ``"64KiB"``, ``"16M"`` or ``"1048576"`` -> bytes (binary prefixes).

    The result must be a positive whole number of bytes and a multiple of ``multiple``.
    """
    where = _where(field)
    if _is_number(value):
        number = float(value)
        scale = 1
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"{where}bad size {value!r}: use bytes or a K/M/G/T suffix (x1024), "
                             "e.g. 64K, 16MiB")
        if match["unit"] and match["unit"].lower() == "ib" and not match["prefix"]:
            raise ValueError(f"{where}bad size {value!r}: 'iB' needs a prefix, e.g. 16MiB")
        number = float(match["num"])
        scale = _BINARY[match["prefix"].lower()] if match["prefix"] else 1
    else:
        raise ValueError(f"{where}expected a size such as '64K' or '16MiB', got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{where}bad size {value!r}")
    nbytes = number * scale
    if nbytes != int(nbytes):
        raise ValueError(f"{where}bad size {value!r}: not a whole number of bytes")
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise ValueError(f"{where}bad size {value!r}: must be positive")
    if nbytes % multiple:
        raise ValueError(f"{where}bad size {value!r}: must be a multiple of {multiple} bytes")
    return nbytes


def human_size(n) -> str:
    """Bytes as '4 KiB', '1.5 MiB', '100 B'."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def format_bandwidth(Bps: float) -> str:
    """Bytes/s -> '10 Gbit/s' (links are usually quoted in bits); inf -> 'unlimited'."""
    if math.isinf(Bps):
        return "unlimited"
    bits = Bps * 8
    for unit, div in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= div:
            return f"{bits / div:g} {unit}"
    return f"{bits:g} bit/s"


def format_duration(s: float) -> str:
    """Seconds -> '50 us', '5 ms', '1.5 s' ('0' for zero)."""
    for unit, mult in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if s >= 1 / mult:
            return f"{s * mult:g} {unit}"
    return f"{s * 1e9:g} ns" if s else "0"
