"""Long-haul links: how many connections per peer pair, how big their socket
buffers, and how a dead link is noticed.

One TCP connection carries at most ``window / RTT``, and its window is
bounded by socket buffers the kernel caps: without SO_SNDBUF/SO_RCVBUF
(autotuning) at ``net.ipv4.tcp_wmem``/``tcp_rmem`` maxima, with them at
twice ``net.core.wmem_max``/``rmem_max`` (the kernel doubles the request for
its bookkeeping). Stock kernels cap the send side at 4 MiB, so one stream
over a 50 ms round trip moves about 0.5 Gbit/s whatever the link could do.
A link of bandwidth B and round trip T needs B*T bytes in flight (its
bandwidth-delay product); pycoll opens ``k`` connections per pair (stripes)
so that k windows cover it, and the planners spread each collective's
segments round-robin over them.

    plan = link_plan(bandwidth_Bps=250e6, rtt_s=0.05)   # LinkPlan(stripes=..., sockbuf=...)
    pycoll.init(..., stripes="auto", link="2gbit/50ms") # or topology="sites.toml"

With a topology every link gets its own plan (:func:`topology_plans`); a
communicator opens the largest ``k`` any of its links needs to every peer
(an extra idle connection costs nothing) and uses the largest buffer.
"""
from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass

from pycoll.errors import InvalidArgument
from pycoll.options import environ, parse_stripes
from pycoll.units import parse_bandwidth, parse_duration

#: Fraction of a socket buffer TCP keeps in flight (measured here: one
#: autotuned stream over 50 ms moved 477 Mbit/s with a 4 MiB send cap, 0.71).
USABLE = 0.7
#: Windows cover this many bandwidth-delay products: room for loss recovery,
#: jitter and a receiver that is not scheduled at once (a 2-core box running
#: three ranks reached 81 % of a 2 Gbit/s link with 1.13 BDPs, 87 % with 2).
HEADROOM = 2.0
MAX_STRIPES = 16


@dataclass(frozen=True)
class LinkPlan:
    """Connections and buffers for one link. ``sockbuf`` 0 = kernel autotuning."""

    stripes: int
    sockbuf: int
    bdp: float     # bytes in flight the link needs
    window: float  # bytes one connection can keep in flight with this sockbuf


def _read_ints(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def kernel_limits():
    """Socket buffer caps of this network namespace (bytes)."""
    def one(path, default):
        v = _read_ints(path)
        return v if v else default
    return {
        "rmem_max": one("/proc/sys/net/core/rmem_max", [212992])[0],
        "wmem_max": one("/proc/sys/net/core/wmem_max", [212992])[0],
        "tcp_rmem_max": one("/proc/sys/net/ipv4/tcp_rmem", [4096, 131072, 6291456])[-1],
        "tcp_wmem_max": one("/proc/sys/net/ipv4/tcp_wmem", [4096, 16384, 4194304])[-1],
    }


def connection_window(sockbuf=0, limits=None):
    """Bytes one connection can keep in flight: autotuned (sockbuf 0) or with
    SO_SNDBUF = SO_RCVBUF = sockbuf."""
    lim = limits or kernel_limits()
    if sockbuf > 0:
        send = 2 * min(sockbuf, lim["wmem_max"])
        recv = 2 * min(sockbuf, lim["rmem_max"])
    else:
        send, recv = lim["tcp_wmem_max"], lim["tcp_rmem_max"]
    return USABLE * min(send, recv)


def link_plan(bandwidth_Bps, rtt_s, *, max_stripes=MAX_STRIPES, limits=None):
    """Stripes and socket buffer size for a link of ``bandwidth_Bps`` bytes/s
    and round trip ``rtt_s`` (see the module docstring)."""
    lim = limits or kernel_limits()
    if not bandwidth_Bps or not math.isfinite(bandwidth_Bps) or rtt_s <= 0:
        return LinkPlan(1, 0, 0.0, connection_window(0, lim))
    bdp = float(bandwidth_Bps) * float(rtt_s)
    need = HEADROOM * bdp
    auto = connection_window(0, lim)
    if need <= auto:
        return LinkPlan(1, 0, bdp, auto)
    biggest = min(lim["rmem_max"], lim["wmem_max"])
    if connection_window(biggest, lim) <= auto:  # explicit buffers would be smaller than autotuning's
        k = min(max_stripes, math.ceil(need / auto))
        return LinkPlan(k, 0, bdp, auto)
    # the fewest connections, each with the largest buffers the kernel grants
    k = min(max_stripes, math.ceil(need / connection_window(biggest, lim)))
    return LinkPlan(k, biggest, bdp, connection_window(biggest, lim))


def topology_plans(topology, limits=None):
    """{(u, v): LinkPlan} for every directed link of a pycoll.plan.topology.Topology
    (round trip = latency u->v + latency v->u)."""
    lim = limits or kernel_limits()
    n = topology.world_size
    out = {}
    for u in range(n):
        for v in range(n):
            if u != v:
                fwd, back = topology.link(u, v), topology.link(v, u)
                out[(u, v)] = link_plan(fwd.bandwidth_Bps, fwd.latency_s + back.latency_s, limits=lim)
    return out


# The round trip follows the last "/" or "@": a bandwidth may itself contain one ("100 Mbit/s/20ms").
_LINK_RE = re.compile(r"\s*(.+?)\s*[/@]\s*([^/@]+?)\s*\Z")


def parse_link(text):
    """"2gbit/50ms" (bandwidth / round trip) -> (bytes/s, seconds), in :mod:`pycoll.units`'
    spellings ("100mbps/20ms" is 100 megabits per second)."""
    m = _LINK_RE.match(str(text))
    if not m:
        raise ValueError(f"link {text!r}: expected BANDWIDTH/RTT, e.g. '2gbit/50ms'")
    try:
        return (parse_bandwidth(m.group(1), "link bandwidth"),
                parse_duration(m.group(2), "link rtt", what="round trip"))
    except ValueError as exc:
        raise ValueError(f"link {text!r}: {exc}") from None


def comm_options(*, link=None, topology=None, limits=None):
    """``stripes`` and ``sockbuf`` for a communicator from a link description
    ("2gbit/50ms" or (bytes/s, rtt s)) or a topology (file path or object):
    the most any of its links needs."""
    if topology == "measure":  # measured when the group forms: nothing to plan from yet
        topology = None
    if topology is not None:
        if isinstance(topology, (str, os.PathLike)):
            from pycoll.plan.topology import load_topology
            topology = load_topology(topology)
        plans = list(topology_plans(topology, limits).values()) or [LinkPlan(1, 0, 0.0, 0.0)]
    elif link is not None:
        bw, rtt = parse_link(link) if isinstance(link, str) else link
        plans = [link_plan(bw, rtt, limits=limits)]
    else:
        raise ValueError("stripes='auto' needs link='BANDWIDTH/RTT' or topology=")
    return {"stripes": max(p.stripes for p in plans), "sockbuf": max(p.sockbuf for p in plans)}


def set_keepalive(fds, stall_timeout, user_timeout=None):
    """Let the kernel notice a dead or cut link within about ``stall_timeout`` seconds: on an
    idle connection, keepalive probes, which a live peer's kernel answers even while the peer
    itself is busy elsewhere (so a slow peer is never mistaken for a dead link); on one with
    bytes in flight, TCP_USER_TIMEOUT of ``user_timeout`` seconds (default ``stall_timeout``):
    unacknowledged that long, dead. Since Linux 5.11 that timer also runs while a live peer
    keeps its window shut (it is busy, not reading), so callers pass a ``user_timeout`` no
    shorter than a slow peer may take. The connection then fails with ETIMEDOUT, and a
    collective waiting on it with it (docs/fault-model.md, cut links). Acts on raw fds; leaves
    them open."""
    if not stall_timeout or stall_timeout <= 0:
        return
    idle = max(1, int(stall_timeout / 2))
    intvl = max(1, int((stall_timeout - idle) / 4))
    cnt = max(1, min(4, int((stall_timeout - idle) / intvl)))
    user_ms = int((stall_timeout if user_timeout is None else user_timeout) * 1000)
    for fd in fds:
        if fd < 0:
            continue
        s = socket.socket(fileno=fd)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
            if user_ms > 0:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_ms)
        except OSError:
            pass
        finally:
            s.detach()


def resolve_stripes(stripes, options):
    """Turn ``stripes`` (an int, "auto", or None for $PYCOLL_STRIPES, else "auto" when a link or
    topology is known, else 1) plus the ``link=``/``topology=`` options (or $PYCOLL_LINK /
    $PYCOLL_TOPOLOGY) into (stripes, remaining options); "auto" also fills in ``sockbuf`` unless
    given. (``pycoll aggregator`` resolves its stripes as the workers do; pycoll.init and
    pycoll.connect resolve theirs in :class:`pycoll.options.Options`, then :func:`settle`.)"""
    options = dict(options)
    link = options.pop("link", None) or environ("PYCOLL_LINK")
    topology = options.get("topology") or environ("PYCOLL_TOPOLOGY")  # the communicator uses it too
    if stripes is None:  # default: from the links when we know them, else one connection
        stripes = environ("PYCOLL_STRIPES") or ("auto" if (link or topology not in (None, "", "measure")) else 1)
    stripes = parse_stripes(stripes)
    if stripes == "auto":
        auto = comm_options(link=link, topology=topology)
        options.setdefault("sockbuf", auto["sockbuf"])
        return auto["stripes"], options
    return stripes, options


def settle(options):
    """``options`` (:class:`pycoll.options.Options`) with ``stripes="auto"`` turned into the
    stripes and socket buffers its ``link`` or ``topology`` needs (:func:`comm_options`; a
    ``sockbuf`` given stays), and a ``sockbuf`` not given made 0 (the kernel's)."""
    if options.stripes == "auto":
        try:
            auto = comm_options(link=options.link, topology=options.topology)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return options.replace(stripes=auto["stripes"],
                               sockbuf=auto["sockbuf"] if options.sockbuf is None else options.sockbuf)
    return options if options.sockbuf is not None else options.replace(sockbuf=0)
