"""Description of an emulated network: peers, directed links, NIC caps.

`EmuSpec` is deliberately small and duck-typed so that other parts of pycoll
(e.g. ``pycoll.plan.topology.Topology``) can be converted with
:meth:`EmuSpec.from_topology` without this package importing them.

Units: rates are **bits per second**, times are seconds, loss is a probability
in [0, 1] applied per packet.  Strings are read by :mod:`pycoll.units`, the same
parser as topology files and ``link=``: "100mbit" and "100mbps" are both 100
megabits per second (tc would read "100mbps" as megabytes; :func:`tc_rate` is the
one place that writes rates for tc, always as plain ``bit``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from ..units import parse_bandwidth, parse_duration

__all__ = ["LinkSpec", "SiteSpec", "EmuSpec", "parse_rate", "parse_time", "tc_rate", "tc_size"]


class LinkSpec(NamedTuple):
    """One directed link u -> v.

    A NamedTuple so ``rate_bps, delay_s, loss = spec.link(u, v)`` also works.
    ``rate_bps`` None means "not capped" (only the host NIC cap, if any,
    applies).  ``jitter_s`` is a uniform +-jitter that never reorders.
    """

    rate_bps: Optional[float]
    delay_s: float
    loss: float = 0.0
    jitter_s: float = 0.0

    def validated(self) -> "LinkSpec":
        r = None if self.rate_bps is None else float(self.rate_bps)
        if r is not None and not (r > 0 and math.isfinite(r)):
            raise ValueError(f"rate_bps must be positive or None, got {self.rate_bps!r}")
        d, l, j = float(self.delay_s), float(self.loss), float(self.jitter_s)
        if not (0 <= d < 3600):
            raise ValueError(f"delay_s out of range: {d}")
        if not (0 <= l <= 1):
            raise ValueError(f"loss must be in [0,1]: {l}")
        if not (0 <= j < 3600):
            raise ValueError(f"jitter_s out of range: {j}")
        return LinkSpec(r, d, l, j)


LinkLike = Union[LinkSpec, Tuple, Dict]


class SiteSpec(NamedTuple):
    """A rack or site: its ranks sit behind one router, and everything they send to (receive
    from) other sites crosses that router's uplink, ``uplink_bps`` per direction, shared by all
    of them (None: not capped). Members need not be contiguous ranks."""

    members: Tuple[int, ...]
    uplink_bps: Optional[float] = None
    name: str = ""


def _as_link(v: LinkLike) -> LinkSpec:
    if isinstance(v, LinkSpec):
        return v.validated()
    if isinstance(v, dict):
        return LinkSpec(v.get("rate_bps"), v.get("delay_s", 0.0), v.get("loss", 0.0),
                        v.get("jitter_s", 0.0)).validated()
    if isinstance(v, (tuple, list)):
        return LinkSpec(*v).validated()
    raise TypeError(f"cannot interpret {v!r} as a link (want LinkSpec/tuple/dict)")


@dataclass
class EmuSpec:
    """Emulated network: ``n_peers`` hosts, a full mesh of directed links.

    ``link`` is either a callable ``link(u, v) -> LinkSpec | (rate_bps,
    delay_s, loss[, jitter_s])`` or a dict mapping ``(u, v)`` to such a value
    (missing pairs use ``default_link``).  ``host_nic_bps`` caps each host's
    total egress and, separately, total ingress (a full-duplex NIC); it may be
    a number, None, or a per-rank sequence.
    """

    n_peers: int
    link: Union[Callable[[int, int], LinkLike], Dict[Tuple[int, int], LinkLike]] = field(
        default_factory=dict)
    host_nic_bps: Union[None, float, Sequence[Optional[float]]] = None
    default_link: LinkLike = LinkSpec(None, 0.0, 0.0)
    sites: Optional[Sequence[SiteSpec]] = None

    def __post_init__(self) -> None:
        if int(self.n_peers) != self.n_peers or not (1 <= self.n_peers <= 1000):
            raise ValueError(f"n_peers must be an int in [1, 1000], got {self.n_peers!r}")
        self.n_peers = int(self.n_peers)
        if self.sites is not None:
            self.sites = _check_sites(self.sites, self.n_peers)
        if self.host_nic_bps is not None and not isinstance(self.host_nic_bps, (int, float)):
            if len(self.host_nic_bps) != self.n_peers:
                raise ValueError("host_nic_bps sequence must have n_peers entries")

    # -- queries -----------------------------------------------------------
    def link_spec(self, u: int, v: int) -> LinkSpec:
        """Validated LinkSpec of the directed link u -> v."""
        if not (0 <= u < self.n_peers and 0 <= v < self.n_peers) or u == v:
            raise ValueError(f"bad link ({u}, {v}) for {self.n_peers} peers")
        if callable(self.link):
            return _as_link(self.link(u, v))
        return _as_link(self.link.get((u, v), self.default_link))

    def nic_bps(self, rank: int) -> Optional[float]:
        """NIC cap of host ``rank`` in bits/s, or None."""
        h = self.host_nic_bps
        if h is None or isinstance(h, (int, float)):
            v = h
        else:
            v = h[rank]
        if v is None:
            return None
        v = float(v)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"host_nic_bps must be positive, got {v}")
        return v

    def site_of(self, rank: int) -> Optional[int]:
        """Index of the site holding ``rank`` (None without sites)."""
        if not self.sites:
            return None
        return next(i for i, s in enumerate(self.sites) if rank in s.members)

    def site_link(self, a: int, b: int) -> LinkSpec:
        """The link between the routers of sites a and b: delay, jitter and loss of the link
        between their first members (per-pair rates do not apply behind a shared uplink)."""
        ls = self.link_spec(self.sites[a].members[0], self.sites[b].members[0])
        return LinkSpec(None, ls.delay_s, ls.loss, ls.jitter_s)

    def links(self):
        """Yield (u, v, LinkSpec) for every directed pair."""
        for u in range(self.n_peers):
            for v in range(self.n_peers):
                if u != v:
                    yield u, v, self.link_spec(u, v)

    # -- constructors --------------------------------------------------------
    @classmethod
    def uniform(cls, n_peers: int, rate_bps: Optional[float] = None, delay_s: float = 0.0,
                loss: float = 0.0, jitter_s: float = 0.0,
                host_nic_bps: Optional[float] = None) -> "EmuSpec":
        """Every directed link identical."""
        ls = LinkSpec(rate_bps, delay_s, loss, jitter_s).validated()
        return cls(n_peers, link=lambda u, v: ls, host_nic_bps=host_nic_bps)

    @classmethod
    def from_topology(cls, topo, host_nic_bps=None) -> "EmuSpec":
        """Convert a duck-typed topology object.

        Expects ``topo.world_size`` and ``topo.link(u, v)`` returning an object
        with ``bandwidth_Bps`` (bytes/s; None/0/inf = uncapped), ``latency_s``
        and optionally ``loss`` and ``jitter_s``.  A host NIC cap is taken
        from the argument, else from ``topo.host_nic_Bps`` / ``topo.nic_Bps``
        (bytes/s, number or per-rank sequence) if the topology has one.
        """
        n = int(topo.world_size)

        def conv_Bps(b):
            if b is None:
                return None
            b = float(b)
            if b <= 0 or not math.isfinite(b):
                return None
            return b * 8.0

        def link(u, v):
            l = topo.link(u, v)
            if l is None:
                return LinkSpec(None, 0.0, 0.0)
            return LinkSpec(conv_Bps(getattr(l, "bandwidth_Bps", None)),
                            float(getattr(l, "latency_s", 0.0) or 0.0),
                            float(getattr(l, "loss", 0.0) or 0.0),
                            float(getattr(l, "jitter_s", 0.0) or 0.0))

        if host_nic_bps is None:
            nic = getattr(topo, "host_nic_Bps", None)
            if nic is None:
                nic = getattr(topo, "nic_Bps", None)
            if callable(nic):
                nic = [nic(r) for r in range(n)]
            if nic is not None:
                if isinstance(nic, (int, float)):
                    host_nic_bps = conv_Bps(nic)
                else:
                    host_nic_bps = [conv_Bps(x) for x in nic]
        # Materialise now: the topology object may be mutable or expensive.
        table = {(u, v): link(u, v) for u in range(n) for v in range(n) if u != v}
        # Groups with a shared uplink become sites behind routers (then every group is one).
        groups = list(getattr(topo, "groups", ()) or ())
        uplinks = [conv_Bps(getattr(g, "uplink_Bps", None)) for g in groups]
        sites = None
        if any(u is not None for u in uplinks):
            sites = [SiteSpec(tuple(g.ranks), u, g.name) for g, u in zip(groups, uplinks)]
        return cls(n, link=table, host_nic_bps=host_nic_bps, sites=sites)

    @classmethod
    def coerce(cls, obj) -> "EmuSpec":
        """Accept an EmuSpec, a topology-like object, or a plain dict.

        Dict keys: n_peers (or world_size), rate / rate_bps, delay / delay_s,
        loss, jitter / jitter_s, host_nic / host_nic_bps; rates and times may
        be strings like "100mbit" / "25ms".
        """
        if isinstance(obj, EmuSpec):
            return obj
        if isinstance(obj, dict):
            d = dict(obj)
            n = d.pop("n_peers", None) or d.pop("world_size", None) or d.pop("peers", None)
            if n is None:
                raise ValueError("dict spec needs n_peers")
            rate = d.pop("rate_bps", d.pop("rate", None))
            delay = d.pop("delay_s", d.pop("delay", 0.0))
            jitter = d.pop("jitter_s", d.pop("jitter", 0.0))
            loss = float(d.pop("loss", 0.0))
            nic = d.pop("host_nic_bps", d.pop("host_nic", None))
            if d:
                raise ValueError(f"unknown keys in dict spec: {sorted(d)}")
            return cls.uniform(int(n), parse_rate(rate), parse_time(delay), loss,
                               parse_time(jitter), parse_rate(nic))
        if hasattr(obj, "world_size") and hasattr(obj, "link"):
            return cls.from_topology(obj)
        if hasattr(obj, "n_peers") and hasattr(obj, "link"):
            return cls(obj.n_peers, obj.link, getattr(obj, "host_nic_bps", None))
        raise TypeError(f"cannot build an EmuSpec from {type(obj).__name__}")


def _check_sites(sites, n: int) -> list:
    """Sites must partition the ranks 0..n-1 (each rank behind exactly one router)."""
    out, seen = [], set()
    for i, s in enumerate(sites):
        s = SiteSpec(*s) if not isinstance(s, SiteSpec) else s
        members = tuple(int(m) for m in s.members)
        if not members:
            raise ValueError(f"site {i} has no members")
        for m in members:
            if not 0 <= m < n or m in seen:
                raise ValueError(f"site {i}: rank {m} out of range or in two sites")
            seen.add(m)
        up = s.uplink_bps
        if up is not None and not (float(up) > 0 and math.isfinite(float(up))):
            raise ValueError(f"site {i}: uplink_bps must be positive or None, got {up!r}")
        out.append(SiteSpec(members, None if up is None else float(up), s.name or f"site{i}"))
    if len(seen) != n:
        raise ValueError(f"sites cover {len(seen)} of {n} ranks: every rank needs a site")
    if len(out) > 250:
        raise ValueError("at most 250 sites")
    return out


def parse_rate(v) -> Optional[float]:
    """A rate in :mod:`pycoll.units` spellings -> bits/s (the emulator's unit), or None (uncapped).

    '100mbit' and '100mbps' -> 1e8 ("mbps" is megabits per second everywhere in pycoll, unlike
    tc, where it means megabytes; see :func:`tc_rate` for what tc is given); '12.5MB/s' -> 1e8.
    Numbers, and strings without a unit, are bits/s. None, '', 'none', 'inf', 'unlimited', 0
    -> None."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None if (v <= 0 or not math.isfinite(v)) else float(v)
    s = str(v).strip()
    if s.lower() in ("", "none", "inf", "unlimited", "0"):
        return None
    return parse_bandwidth(s, "rate", bare="bit") * 8


def parse_time(v) -> float:
    """'25ms' -> 0.025 (:func:`pycoll.units.parse_duration`); plain numbers are seconds; None -> 0."""
    if v is None:
        return 0.0
    return parse_duration(v, "time", bare="s")


def tc_rate(rate_bps: float) -> str:
    """bits/s -> a tc rate, always in tc's explicit ``bit`` unit ("100000000bit").

    tc reads "mbps" as megaBYTES per second while pycoll reads it as megabits, so the emulator
    never passes a user's spelling through: every rate it gives tc goes through here."""
    r = float(rate_bps)
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"tc rate must be positive and finite, got {rate_bps!r}")
    return f"{max(1, int(r))}bit"


def tc_size(nbytes: float) -> str:
    """bytes -> a tc size ("3000b": in tc sizes a bare ``b`` is bytes)."""
    return f"{max(1, int(nbytes))}b"
