"""``pycoll topology``: validate a topology file and show what pycoll makes of it.

Prints the peers and groups, the links between and within groups (the narrowest bandwidth and
the longest latency of each block), the ring order, and the directed Hamiltonian cycles the
``hamiltonian`` algorithm runs for that number of peers (:func:`pycoll.plan.layout.multiring_cycles`:
arc-disjoint cycles covering every ordered pair, or for 4 and 6 peers, where no such decomposition
exists, a double cover), with peer names.
"""
import math

from pycoll.units import format_bandwidth, format_duration

__all__ = ["show", "format_bandwidth", "format_latency"]

format_latency = format_duration  # (the name this module has always exported)


def _span(ranks):
    ranks = list(ranks)
    if ranks and ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _modules():
    try:
        from pycoll.plan import hamiltonian
        from pycoll.plan import layout
        from pycoll.plan import topology
    except ImportError as exc:
        raise SystemExit(f"pycoll topology: this build has no topology support ({exc})") from None
    return topology, hamiltonian, layout


def show(path=None, peers=None, cycles=True, out=None):
    """Print the report for ``path`` (or the cycles for ``peers``); returns an exit code."""
    import sys
    out = out or sys.stdout
    topology, hamiltonian, layout = _modules()
    if path is None:
        if peers is None or peers < 1:
            print("pycoll topology: give a topology file, or --peers N for the cycles of N peers",
                  file=sys.stderr)
            return 2
        topo = topology.single_host(peers)
        names = [str(r) for r in range(peers)]
        print(f"{peers} peers on one host, no link limits", file=out)
    else:
        try:
            topo = topology.load_topology(path)
        except topology.TopologyError as exc:
            print(f"pycoll topology: invalid: {exc}", file=sys.stderr)
            return 2
        names = list(topo.peers)
        _describe(topo, out)
    n = topo.world_size
    order = topology.ring_order(topo)
    print(f"\nring order: {' -> '.join(names[r] for r in order)} -> {names[order[0]]}", file=out)
    if n > 1 and path is not None:
        bw = topo.bandwidth_matrix()
        hops = [bw[order[i], order[(i + 1) % n]] for i in range(n)]
        print(f"ring bottleneck: {format_bandwidth(min(hops))}", file=out)
    if cycles:
        cyc = layout.multiring_cycles(n)  # what the hamiltonian algorithm runs (planners use Layout.cycles)
        full = n * (n - 1)
        arcs = [a for c in cyc for a in hamiltonian.cycle_arcs(c)]
        used = len(set(arcs))
        if len(arcs) == len(set(arcs)):
            hamiltonian.verify_decomposition(n, cyc)
            print(f"\nHamiltonian cycles: {len(cyc)} arc-disjoint directed cycles on {n} peers "
                  f"({used} of {full} ordered pairs carry traffic)", file=out)
        else:
            times = len(arcs) // max(1, used)
            print(f"\nHamiltonian cycles: {len(cyc)} directed cycles on {n} peers, a double cover: every "
                  f"ordered pair is in exactly {times} of them ({used} of {full} ordered pairs carry traffic, "
                  f"each cycle 1/{len(cyc)} of the data; {n} peers have no arc-disjoint decomposition)", file=out)
        for i, c in enumerate(cyc):
            print(f"  {i:2d}: {' -> '.join(names[r] for r in c)}", file=out)
        left = hamiltonian.leftover_arcs(n, cyc)
        if left and n > 2:
            shown = ", ".join(f"{names[u]}->{names[v]}" for u, v in left)
            print(f"  unused pairs (no full decomposition exists for {n} peers): {shown}", file=out)
    return 0


def _describe(topo, out):
    groups = topo.groups
    print(f"topology {topo.name!r} ({topo.source}): {topo.world_size} peers, {len(groups)} group(s), "
          f"{len(topo.hosts())} host(s)", file=out)
    nic = topo.host_nic_Bps()
    if not math.isinf(nic):
        print(f"host NIC: {format_bandwidth(nic)} per direction", file=out)
    print("\ngroups:", file=out)
    for g in groups:
        extra = []
        if g.host:
            extra.append(f"host {g.host}")
        if g.aggregator:
            extra.append(f"aggregator {g.aggregator}" + (f" (rank {g.agent_rank})" if g.agent_rank is not None else ""))
        print(f"  {g.name}: ranks {_span(g.ranks)} = {' '.join(g.peers)}" + (f"; {', '.join(extra)}" if extra else ""),
              file=out)
    bw, lat = topo.bandwidth_matrix(), topo.latency_matrix()
    print("\nlinks (narrowest bandwidth per direction / longest one-way latency; row -> column):", file=out)
    cells = []
    for a in groups:
        row = []
        for b in groups:
            pairs = [(u, v) for u in a.ranks for v in b.ranks if u != v]
            if not pairs:
                row.append("-")
                continue
            row.append(f"{format_bandwidth(min(bw[u, v] for u, v in pairs))} / "
                       f"{format_latency(max(lat[u, v] for u, v in pairs))}")
        cells.append(row)
    name_w = max(len(g.name) for g in groups)
    width = max(len(x) for x in [g.name for g in groups] + [c for row in cells for c in row])
    print(("  " + " " * name_w + "  " + "  ".join(g.name.ljust(width) for g in groups)).rstrip(), file=out)
    for g, row in zip(groups, cells):
        print(("  " + g.name.ljust(name_w) + "  " + "  ".join(c.ljust(width) for c in row)).rstrip(), file=out)
