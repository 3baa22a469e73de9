"""What the algorithms need to know about a group: ring order, multi-ring cycles, groups and
their aggregators.

A :class:`Layout` is derived once per membership epoch from the topology (when its world size
matches the group's) or from defaults, and handed to the planners:

- ``ring``: the ring order; :func:`pycoll.plan.topology.ring_order` of the topology, else rank order.
- ``cycles``: the rings of the ``hamiltonian`` multi-ring, see :func:`multiring_cycles`.
- ``agg_of``: for ``innetwork``, the rank that aggregates each rank's group. Groups come from
  the topology (``[[group]]``); without one, ranks on the same host form a group. A group with
  an aggregator (``"agent"``, or ``"switch"`` standing in as an agent, see below) is aggregated
  by its lowest rank; ranks of a group without one stay in the ring themselves (incremental
  deployment), so ``agg_of[r] == r``.
- ``agg_ring``: the inter-group ring over the ring ranks, in ``ring`` order.

``aggregator = "switch"`` asks for a standalone software aggregator. Until one has joined the
group (see the README, "Standalone aggregator"), the group's lowest rank does the switch's work
as an agent: the schedule and the traffic between groups are the same.
"""
from __future__ import annotations

import logging

from pycoll.plan.hamiltonian import hamiltonian_cycles

log = logging.getLogger("pycoll")

# K*_4 and K*_6 have no decomposition into n-1 arc-disjoint Hamiltonian cycles (Tillson), so
# the best arc-disjoint set leaves n arcs idle. Instead we use a *double* cover: 2(n-1)
# Hamiltonian cycles that together use every ordered pair exactly twice. Each cycle carries
# 1/(2(n-1)) of the data, so every ordered pair carries exactly the share it carries for other
# n (1/(n-1) of a single ring's load) and no arc sits idle. n = 4: all six directed Hamiltonian
# cycles through 0; n = 6: ten cycles found by an exact-cover search (checked in the tests).
DOUBLE_COVERS = {
    4: ((0, 1, 2, 3), (0, 1, 3, 2), (0, 3, 1, 2), (0, 3, 2, 1), (0, 2, 3, 1), (0, 2, 1, 3)),
    6: ((0, 1, 4, 3, 2, 5), (0, 1, 4, 5, 2, 3), (0, 3, 2, 1, 5, 4), (0, 3, 1, 2, 5, 4), (0, 4, 5, 3, 1, 2),
        (0, 5, 1, 3, 4, 2), (0, 2, 4, 3, 5, 1), (0, 5, 2, 3, 4, 1), (0, 2, 4, 1, 5, 3), (0, 4, 2, 1, 3, 5)),
}


def multiring_cycles(n: int) -> list[list[int]]:
    """The ring orders of the ``hamiltonian`` algorithm on n ranks.

    n-1 arc-disjoint directed Hamiltonian cycles (each ordered pair in exactly one) for every
    n except 4 and 6; for those, the double cover above (each ordered pair in exactly two of
    2(n-1) cycles), which keeps the load on every pair equal instead of leaving n arcs unused.
    """
    if n in DOUBLE_COVERS:
        return [list(c) for c in DOUBLE_COVERS[n]]
    return hamiltonian_cycles(n)


class Layout:
    """Ring order, cycles and groups of a group of ``world_size`` ranks (see the module doc).

    ``topology`` is used only if its world size matches; ``hosts`` (one id per rank) groups
    ranks for ``innetwork`` when there is no topology.
    """

    def __init__(self, world_size: int, topology=None, hosts=None):
        self.world_size = n = int(world_size)
        if topology is not None and topology.world_size != n:
            log.info("topology %r has %d peers but the group has %d: using defaults",
                     getattr(topology, "name", "?"), topology.world_size, n)
            topology = None
        self.topology = topology
        self.hosts = list(hosts) if hosts and len(hosts) == n else None
        if topology is not None:
            from pycoll.plan.topology import ring_order
            self.ring = list(ring_order(topology))
            groups = [(tuple(g.ranks), g.aggregator is not None) for g in topology.groups]
        else:
            self.ring = list(range(n))
            groups = _host_groups(n, hosts)
        self._cycles = None
        self.groups = [ranks for ranks, _ in groups]
        self.agg_of = list(range(n))
        for ranks, aggregated in groups:
            if aggregated:
                for r in ranks:
                    self.agg_of[r] = min(ranks)
        self.agg_ring = [r for r in self.ring if self.agg_of[r] == r]

    @property
    def cycles(self) -> list[list[int]]:
        """The multi-ring's ring orders (computed on first use: a search for large even n)."""
        if self._cycles is None:
            self._cycles = multiring_cycles(self.world_size)
        return self._cycles

    @property
    def aggregated(self) -> bool:
        """True if some rank hands its data to another (innetwork differs from ring)."""
        return len(self.agg_ring) < self.world_size

    def __repr__(self):
        return f"Layout(n={self.world_size}, ring={self.ring}, agg_ring={self.agg_ring})"


def _host_groups(n, hosts):
    """Ranks grouped by host id (every group aggregated by its lowest rank)."""
    if not hosts or len(hosts) != n:
        return [(tuple(range(n)), True)] if n else []
    by_host: dict = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    return [(tuple(rs), True) for rs in by_host.values()]
