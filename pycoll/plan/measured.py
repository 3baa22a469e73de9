"""From measured matrices to a topology: the probe's schedule, sites, ring order, TOML. Pure.

:mod:`pycoll.net.probe` measures; this module decides what to measure and what it means:

* :func:`probe_rounds`: which pairs measure bandwidth together. A task is an intra-site pair, or,
  per pair of sites, a "solo" flow (one pair across) and a "dual" test (two disjoint pairs across
  at once: they split the capacity when the sites sit behind shared uplinks, each gets it all on
  private links). Tasks in a round share no rank and no site's uplink, so nothing measured in
  parallel shares a link the probe knows about.
* :func:`find_sites`: sites by clustering the latency matrix (the widest gap in the sorted
  round-trip times, single linkage): no names needed.
* :func:`solve_ring`: the ring order as an asymmetric travelling-salesman problem (widest
  bottleneck hop, then least total latency): exact (:mod:`pycoll.plan.tsp`) up to 12 nodes,
  nearest neighbour + 2-opt beyond.
* :func:`topology_toml`: a topology file (``pycoll.plan.topology`` format, explicit ``ranks``
  per group, since sites need not be contiguous) the user can read, edit and keep.
"""
from __future__ import annotations

import math

import numpy as np

from pycoll.plan.topology import _best_cycle, _ring_score

SITE_GAP = 3.0       # sites exist where round-trip times jump by this factor ...
SITE_GAP_S = 0.5e-3  # ... and by at least this much (noise on a fast LAN is not a site)
SHARED = 1.5         # two flows across that sum to under this times one flow's rate share an uplink
UNEVEN = 1.6         # a dual test's flows and its solo flow this far apart: one of them was starved


# ---- sites ------------------------------------------------------------------------------
def find_sites(rtt):
    """Site index per rank from a round-trip matrix (seconds; the diagonal is ignored).

    Sorted off-diagonal RTTs; the widest multiplicative gap that is at least SITE_GAP times and
    SITE_GAP_S seconds splits "near" from "far"; ranks joined by near pairs (single linkage)
    form a site. Without such a gap: one site. Sites are numbered by their lowest rank."""
    rtt = np.asarray(rtt, dtype=float)
    n = len(rtt)
    sym = np.maximum(rtt, rtt.T)  # a pair is as near as its slower direction
    vals = np.sort(sym[~np.eye(n, dtype=bool)]) if n > 1 else np.array([])
    threshold = None
    best = SITE_GAP
    for lo, hi in zip(vals[:-1], vals[1:]):
        ratio = hi / max(lo, 1e-9)
        if hi - lo >= SITE_GAP_S and ratio >= best:
            best, threshold = ratio, lo
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if threshold is None:
        return [0] * n
    for u in range(n):
        for v in range(u + 1, n):
            if sym[u, v] <= threshold:
                parent[root(u)] = root(v)
    labels, out = {}, []
    for r in range(n):
        out.append(labels.setdefault(root(r), len(labels)))
    return out


# ---- the probe's schedule ------------------------------------------------------------------
def probe_tasks(sites):
    """[(kind, [(a, b), ...])]: "pair" (one intra-site pair), "solo" and "dual" per site pair."""
    n = len(sites)
    members = {}
    for r, s in enumerate(sites):
        members.setdefault(s, []).append(r)
    tasks = []
    keys = sorted(members)
    for i, s in enumerate(keys):
        for t in keys[i + 1:]:
            ms, mt = members[s], members[t]
            tasks.append(("solo", [(ms[0], mt[0])]))
            if len(ms) > 1 and len(mt) > 1:
                tasks.append(("dual", [(ms[0], mt[0]), (ms[1], mt[1])]))
    # intra-site pairs in round-robin tournament order (circle method): n-1 perfect matchings
    slots = list(range(n)) + ([None] if n % 2 else [])
    m = len(slots)
    for _ in range(m - 1):
        for i in range(m // 2):
            a, b = slots[i], slots[m - 1 - i]
            if a is not None and b is not None and sites[a] == sites[b]:
                tasks.append(("pair", [(min(a, b), max(a, b))]))
        slots = [slots[0], slots[-1]] + slots[1:-1]
    return tasks


def probe_rounds(sites):
    """Tasks packed into rounds (greedy, deterministic): no rank twice in a round, and no site
    in two cross-site tasks of a round (they would share its uplink)."""
    return pack_rounds(probe_tasks(sites), sites)


def suspicious(sites, slots, rates, factor=0.5):
    """Indices of intra-site pair slots with a direction under ``factor`` x the median rate of
    their site's pairs: measured again once (a stalled flow, not the link)."""
    by_site = {}
    for i, (kind, (a, b)) in enumerate(slots):
        if kind == "pair":
            by_site.setdefault(sites[a], []).extend(rates[i])
    out = []
    for i, (kind, (a, b)) in enumerate(slots):
        if kind == "pair" and len(by_site[sites[a]]) >= 4:
            med = float(np.median(by_site[sites[a]]))
            if min(rates[i]) < factor * med:
                out.append(i)
    return out


def pack_rounds(tasks, sites):
    """Greedy rounds of ``tasks`` (see :func:`probe_rounds`)."""
    left = list(tasks)
    rounds = []
    while left:
        used_ranks, used_sites, this, rest = set(), set(), [], []
        for kind, pairs in left:
            ranks = {r for p in pairs for r in p}
            ss = {sites[r] for r in ranks} if kind != "pair" else set()
            if ranks & used_ranks or ss & used_sites:
                rest.append((kind, pairs))
                continue
            used_ranks |= ranks
            used_sites |= ss
            this.append((kind, pairs))
        rounds.append(this)
        left = rest
    return rounds


def fill_matrices(sites, results, rtt):
    """Bandwidth matrix (bytes/s, per direction) and uplinks from the rounds' results.

    ``results``: {(kind, (a, b)): (rate a->b, rate b->a)} for every pair measured, where
    the dual test's pairs are keyed ("dual", pair). Pairs across sites take their site pair's solo
    rate. Returns (bw, latency one way, {site: uplink Bps}) where a site gets an uplink when its
    dual test shows two flows sharing what one flow had (sum under SHARED x the best single
    flow's rate)."""
    n = len(sites)
    bw = np.full((n, n), math.inf)
    uplinks = {}
    solo = _solo_rates(sites, results)
    for (kind, (a, b)), (ab, ba) in results.items():
        if kind == "pair":
            bw[a, b], bw[b, a] = ab, ba
    best = dict(solo)  # a pair across takes its site pair's best single flow (the dual's, if better)
    for (kind, (a, b)), (ab, ba) in results.items():
        key = (sites[a], sites[b])
        if kind == "dual" and key in best:
            best[key] = (max(best[key][0], ab), max(best[key][1], ba))
    for s, t, shared, _ in _dual_evidence(sites, results, solo):
        if shared:
            uplinks[s] = max(uplinks.get(s, 0.0), *shared)
            uplinks[t] = max(uplinks.get(t, 0.0), *shared)
    for u in range(n):
        for v in range(n):
            if u != v and sites[u] != sites[v]:
                key = (sites[u], sites[v]) if (sites[u], sites[v]) in solo else (sites[v], sites[u])
                if key in best:
                    ab, ba = best[key]
                    bw[u, v] = ab if key == (sites[u], sites[v]) else ba
    lat = np.asarray(rtt, dtype=float) / 2
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(bw, math.inf)
    return bw, lat, uplinks


def _solo_rates(sites, results):
    """{(site s, site t): (rate s->t, rate t->s)} of the solo tests across sites."""
    return {(sites[a], sites[b]): v for (k, (a, b)), v in results.items() if k == "solo"}


def _dual_evidence(sites, results, solo):
    """For each pair of a dual test: its sites (s, t), the single-flow rates that its two flows
    shared in the directions that show sharing (empty: none does), and whether the three flows of
    a direction (the two of the dual test and the solo one) were uneven."""
    for (kind, (a, b)), (ab, ba) in results.items():
        if kind != "dual":
            continue
        s, t = sites[a], sites[b]
        other = [v for (k, p), v in results.items() if k == "dual" and p != (a, b)
                 and sites[p[0]] == s and sites[p[1]] == t]
        one = solo.get((s, t))
        if not other or one is None:
            continue
        # A short flow underestimates more often than it overestimates: compare the two flows'
        # sum with the best any single flow got (shared: about 1x, private links: about 2x).
        # Either direction is evidence enough: a short flow that ramps up late (the reverse
        # direction of a pair, behind the forward flow's ACKs) hides sharing, never fakes it.
        directions = ((one[0], ab, other[0][0]), (one[1], ba, other[0][1]))
        shared = [max(flows) for flows in directions if flows[1] + flows[2] < SHARED * max(flows)]
        uneven = any(max(flows) > UNEVEN * min(flows) for flows in directions)
        yield s, t, shared, uneven


def doubtful_uplinks(sites, results):
    """Site pairs (s, t) whose dual test found no shared uplink from uneven flows: on a busy host
    a flow starved of CPU passes for a slow link, and two starved flows pass for private links
    (seen in the suite: one flow 11.8, two at once 11.6 + 10.7 Mbit/s over a shared 40 Mbit/s,
    23.1 + 11.8 the other way). Their solo and dual tests are worth a second look."""
    return sorted({(s, t) for s, t, shared, uneven in _dual_evidence(sites, results, _solo_rates(sites, results))
                   if uneven and not shared})


# ---- ring order ----------------------------------------------------------------------------
def solve_ring(bw, lat):
    """Ring order (starting at 0) maximising the narrowest hop, then minimising total latency:
    exact up to :data:`pycoll.plan.tsp.EXACT_MAX` nodes, heuristic beyond (both through
    :func:`pycoll.plan.topology.ring_order`'s solver, so files and measurements agree)."""
    return _best_cycle(np.asarray(bw, float), np.asarray(lat, float))


def ring_score(order, bw, lat):
    """(narrowest hop bytes/s, total latency s) of a cyclic order (the solver's score, whose
    latency is negated so that higher is better)."""
    narrowest, minus_latency = _ring_score(list(order), np.asarray(bw, float), np.asarray(lat, float))
    return narrowest, -minus_latency


# ---- the file ------------------------------------------------------------------------------
def _bw_text(bps):
    if not math.isfinite(bps):
        return '"unlimited"'
    return f'"{bps * 8 / 1e6:.6g}mbit"'


def _lat_text(s):
    return f'"{s * 1e6:.6g}us"'


def topology_toml(bw, lat, sites, uplinks=None, name="measured", names=None, comment=""):
    """A topology file: one group per site (explicit ``ranks``), a [[link]] per measured pair.

    Bandwidths in mbit (bits), latencies in us; ``uplinks`` {site: bytes/s} become group
    ``uplink`` keys. ``names``: peer names per rank (default p0, p1, ...). With several sites,
    each site of two or more gets ``aggregator = "agent"`` (innetwork aggregates per site)."""
    bw, lat = np.asarray(bw, float), np.asarray(lat, float)
    n = len(bw)
    names = list(names) if names else [f"p{r}" for r in range(n)]
    uplinks = uplinks or {}
    lines = [f"# {line}" for line in comment.splitlines()] + [f'name = "{name}"', ""]
    for s in sorted(set(sites)):
        ranks = [r for r in range(n) if sites[r] == s]
        lines += ["[[group]]", f'name = "site{s}"', "peers = [" + ", ".join(f'"{names[r]}"' for r in ranks) + "]",
                  "ranks = [" + ", ".join(map(str, ranks)) + "]"]
        if len(set(sites)) > 1 and len(ranks) > 1:
            lines.append('aggregator = "agent"')
        if s in uplinks and math.isfinite(uplinks[s]):
            lines.append(f"uplink = {_bw_text(uplinks[s])}")
        lines.append("")
    for u in range(n):
        for v in range(n):
            if u != v:
                lines += ["[[link]]", f'a = "{names[u]}"', f'b = "{names[v]}"', "symmetric = false",
                          f"bandwidth = {_bw_text(bw[u, v])}", f"latency = {_lat_text(lat[u, v])}", ""]
    return "\n".join(lines)
