"""Network topologies: who the peers are, how they are grouped, and what each link can carry.

A topology file is TOML (read with :mod:`tomllib`)::

    name = "two-racks"              # optional; defaults to the file's stem

    [defaults]                      # every link unless something more specific applies
    bandwidth = "10gbit"            # per link, per direction
    latency = "50us"                # one way
    loss = 0.0                      # fraction of packets lost, 0 <= loss < 1
    host_nic = "25gbit"             # one NIC cap per host, per direction (traffic between hosts)

    [intra]                         # links between two peers of the same group (optional)
    bandwidth = "100gbit"
    latency = "5us"

    [[group]]                       # a rack, a site, a host
    name = "rack0"
    peers = ["r0p0", "r0p1"]        # or: count = 2  (names become "rack0-0", "rack0-1")
    aggregator = "switch"           # optional: "switch" | "agent"
    host = "box0"                   # optional: all peers of the group on one host
    ranks = [0, 1]                  # optional: the peers' ranks (then in every group; any order,
                                    # together 0..n-1), as `pycoll probe` writes for sites
                                    # that are not contiguous in rank order
    uplink = "100mbit"              # optional: one link, per direction, carries everything the
                                    # group exchanges with other groups (a rack's uplink)

    [[link]]                        # overrides between groups or peers (optional)
    a = "rack0"                     # a group name or a peer name
    b = "rack1"
    bandwidth = "1gbit"
    latency = "5ms"
    symmetric = true                # default; false sets only the a -> b direction

Units (:mod:`pycoll.units`, the same everywhere in pycoll). Bandwidth: a number, an optional
prefix ``k m g t`` (either case, powers of 1000) or ``Ki Mi Gi Ti`` (powers of 1024) and a unit,
either bits (``bit``, ``bit/s``, ``bps``, ``b/s``) or bytes (``B``, ``B/s``, ``Bps``);
``"unlimited"`` means no cap. ``"100mbps"`` is 100 megabits per second (not tc's megabytes).
Examples: ``"10gbit"``, ``"100Mbps"``, ``"1.25GB"``, ``"1GiB/s"``.
Latency: a number and ``ns``, ``us`` (or ``µs``), ``ms`` or ``s``; a bare ``0`` is allowed.
Internally bandwidth is bytes per second and latency seconds.

Ranks. Peers are numbered in file order: the first group's peers get ranks 0, 1, ..., then the
next group's, unless every group gives its peers' ``ranks``. ``peers[rank]`` is the peer's name.

Resolution of ``link(u, v)`` (directed), each layer overriding only the fields it sets:
``[defaults]``; then ``[intra]`` if u and v share a group; then the ``[[link]]`` entries that
cover u -> v, least specific first (group-group, then peer-group or group-peer, then peer-peer),
and within one level in file order, so a later entry wins. A ``[[link]]`` whose two ends name the
same group overrides the links inside that group.

Hosts. A group with ``host`` puts all its peers on that host (several groups may name the same
host); without it every peer is its own host named after the peer. ``host_nic`` caps each host's
traffic to other hosts, per direction, shared by all its peers' links; it is not folded into the
link matrices (see :meth:`Topology.host_nic_Bps`).

Uplinks. A group with ``uplink`` sits behind one link to the rest of the network: all its
members' traffic to (and, separately, from) other groups shares that capacity, on top of each
link's own ``bandwidth``. The cost model counts it as one resource per direction; the emulator
builds a router per group (:mod:`pycoll.emulator.sites`).

Aggregators. ``"switch"``: the group has a standalone software aggregator (the rack switch) that
sums the members' data; ``"agent"``: the group's lowest-ranked member aggregates for the group.

Any mistake raises :class:`TopologyError` naming the file and the field (e.g.
``two-racks.toml: group[1].peers[2]: duplicate peer name 'r0p0' (also in group 'rack0')``);
TOML syntax errors carry tomllib's line and column.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pycoll import units as _units
from pycoll.plan import tsp

__all__ = [
    "TopologyError",
    "LinkParams",
    "Group",
    "Topology",
    "load_topology",
    "parse_topology",
    "single_host",
    "ring_order",
    "parse_bandwidth",
    "parse_latency",
]

AGGREGATORS = ("switch", "agent")
_TOP_KEYS = {"name", "defaults", "intra", "group", "link"}
_LINK_FIELDS = {"bandwidth", "latency", "loss"}
_DEFAULT_KEYS = _LINK_FIELDS | {"host_nic"}
_GROUP_KEYS = {"name", "peers", "count", "aggregator", "host", "uplink", "ranks"}
_OVERRIDE_KEYS = _LINK_FIELDS | {"a", "b", "symmetric"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class TopologyError(ValueError):
    """A topology file (or string) is invalid; the message names the source and the field."""


@dataclass(frozen=True)
class LinkParams:
    """One direction of a link: bandwidth in bytes/s (inf = no cap), one-way latency, loss."""

    bandwidth_Bps: float
    latency_s: float
    loss: float = 0.0


@dataclass(frozen=True)
class Group:
    """A named set of peers (a rack, a site): its ranks (contiguous unless the file gives
    ``ranks``), optional aggregator, host and shared uplink."""

    name: str
    ranks: tuple[int, ...]
    peers: tuple[str, ...]
    aggregator: str | None = None
    host: str | None = None
    uplink_Bps: float = math.inf

    @property
    def agent_rank(self) -> int | None:
        """The rank that aggregates for an ``aggregator = "agent"`` group (its lowest), else None."""
        return min(self.ranks) if self.aggregator == "agent" else None


# --- units (pycoll.units is the one parser; these keep the field names topology errors use) -----


def parse_bandwidth(value: Any, field: str = "bandwidth") -> float:
    """Parse a bandwidth such as ``"10gbit"``, ``"100mbps"`` or ``"1.25GB"`` into bytes per second
    (see :func:`pycoll.units.parse_bandwidth`; "mbps" is megabits per second)."""
    return _units.parse_bandwidth(value, field)


def parse_latency(value: Any, field: str = "latency") -> float:
    """Parse a one-way latency such as ``"50us"`` or ``"5ms"`` into seconds (bare 0 allowed;
    see :func:`pycoll.units.parse_duration`)."""
    return _units.parse_duration(value, field, what="latency")


def _parse_loss(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number (a fraction, 0 <= loss < 1), got {value!r}")
    if value < 0:
        raise ValueError(f"{field}: must not be negative, got {value!r}")
    if value >= 1:
        raise ValueError(f"{field}: must be a fraction below 1, got {value!r}")
    return float(value)


# --- the topology ----------------------------------------------------------------------------


class Topology:
    """A loaded topology: peers (rank = index), groups, hosts and per-direction link parameters.

    Build one with :func:`load_topology`, :func:`parse_topology` or :func:`single_host`.
    """

    def __init__(
        self,
        name: str,
        source: str,
        groups: tuple[Group, ...],
        hosts: tuple[str, ...],
        host_nic_Bps: float,
        bandwidth: np.ndarray,
        latency: np.ndarray,
        loss: np.ndarray,
    ) -> None:
        self.name = name
        self.source = source
        self.groups = groups
        by_rank = sorted((r, p, gi) for gi, g in enumerate(groups) for r, p in zip(g.ranks, g.peers))
        self.peers = tuple(p for _, p, _ in by_rank)
        self._hosts = hosts
        self._host_nic_Bps = host_nic_Bps
        self._bandwidth = bandwidth
        self._latency = latency
        self._loss = loss
        self._rank_of = {peer: rank for rank, peer in enumerate(self.peers)}
        self._group_index = [gi for _, _, gi in by_rank]

    def __repr__(self) -> str:
        group_names = [g.name for g in self.groups]
        return f"Topology(name={self.name!r}, world_size={self.world_size}, groups={group_names})"

    @property
    def world_size(self) -> int:
        """Number of peers."""
        return len(self.peers)

    def rank_of(self, peer: str) -> int:
        """The rank of a peer name."""
        try:
            return self._rank_of[peer]
        except KeyError:
            raise KeyError(f"no peer named {peer!r} in topology {self.name!r}") from None

    def group_of(self, rank: int) -> Group:
        """The group holding ``rank``."""
        return self.groups[self._group_index[self._check_rank(rank)]]

    def host_of(self, rank: int) -> str:
        """The host name of ``rank`` (the group's ``host``, else the peer's own name)."""
        return self._hosts[self._check_rank(rank)]

    def hosts(self) -> list[str]:
        """Distinct host names in rank order."""
        return list(dict.fromkeys(self._hosts))

    def host_nic_Bps(self, host: str | int | None = None) -> float:
        """The per-direction NIC cap of a host in bytes/s (inf when uncapped); same for all hosts.

        ``host`` may also be a rank (the emulator asks per rank: ``EmuSpec.from_topology``).
        """
        if isinstance(host, (int, np.integer)) and not isinstance(host, bool):
            host = self.host_of(int(host))
        if host is not None and host not in self._hosts:
            raise KeyError(f"no host named {host!r} in topology {self.name!r}")
        return self._host_nic_Bps

    def uplinks_Bps(self) -> list[float]:
        """Each group's shared uplink in bytes/s, per direction (inf: none), in group order."""
        return [g.uplink_Bps for g in self.groups]

    def group_index(self, rank: int) -> int:
        """Index into ``groups`` of the group holding ``rank``."""
        return self._group_index[self._check_rank(rank)]

    def aggregator_groups(self) -> list[Group]:
        """Groups that have an aggregator ("switch" or "agent"), in file order."""
        return [g for g in self.groups if g.aggregator is not None]

    def link(self, u: int | str, v: int | str) -> LinkParams:
        """Parameters of the directed link u -> v (ranks or peer names)."""
        a, b = self._as_rank(u), self._as_rank(v)
        if a == b:
            raise ValueError(f"no link from rank {a} to itself")
        return LinkParams(float(self._bandwidth[a, b]), float(self._latency[a, b]), float(self._loss[a, b]))

    def bandwidth_matrix(self) -> np.ndarray:
        """``[u, v]`` = bandwidth of u -> v in bytes/s; the diagonal is inf."""
        return self._bandwidth.copy()

    def latency_matrix(self) -> np.ndarray:
        """``[u, v]`` = one-way latency of u -> v in seconds; the diagonal is 0."""
        return self._latency.copy()

    def loss_matrix(self) -> np.ndarray:
        """``[u, v]`` = loss fraction of u -> v; the diagonal is 0."""
        return self._loss.copy()

    def _as_rank(self, peer: int | str) -> int:
        return self.rank_of(peer) if isinstance(peer, str) else self._check_rank(peer)

    def _check_rank(self, rank: int) -> int:
        is_int = isinstance(rank, (int, np.integer)) and not isinstance(rank, bool)
        if not is_int or not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank!r} out of range for world size {self.world_size}")
        return int(rank)


# --- loading ---------------------------------------------------------------------------------


def load_topology(path: str | Path) -> Topology:
    """Load and validate a topology file; raises TopologyError naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TopologyError(f"{path}: cannot read topology file: {err}") from err
    return parse_topology(text, source=str(path))


MEASURE = "measure"  # topology="measure": probed when a group forms (pycoll.net.probe)


def load(spec: Topology | str | Path | None) -> Topology | None:
    """A Topology from a Topology (returned as it is), a path to a TOML file, or None/"" (None):
    what ``pycoll.init(topology=...)`` and ``pycoll aggregator --topology`` accept. ``"measure"``
    is None here too: the communicator measures its topology when a group forms."""
    if spec is None or spec == "" or spec == MEASURE:
        return None
    if hasattr(spec, "world_size"):
        return spec
    return load_topology(spec)


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Parse and validate topology TOML; ``source`` names the text in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TopologyError(f"{source}: invalid TOML: {err}") from err
    try:
        return _build(data, source)
    except ValueError as err:  # the field-level messages; add the source in one place
        raise TopologyError(f"{source}: {err}") from err


def single_host(n: int) -> Topology:
    """The default topology: one group ``local`` of n peers ``p0..p{n-1}`` on one host, no caps."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    peers = ", ".join(f'"p{i}"' for i in range(n))
    text = (
        f'name = "single-host-{n}"\n[defaults]\nbandwidth = "unlimited"\nlatency = 0\n'
        f'[[group]]\nname = "local"\nhost = "localhost"\npeers = [{peers}]\n'
    )
    return parse_topology(text, source=f"<single_host({n})>")


def _check_keys(table: Any, allowed: set[str], field: str) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{field}: expected a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        where = f"{field}.{unknown[0]}" if field else unknown[0]
        raise ValueError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return table


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{field}: expected a name of letters, digits, '_', '.', '-' "
            f"(not starting with a symbol), got {value!r}"
        )
    return value


def _link_fields(table: dict, field: str) -> dict[str, float]:
    """The link fields present in ``table``, parsed; absent ones are left to lower layers."""
    parsed: dict[str, float] = {}
    if "bandwidth" in table:
        parsed["bandwidth"] = parse_bandwidth(table["bandwidth"], f"{field}.bandwidth")
    if "latency" in table:
        parsed["latency"] = parse_latency(table["latency"], f"{field}.latency")
    if "loss" in table:
        parsed["loss"] = _parse_loss(table["loss"], f"{field}.loss")
    return parsed


def _build(data: dict, source: str) -> Topology:
    _check_keys(data, _TOP_KEYS, "")
    name = data.get("name", Path(source).stem if not source.startswith("<") else "topology")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")

    defaults = _check_keys(data.get("defaults", {}), _DEFAULT_KEYS, "defaults")
    base = {"bandwidth": math.inf, "latency": 0.0, "loss": 0.0} | _link_fields(defaults, "defaults")
    host_nic = math.inf
    if "host_nic" in defaults:
        host_nic = parse_bandwidth(defaults["host_nic"], "defaults.host_nic")
    intra = _link_fields(_check_keys(data.get("intra", {}), _LINK_FIELDS, "intra"), "intra")

    groups, hosts = _build_groups(data.get("group"))
    n = sum(len(g.ranks) for g in groups)
    layers = {key: np.full((n, n), value, dtype=float) for key, value in base.items()}
    for g in groups:
        block = np.ix_(g.ranks, g.ranks)
        for key, value in intra.items():
            layers[key][block] = value
    for (rows, cols), fields in _build_overrides(data.get("link", []), groups):
        block = np.ix_(rows, cols)
        for key, value in fields.items():
            layers[key][block] = value
    np.fill_diagonal(layers["bandwidth"], math.inf)
    np.fill_diagonal(layers["latency"], 0.0)
    np.fill_diagonal(layers["loss"], 0.0)
    return Topology(
        name, source, groups, hosts, host_nic, layers["bandwidth"], layers["latency"], layers["loss"]
    )


def _build_groups(raw: Any) -> tuple[tuple[Group, ...], tuple[str, ...]]:
    if raw is None:
        raise ValueError("group: at least one [[group]] is required")
    if not isinstance(raw, list) or not raw:
        raise ValueError("group: expected a non-empty array of tables ([[group]])")
    groups: list[Group] = []
    hosts: list[tuple[int, str]] = []  # (rank, host)
    explicit: list[bool] = []
    owner: dict[str, str] = {}  # peer name -> group name, to report duplicates
    group_names: dict[str, int] = {}
    for gi, table in enumerate(raw):
        field = f"group[{gi}]"
        _check_keys(table, _GROUP_KEYS, field)
        if "name" not in table:
            raise ValueError(f"{field}.name: missing")
        gname = _name(table["name"], f"{field}.name")
        if gname in group_names:
            raise ValueError(
                f"{field}.name: duplicate group name {gname!r} (also group[{group_names[gname]}])"
            )
        group_names[gname] = gi
        peers = _group_peers(table, field, gname)
        for pi, peer in enumerate(peers):
            if peer in owner:
                raise ValueError(
                    f"{field}.peers[{pi}]: duplicate peer name {peer!r} (also in group {owner[peer]!r})"
                )
            owner[peer] = gname
        aggregator = table.get("aggregator")
        if aggregator is not None and aggregator not in AGGREGATORS:
            choices = ", ".join(map(repr, AGGREGATORS))
            raise ValueError(f"{field}.aggregator: expected one of {choices}, got {aggregator!r}")
        host = _name(table["host"], f"{field}.host") if "host" in table else None
        uplink = parse_bandwidth(table["uplink"], f"{field}.uplink") if "uplink" in table else math.inf
        first = sum(len(g.ranks) for g in groups)
        ranks = tuple(range(first, first + len(peers)))
        if "ranks" in table:
            given = table["ranks"]
            if (not isinstance(given, list) or len(given) != len(peers)
                    or not all(isinstance(r, int) and not isinstance(r, bool) for r in given)):
                raise ValueError(f"{field}.ranks: expected {len(peers)} integers, one per peer, got {given!r}")
            ranks = tuple(given)
        explicit.append("ranks" in table)
        hosts += [(r, host or peer) for r, peer in zip(ranks, peers)]
        groups.append(Group(gname, ranks, tuple(peers), aggregator, host, uplink))
    clash = sorted(set(owner) & set(group_names))
    if clash:
        raise ValueError(f"group[{group_names[clash[0]]}].name: {clash[0]!r} is both a group and a peer name")
    if any(explicit):
        if not all(explicit):
            raise ValueError(f"group[{explicit.index(False)}].ranks: missing (give ranks in every group or none)")
        if sorted(r for r, _ in hosts) != list(range(len(hosts))):
            raise ValueError(f"group: the groups' ranks must together be 0..{len(hosts) - 1}, each once")
    return tuple(groups), tuple(h for _, h in sorted(hosts))


def _group_peers(table: dict, field: str, gname: str) -> list[str]:
    if ("peers" in table) == ("count" in table):
        raise ValueError(f"{field}: give exactly one of 'peers' or 'count'")
    if "count" in table:
        count = table["count"]
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"{field}.count: expected an integer, got {count!r}")
        if count < 1:
            raise ValueError(f"{field}.count: empty group (count must be >= 1, got {count})")
        return [f"{gname}-{i}" for i in range(count)]
    peers = table["peers"]
    if not isinstance(peers, list):
        raise ValueError(f"{field}.peers: expected a list of names, got {peers!r}")
    if not peers:
        raise ValueError(f"{field}.peers: empty group")
    return [_name(p, f"{field}.peers[{i}]") for i, p in enumerate(peers)]


def _build_overrides(raw: Any, groups: tuple[Group, ...]) -> list[tuple[tuple[list[int], list[int]], dict]]:
    """Resolve [[link]] entries into (rows, cols) blocks, ordered so later ones should win."""
    if not isinstance(raw, list):
        raise ValueError("link: expected an array of tables ([[link]])")
    ranks_by_name: dict[str, tuple[list[int], bool]] = {}  # name -> (ranks, is_peer)
    for g in groups:
        ranks_by_name[g.name] = (list(g.ranks), False)
        for rank, peer in zip(g.ranks, g.peers):
            ranks_by_name[peer] = ([rank], True)
    entries = []
    for li, table in enumerate(raw):
        field = f"link[{li}]"
        _check_keys(table, _OVERRIDE_KEYS, field)
        ends = []
        for key in ("a", "b"):
            if key not in table:
                raise ValueError(f"{field}.{key}: missing (a group or peer name)")
            end = table[key]
            if not isinstance(end, str) or end not in ranks_by_name:
                raise ValueError(f"{field}.{key}: unknown group or peer {end!r}")
            ends.append(ranks_by_name[end])
        (a_ranks, a_peer), (b_ranks, b_peer) = ends
        if a_peer and b_peer and a_ranks == b_ranks:
            raise ValueError(f"{field}: a and b name the same peer {table['a']!r}")
        symmetric = table.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise ValueError(f"{field}.symmetric: expected true or false, got {symmetric!r}")
        fields = _link_fields(table, field)
        if not fields:
            raise ValueError(f"{field}: sets none of bandwidth, latency, loss")
        specificity = int(a_peer) + int(b_peer)
        entries.append((specificity, li, (a_ranks, b_ranks), fields))
        if symmetric:
            entries.append((specificity, li, (b_ranks, a_ranks), fields))
    entries.sort(key=lambda e: (e[0], e[1]))  # least specific first, then file order
    return [(block, fields) for _, _, block, fields in entries]


# --- ring order ------------------------------------------------------------------------------

# Nearest-neighbour from every start costs O(k^3) and 2-opt O(k^3) per pass over k nodes;
# above these sizes we fall back to a single start and to no 2-opt.
_ALL_STARTS_MAX = 64
_TWO_OPT_MAX = 200


def ring_order(topology: Topology) -> list[int]:
    """A ring order of all ranks that keeps each group contiguous; it starts at rank 0.

    Two levels, each solved as an asymmetric travelling-salesman problem with the objective
    "maximise the narrowest hop's bandwidth (the ring's bottleneck), then minimise the summed
    latency": the better of the natural order and nearest-neighbour tours from every start,
    improved by 2-opt. First the members of each group are ordered (starting at the group's
    lowest rank; uniform links keep rank order), then the groups, where the hop from group i to
    group j runs from i's last member to j's first. The result is never worse than plain rank
    order on that objective. Deterministic.
    """
    bw, lat = topology.bandwidth_matrix(), topology.latency_matrix()
    members = []
    for g in topology.groups:
        idx = np.ix_(g.ranks, g.ranks)
        members.append([g.ranks[i] for i in _best_cycle(bw[idx], lat[idx])])
    exits = [m[-1] for m in members]
    entries = [m[0] for m in members]
    group_bw = bw[np.ix_(exits, entries)]
    group_lat = lat[np.ix_(exits, entries)]
    np.fill_diagonal(group_bw, math.inf)  # a group never hops to itself
    np.fill_diagonal(group_lat, 0.0)
    ring = [rank for gi in _best_cycle(group_bw, group_lat) for rank in members[gi]]
    # The two levels are optimised apart, so check the whole ring against plain rank order.
    natural = list(range(topology.world_size))
    return max([natural, ring], key=lambda order: _ring_score(order, bw, lat))


def _ring_score(order: list[int], hop_bw: np.ndarray, hop_lat: np.ndarray) -> tuple[float, float]:
    """(narrowest hop bandwidth, minus summed latency) of a cyclic order: higher is better."""
    src, dst = order, order[1:] + order[:1]
    return (float(hop_bw[src, dst].min()), -float(hop_lat[src, dst].sum()))


def _best_cycle(hop_bw: np.ndarray, hop_lat: np.ndarray) -> list[int]:
    """The best cyclic order of nodes 0..k-1 for the bottleneck objective, rotated to start at 0:
    exact up to :data:`pycoll.plan.tsp.EXACT_MAX` nodes (an asymmetric TSP solved by
    Held-Karp), :func:`_heuristic_cycle` beyond. Ties keep the natural order."""
    k = len(hop_bw)
    off_diagonal = ~np.eye(k, dtype=bool)
    if k > 2 and all(np.all(m[off_diagonal] == m[0, 1]) for m in (hop_bw, hop_lat)):
        return list(range(k))  # uniform: every order is equally good, keep the natural one
    if 3 <= k <= tsp.EXACT_MAX:
        natural = list(range(k))
        exact = tsp.exact_cycle(hop_bw, hop_lat)
        if _ring_score(natural, hop_bw, hop_lat) >= _ring_score(exact, hop_bw, hop_lat):
            return natural
        return exact
    return _heuristic_cycle(hop_bw, hop_lat)


def _heuristic_cycle(hop_bw: np.ndarray, hop_lat: np.ndarray) -> list[int]:
    """A good cyclic order of nodes 0..k-1 for the bottleneck objective, rotated to start at 0."""
    k = len(hop_bw)
    off_diagonal = ~np.eye(k, dtype=bool)
    uniform = k > 1 and all(np.all(m[off_diagonal] == m[0, 1]) for m in (hop_bw, hop_lat))
    if k <= 2 or uniform:
        return list(range(k))  # every order is equally good: keep the natural one

    def score(order: list[int]) -> tuple[float, float]:
        return _ring_score(order, hop_bw, hop_lat)

    starts = range(k) if k <= _ALL_STARTS_MAX else [0]
    # The natural order is a candidate too, so the result is never worse than file order.
    candidates = [list(range(k))] + [_nearest_neighbour(s, hop_bw, hop_lat) for s in starts]
    best = max(candidates, key=score)
    if k <= _TWO_OPT_MAX:
        best = _two_opt(best, score)
    at = best.index(0)
    return best[at:] + best[:at]


def _nearest_neighbour(start: int, hop_bw: np.ndarray, hop_lat: np.ndarray) -> list[int]:
    order, left = [start], set(range(len(hop_bw))) - {start}
    while left:
        here = order[-1]
        # Widest next hop; ties go to the lower latency, then the lower index (determinism).
        nxt = min(left, key=lambda j: (-hop_bw[here, j], hop_lat[here, j], j))
        order.append(nxt)
        left.remove(nxt)
    return order


def _two_opt(order: list[int], score) -> list[int]:
    """Reverse segments while that strictly improves the score (reversal flips the hops' direction)."""
    best, best_score = order, score(order)
    improved = True
    while improved:
        improved = False
        for i in range(1, len(best) - 1):
            for j in range(i + 1, len(best)):
                candidate = best[:i] + best[i : j + 1][::-1] + best[j + 1 :]
                candidate_score = score(candidate)
                if candidate_score > best_score:
                    best, best_score, improved = candidate, candidate_score, True
    return best
