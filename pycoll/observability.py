"""Seeing what pycoll does: logging and per-collective statistics.

Logging. pycoll logs under the ``pycoll`` logger (``pycoll.control.coordinator``, ``pycoll.torch``, ...).
Set the level with the environment variable ``PYCOLL_LOG`` (``debug``, ``info``, ``warning``,
``error``); at ``debug`` every collective logs one line (rank, epoch, collective, algorithm,
bytes, time, bandwidth). When ``PYCOLL_LOG`` is set and the program has not configured logging,
pycoll prints to stderr itself; otherwise your handlers decide. ``pycoll --log-level`` does the
same for the command line.

Statistics. ``comm.stats`` holds the last 10,000 collectives as :class:`pycoll.Stat` records
(op, algorithm, nbytes, seconds, world_size, epoch, ok, retries); :func:`summarize` folds them
into one row per (op, algorithm) and :func:`format_stats` prints that as a table.

:class:`Stat` is defined here, low in the house (this module imports only :mod:`pycoll.units`), so
that the communicator and the agreement (``comm``, ``consensus``) both record them.
"""
import collections
import logging
import os

from pycoll.units import human_size

__all__ = ["configure_logging", "summarize", "format_stats", "Stat"]

_FORMAT = "%(asctime)s pycoll[%(process)d] %(name)s %(levelname)s %(message)s"


class Stat(collections.namedtuple("Stat", "op algorithm nbytes seconds world_size epoch ok retries")):
    """One finished collective: what, how, how big, how long, over whom."""


def configure_logging(level=None):
    """Set the ``pycoll`` logger's level (default: from ``PYCOLL_LOG``; nothing
    happens if neither is given). Adds a stderr handler only if no handler
    would otherwise print pycoll's records. Returns the level set, or None."""
    level = level if level is not None else os.environ.get("PYCOLL_LOG")
    if not level:
        return None
    if isinstance(level, str):
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ValueError(f"PYCOLL_LOG={level!r}: use debug, info, warning or error")
        level = value
    logger = logging.getLogger("pycoll")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    return level


def summarize(stats):
    """One dict per (op, algorithm): calls, failures, bytes, seconds, mean algbw."""
    rows = {}
    for s in stats:
        r = rows.setdefault((s.op, s.algorithm), {"op": s.op, "algorithm": s.algorithm, "calls": 0, "failed": 0,
                                                   "bytes": 0, "seconds": 0.0, "retries": 0})
        r["calls"] += 1
        r["failed"] += 0 if s.ok else 1
        r["bytes"] += s.nbytes
        r["seconds"] += s.seconds
        r["retries"] += s.retries
    for r in rows.values():
        r["algbw"] = r["bytes"] / r["seconds"] if r["seconds"] > 0 else 0.0
    return sorted(rows.values(), key=lambda r: (r["op"], r["algorithm"]))


def format_stats(stats):
    """:func:`summarize` as a text table."""
    rows = [[r["op"], r["algorithm"], str(r["calls"]), str(r["failed"]), human_size(r["bytes"]),
             f"{r['seconds'] * 1e3:.2f} ms", f"{r['algbw'] / 1e9:.3f}"] for r in summarize(stats)]
    return render_table(["op", "algorithm", "calls", "failed", "bytes", "time", "algbw GB/s"], rows)


def render_table(header, rows, align_numbers=True):
    """Align columns: text left, numbers right (unless ``align_numbers`` is False)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def numeric(s):
        return align_numbers and (s[:1].isdigit() or s.endswith("x"))
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  ".join(c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
