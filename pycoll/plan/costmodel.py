"""Alpha-beta cost model behind ``algorithm="auto"``: predict every algorithm, run the fastest.

The model
---------
A collective over n ranks moves D bytes (the buffer for all_reduce and broadcast, the output of
all_gather, the input of reduce_scatter). Algorithm A is predicted to take

    T_A = sum over phases of steps * alpha_phase  +  max(W_A, P_A)

* **latency**: a phase is a run of sequential steps over one kind of link. alpha of a phase =
  the mean one-way latency of the hops a piece crosses (a ring's chunk crosses each of its
  arcs about equally often; a tree's deepest path) + o * (1 + (m - 1) / 2), where o is the software
  cost of one message and m the messages a rank handles per step (messages on different
  connections overlap about half; fitted on loopback). Ring all-reduce: 2(n-1) steps, m = R
  for R rings (what the multi-ring pays for its bandwidth); all-gather, reduce-scatter, ring
  broadcast: n-1 steps. Double tree: 2h steps all-reduce, h broadcast (h = tree height in
  hops), m = 2. innetwork: 1 step up, 2(k-1) ring steps among its k ring ranks, 1 step down,
  m = members per aggregator in the first and last step. direct (one-shot): 1 step, m = n-1.
* **W** (bandwidth): the traffic of the algorithm's schedule on every resource it crosses,
  divided by the resource's capacity, for the busiest one. Resources: each directed link
  (topology bandwidth); each host NIC direction (``host_nic``; traffic between hosts); each
  host's processing (bytes sent by all its ranks / ``host_Bps``: ranks sharing a machine share
  its CPUs and memory, the limit on loopback); each rank's own processing (bytes it sends, and
  separately receives, / ``rank_Bps``: one thread); each group's shared uplink, per direction
  (``uplink`` in the topology: everything the group's ranks send to, or receive from, other
  groups). E.g. an arc of each of R rings carries
  2(n-1)/n * D/R in an all-reduce, a tree edge D/2 each way, an aggregator of m members
  receives (m-1) * D, direct D on every ordered pair (n-1 times a ring's bytes per rank).
* **P** (pipeline): the schedule cuts messages into S segments of u bytes (a ring chunk
  D/(nR), a tree's half D/2, at most the segment size). The first segment crosses every step's
  hop, each at that hop's rate (its link, or what a rank processes while all are busy); the
  other S - 1 follow at the slowest hop's rate: P = u * sum(1/rate of each hop) +
  (S - 1) * u / slowest rate. This is what an unpipelined tree pays on medium sizes.

Small messages therefore go to the fewest steps (direct, tree, innetwork), large ones to the least
loaded resource: on one host all algorithms move the same total bytes, so the ring (fewest
messages) wins ties; where each ordered pair of peers has its own capacity the Hamiltonian
multi-ring gets n-1 times the ring's; where links between groups are thin, innetwork.

allpairs (a direct reduce-scatter and all-gather: 2 steps of n-1 messages, D/n on every ordered
pair each step) is offered only where every link of the group is shared memory (the measured
model says so: :func:`calibrate`) and for all-reduces of at least :data:`ALLPAIRS_MIN_BYTES`,
where shared memory copies once, straight out of the peers' buffers. There it wins ties against
the ring: the model has no term for what it gains, that no step waits for a chain of other ranks
to be scheduled (4 ranks on 2 cores, 16 MiB: the same bytes with 7-10 % less CPU per call, and
every rank has work as soon as its peers entered the call). Over sockets it was slower (more
connections busy at once: 4 ranks on 2 cores, 16 MiB over loopback TCP took 1.3x the ring's
time), and below single copy's size the rings' copies favour the ring.

Parameters
----------
From a topology file (:meth:`CostModel.from_topology`): link bandwidth and latency, hosts and
their NIC cap; o, host_Bps and rank_Bps keep their defaults. Without a topology they are
measured at start-up (:func:`calibrate`, run by the communicator once when it installs an
epoch, before any call of it: choosing an algorithm never runs a collective;
``PYCOLL_CALIBRATE=0`` keeps the defaults): a tiny ring all-reduce gives o, a 1 MiB
one the rate of a rank while all are busy, times the ranks on the host = host_Bps, and
rank_Bps = host_Bps / min(ranks on the host, CPUs). Every rank contributes its measurement and
takes the worst over all ranks (one small all-reduce), so every rank builds the same model and
picks the same algorithm. Defaults (:data:`DEFAULT_OVERHEAD_S`, ...) were measured on a 2-vCPU
VM over loopback.
"""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from pycoll.plan import planners
from pycoll.plan.layout import DOUBLE_COVERS, Layout

log = logging.getLogger("pycoll")

DEFAULT_OVERHEAD_S = 12e-6   # per message, engine + kernel, loopback TCP
DEFAULT_HOST_BPS = 4e9       # bytes/s all ranks of one host send together over loopback TCP
DEFAULT_RANK_BPS = 2e9       # bytes/s one rank sends (and receives)
CANDIDATES = ("allpairs", "ring", "hamiltonian", "tree", "innetwork", "direct")
# The model has no term for reduction work, which direct multiplies by n-1 (every rank reduces
# the whole buffer n-1 times, against about once for the others): auto offers direct only up to
# this size, where per-message latency dominates and that work is a few microseconds at most.
DIRECT_MAX_BYTES = 64 << 10
# all_to_all moves the same bytes either way; the staged (pairwise) exchange only bounds what is
# in flight, which the model has no term for: auto stages blocks from this size (None: never),
# as measured by bench/torch_ops.py (see the README's table).
STAGED_MIN_BYTES = None
# allpairs: from where shared memory's single copy starts (the C core's default, 3 MiB), see above
ALLPAIRS_MIN_BYTES = 4 << 20
MAX_MULTIRING = 64  # auto considers the multi-ring up to this many ranks (the cycle search grows fast)


class CostModel:
    """Predicts collective times on n ranks; see the module docstring for the model.

    ``bw``/``lat``: n x n matrices (bytes/s, inf = uncapped; seconds). ``host_of``: host id
    per rank; ``nic_Bps``: per-direction NIC cap of every host (inf = none); ``overhead_s``:
    software cost per message; ``host_Bps``/``rank_Bps``: processing rates (module doc);
    ``shared_memory``: every link of the group is shared memory (offers allpairs, module doc).
    """

    def __init__(self, n, bw=None, lat=None, host_of=None, nic_Bps=math.inf, overhead_s=DEFAULT_OVERHEAD_S,
                 host_Bps=DEFAULT_HOST_BPS, rank_Bps=DEFAULT_RANK_BPS, source="defaults",
                 group_of=None, uplink_Bps=None, shared_memory=False):
        self.n = n
        self.shared_memory = bool(shared_memory)
        self.bw = np.full((n, n), math.inf) if bw is None else np.asarray(bw, dtype=float)
        self.lat = np.zeros((n, n)) if lat is None else np.asarray(lat, dtype=float)
        self.host_of = list(host_of) if host_of is not None else [0] * n
        self.nic_Bps = float(nic_Bps)
        self.overhead_s = float(overhead_s)
        self.host_Bps = float(host_Bps)
        self.rank_Bps = float(rank_Bps)
        self.source = source
        self._local = {h: self.host_of.count(h) for h in set(self.host_of)}
        self._heights = {}
        # Shared uplinks: group id per rank, capacity per group id (inf = none). One flow between
        # groups never gets more than either end's uplink, so the link matrix is capped too.
        self.group_of = list(group_of) if group_of is not None else None
        self.uplink_Bps = {g: float(b) for g, b in (uplink_Bps or {}).items() if math.isfinite(b)} \
            if group_of is not None else {}  # (uplinks belong to groups: none without them)
        if self.uplink_Bps:
            up = np.array([self.uplink_Bps.get(g, math.inf) for g in self.group_of])
            between = np.not_equal.outer(self.group_of, self.group_of)
            self.bw = np.where(between, np.minimum(self.bw, np.minimum.outer(up, up)), self.bw)

    @classmethod
    def from_topology(cls, topo, **params):
        n = topo.world_size
        ups = dict(enumerate(topo.uplinks_Bps()))
        return cls(n, topo.bandwidth_matrix(), topo.latency_matrix(), [topo.host_of(r) for r in range(n)],
                   topo.host_nic_Bps(), source=f"topology {topo.name}",
                   group_of=[topo.group_index(r) for r in range(n)], uplink_Bps=ups, **params)

    def __repr__(self):
        nic = "none" if not math.isfinite(self.nic_Bps) else f"{self.nic_Bps / 1e9:.3g}GB/s"
        return (f"CostModel(n={self.n}, o={self.overhead_s * 1e6:.1f}us, host={self.host_Bps / 1e9:.2f}GB/s, "
                f"rank={self.rank_Bps / 1e9:.2f}GB/s, nic={nic}, source={self.source})")

    # ---- prediction ------------------------------------------------------------------------
    def predict(self, algorithm, coll, nbytes, layout, segment_bytes=1 << 19):
        """Predicted seconds for ``algorithm`` (not auto) running ``coll`` on ``nbytes``."""
        algorithm = planners.effective(algorithm, coll)
        n = self.n
        if n == 1:
            return 0.0
        D = float(nbytes)
        if algorithm == "direct":
            traffic, phases = self._direct(D)
            seg, piece = max(D, 1.0), D  # one unsegmented message per pair
        elif algorithm == "allpairs":
            traffic, phases = self._allpairs(D)
            seg, piece = segment_bytes, D / n
        elif algorithm == "tree":
            traffic, phases = self._tree(coll, D)
            seg, piece = min(segment_bytes, planners.TREE_SEGMENT), D / 2
        elif algorithm == "innetwork":
            traffic, phases = self._hier(D, layout)
            seg = planners.hier_segment(segment_bytes, D, len(layout.agg_ring))
            piece = D / max(len(layout.agg_ring), 1)
        else:
            rings = None if algorithm == "hamiltonian" else [layout.ring]
            traffic, phases = self._rings(coll, D, rings)
            seg, piece = segment_bytes, D / phases[0][2] / (1 if coll == "broadcast" else n)
        latency = sum(steps * (lat + self.overhead_s * (1 + (msgs - 1) / 2)) for steps, lat, msgs, _ in phases)
        segs = max(1, math.ceil(piece / seg)) if piece > 0 else 1
        unit = piece / segs
        # the first segment crosses every step's hop, the others follow at the bottleneck's rate
        pipeline = unit * sum(p[3] for p in phases) + (segs - 1) * unit * self._slowest(traffic)
        return latency + max(self._busiest(traffic), pipeline)

    def choose(self, coll, nbytes, layout, segment_bytes=1 << 19, candidates=CANDIDATES):
        """(fastest algorithm, {algorithm: predicted seconds}) for this call."""
        if coll == "barrier" or self.n == 1:
            return "ring", {"ring": 0.0}
        times = {}
        for a in candidates:
            eff = planners.effective(a, coll)
            if eff == "innetwork" and not layout.aggregated:
                continue  # identical to the ring
            if eff == "hamiltonian" and self.n > MAX_MULTIRING:
                continue
            if eff == "direct" and nbytes > DIRECT_MAX_BYTES:
                continue
            if eff == "allpairs" and not (self.shared_memory and nbytes >= ALLPAIRS_MIN_BYTES):
                continue
            if eff not in times:
                times[eff] = self.predict(eff, coll, nbytes, layout, segment_bytes)
        # near-ties (within 3 %) go to the simpler algorithm (candidate order)
        fastest = min(times.values())
        best = next(a for a in CANDIDATES if a in times and times[a] <= fastest * 1.03)
        return best, times

    # ---- rooted collectives: reduce, gather, scatter (pycoll.plan.exchange) -----------------
    def predict_rooted(self, algorithm, coll, nbytes, root=0, segment_bytes=1 << 19):
        """Predicted seconds of a rooted ``coll`` by ``algorithm`` ("direct" or "tree"):
        ``nbytes`` is the buffer (reduce) or one rank's block (gather, scatter).

        direct: one step in which the root handles n-1 messages and receives (reduce, gather) or
        sends (scatter) n-1 payloads; tree (binomial): ceil(lg n) steps of about 1.5 messages
        each (a subtree's blocks travel in up to 3 pieces), the root handling lg n payloads of a
        reduce (it also reduces only lg n, the bandwidth and work the tree saves at large sizes)
        and, for gather and scatter, the same bytes as direct in fewer messages (the latency it
        saves at small sizes with many ranks). A reduce pipelines its segments up the tree."""
        n = self.n
        if n == 1:
            return 0.0
        D = float(nbytes)
        traffic = {}
        if algorithm == "direct":
            for j in range(n):
                if j != root:
                    traffic[(j, root)] = D
            steps, msgs = 1, n - 1
            path = [(j, root) for j in range(n) if j != root][:1]
        else:
            path, deepest = [], []
            for v in range(1, n):
                parent, span = v - (v & -v), min(v & -v, n - v)
                edge = ((v + root) % n, (parent + root) % n)
                traffic[edge] = D * (1 if coll == "reduce" else span)
                hops, x = [], v
                while x:
                    p = x - (x & -x)
                    hops.append(((x + root) % n, (p + root) % n))
                    x = p
                if len(hops) > len(deepest):
                    deepest = hops
            path = deepest
            steps, msgs = max(1, (n - 1).bit_length()), (1 if coll == "reduce" else 2)
        if coll == "scatter":
            traffic = {(v, u): b for (u, v), b in traffic.items()}
            path = [(v, u) for u, v in path]
        lat = max(self.lat[a] for a in path)
        latency = steps * (lat + self.overhead_s * (1 + (msgs - 1) / 2))
        if coll == "reduce" and algorithm == "tree":
            segs = max(1, math.ceil(D / segment_bytes))
            unit = D / segs
            pipeline = unit * sum(self._hop(*a) for a in path) + (segs - 1) * unit * self._slowest(traffic)
        elif algorithm == "tree":  # unsegmented: round j moves 2^j blocks, few ranks busy at once
            slowest = max(max(1.0 / self.bw[a] for a in traffic), 1.0 / self.rank_Bps)
            pipeline = D * ((1 << steps) - 1) * slowest
        else:
            pipeline = 0.0
        return latency + max(self._rooted_busiest(traffic), pipeline)

    def _rooted_busiest(self, traffic):
        """:meth:`_busiest` for a rooted schedule, where a rank's own rate only limits traffic
        between hosts: on one host, measured (bench/torch_ops.py-style, 4 ranks on 2 CPUs,
        shared memory), a direct reduce of 16-64 MiB took 0.7-0.85x the tree's time though its
        root receives n-1 payloads to the tree's lg n: the senders do the copying, so the
        host's total work (the same for both) is the limit, and the tree's extra depth a cost."""
        cross = {a: b for a, b in traffic.items() if self.host_of[a[0]] != self.host_of[a[1]]}
        worst = self._busiest(cross) if cross else 0.0
        host_sent = {}
        for (u, _), b in traffic.items():
            host_sent[self.host_of[u]] = host_sent.get(self.host_of[u], 0.0) + b
        return max(worst, max(host_sent.values()) / self.host_Bps)

    def choose_rooted(self, coll, nbytes, root=0, segment_bytes=1 << 19):
        """(fastest of direct and tree, {algorithm: predicted seconds}); near-ties (3 %) go to
        direct. all_to_all: staged from STAGED_MIN_BYTES per block (see there), else direct."""
        if coll == "all_to_all":
            staged = self.n > 2 and STAGED_MIN_BYTES is not None and nbytes >= STAGED_MIN_BYTES
            return ("staged" if staged else "direct"), {}
        if self.n < 4:  # the binomial tree of 2 or 3 ranks is the direct plan
            return "direct", {"direct": 0.0}
        times = {a: self.predict_rooted(a, coll, nbytes, root, segment_bytes) for a in ("direct", "tree")}
        return ("tree" if times["tree"] < times["direct"] / 1.03 else "direct"), times

    # ---- schedules: ({(u, v): bytes}, [(steps, mean latency, msgs per step, seconds per byte
    # ---- summed over the steps' hops)]) ------------------------------------------------------
    def _hop(self, u, v):
        """Seconds per byte on u -> v while every rank is busy."""
        return max(1.0 / self.bw[u, v], 1.0 / self._busy_Bps)

    @property
    def _busy_Bps(self):
        return min(self.host_Bps / max(self._local.values()), self.rank_Bps)

    def _rings(self, coll, D, rings):
        """``rings`` None: the multi-ring, whose cycles load every ordered pair equally."""
        n = self.n
        factor = {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(coll, (n - 1) / n)
        steps = {"all_reduce": 2 * (n - 1)}.get(coll, n - 1)
        if rings is None:
            R = len(DOUBLE_COVERS.get(n, ())) or max(n - 1, 1)
            arcs = [(u, v) for u in range(n) for v in range(n) if u != v]
            traffic = {arc: factor * D / (n - 1) for arc in arcs}  # 1 of n-1 cycles (or 2 of 2(n-1))
            lat = float(np.mean([self.lat[a] for a in arcs]))
            spb = float(np.mean([self._hop(*a) for a in arcs]))
            return traffic, [(steps, lat, R, steps * spb)]
        R, traffic, lat, spb = len(rings), {}, 0.0, 0.0
        for order in rings:
            arcs = [(order[i], order[(i + 1) % n]) for i in range(n)]
            for arc in arcs:
                traffic[arc] = traffic.get(arc, 0.0) + factor * D / R
            # a chunk crosses every arc of its ring steps/n times: mean latency, not the worst
            lat = max(lat, float(np.mean([self.lat[a] for a in arcs])))
            spb = max(spb, float(np.mean([self._hop(*a) for a in arcs])))
        return traffic, [(steps, lat, R, steps * spb)]

    def _direct(self, D):
        n = self.n
        arcs = [(u, v) for u in range(n) for v in range(n) if u != v]
        traffic = {arc: D for arc in arcs}
        # the last of the n-1 frames to arrive ends the step: the worst arc, not the mean
        lat = float(max(self.lat[a] for a in arcs))
        spb = float(max(self._hop(*a) for a in arcs))
        return traffic, [(1, lat, n - 1, spb)]

    def _allpairs(self, D):
        n = self.n
        arcs = [(u, v) for u in range(n) for v in range(n) if u != v]
        traffic = {arc: 2 * D / n for arc in arcs}  # its chunk of the input, then its finished chunk
        # each step ends with the last of its n-1 frames: the worst arc
        lat = float(max(self.lat[a] for a in arcs))
        spb = float(max(self._hop(*a) for a in arcs))
        return traffic, [(2, lat, n - 1, 2 * spb)]

    def _tree(self, coll, D):
        n = self.n
        traffic = {}
        for t in (0, 1):
            for r in range(n):
                p, _, _ = planners.tree_links(n, t, r)
                if p >= 0:
                    traffic[(p, r)] = traffic.get((p, r), 0.0) + D / 2
                    if coll == "all_reduce":
                        traffic[(r, p)] = traffic.get((r, p), 0.0) + D / 2
        hops, lat, spb = self._tree_paths(coll)
        steps = 2 * hops if coll == "all_reduce" else hops + 1
        return traffic, [(steps, lat / steps, 2, spb)]

    def _tree_paths(self, coll):
        """(most hops, largest latency sum, largest seconds-per-byte sum) of a rank's way to
        the root and back (all-reduce) or from the root (broadcast, + the root's first hop)."""
        if coll not in self._heights:
            hops = lat_max = spb_max = 0.0
            for t in (0, 1):
                parent = [planners.tree_links(self.n, t, r)[0] for r in range(self.n)]
                for r in range(self.n):
                    d, lat, spb, x = 0, 0.0, 0.0, r
                    while parent[x] >= 0:
                        p = parent[x]
                        lat += self.lat[p, x] + (self.lat[x, p] if coll == "all_reduce" else 0.0)
                        spb += self._hop(p, x) + (self._hop(x, p) if coll == "all_reduce" else 0.0)
                        x, d = p, d + 1
                    hops, lat_max, spb_max = max(hops, d), max(lat_max, lat), max(spb_max, spb)
            if coll != "all_reduce":
                lat_max += float(np.max(self.lat))
                spb_max += 1.0 / self._busy_Bps
            self._heights[coll] = (int(hops), lat_max, spb_max)
        return self._heights[coll]

    def _hier(self, D, layout):
        traffic, members = {}, {}
        for r, a in enumerate(layout.agg_of):
            if a != r:
                traffic[(r, a)] = D
                traffic[(a, r)] = D
                members[a] = members.get(a, 0) + 1
        phases = []
        if members:
            intra = list(traffic)
            lat = max(self.lat[a] for a in intra)
            spb = max(self._hop(*a) for a in intra)
            fan = max(members.values())
            phases += [(1, lat, fan, spb), (1, lat, fan, spb)]
        order = layout.agg_ring
        k = len(order)
        if k > 1:
            arcs = [(order[i], order[(i + 1) % k]) for i in range(k)]
            for arc in arcs:
                traffic[arc] = traffic.get(arc, 0.0) + 2 * (k - 1) / k * D
            steps = 2 * (k - 1)
            phases.append((steps, float(np.mean([self.lat[a] for a in arcs])), 1,
                           steps * float(np.mean([self._hop(*a) for a in arcs]))))
        return traffic, phases

    # ---- resources ---------------------------------------------------------------------------
    def _busiest(self, traffic):
        """Seconds the most loaded resource (link, NIC direction, host, rank) needs."""
        worst = 0.0
        sent, recv = np.zeros(self.n), np.zeros(self.n)
        nic_out, nic_in, host_sent, up_out, up_in = {}, {}, {}, {}, {}
        for (u, v), b in traffic.items():
            worst = max(worst, b / self.bw[u, v])
            sent[u] += b
            recv[v] += b
            if self.uplink_Bps and self.group_of[u] != self.group_of[v]:
                up_out[self.group_of[u]] = up_out.get(self.group_of[u], 0.0) + b
                up_in[self.group_of[v]] = up_in.get(self.group_of[v], 0.0) + b
            hu, hv = self.host_of[u], self.host_of[v]
            host_sent[hu] = host_sent.get(hu, 0.0) + b
            if hu != hv:
                nic_out[hu] = nic_out.get(hu, 0.0) + b
                nic_in[hv] = nic_in.get(hv, 0.0) + b
        worst = max(worst, sent.max() / self.rank_Bps, recv.max() / self.rank_Bps,
                    max(host_sent.values()) / self.host_Bps)
        if math.isfinite(self.nic_Bps):
            worst = max([worst] + [b / self.nic_Bps for b in list(nic_out.values()) + list(nic_in.values())])
        for load in (up_out, up_in):
            for g, b in load.items():
                worst = max(worst, b / self.uplink_Bps.get(g, math.inf))
        return worst

    def _slowest(self, traffic):
        """Seconds per byte of the slowest hop the schedule uses (link, NIC or processing)."""
        worst = max(self._hop(u, v) for u, v in traffic)
        if math.isfinite(self.nic_Bps) and any(self.host_of[u] != self.host_of[v] for u, v in traffic):
            worst = max(worst, 1.0 / self.nic_Bps)
        return worst

    def switch_points(self, coll, layout, sizes, segment_bytes=1 << 19):
        """[(size, algorithm)] where the choice changes, scanning ``sizes`` in order."""
        out, last = [], None
        for s in sizes:
            a, _ = self.choose(coll, s, layout, segment_bytes)
            if a != last:
                out.append((s, a))
                last = a
        return out


# ---- start-up measurement -----------------------------------------------------------------------
def calibrate(run_ring_allreduce, n, hosts=None, small_reps=10, big_bytes=1 << 20, shared_memory=False):
    """Measure o, host_Bps and rank_Bps with ring all-reduces; every rank gets the same model.

    ``run_ring_allreduce(array, op)`` must run a ring all-reduce on every rank (the caller's
    communicator); ``hosts`` is the host id of every rank; ``shared_memory``: all of this rank's
    links are shared memory (the model's flag holds where that is so on every rank).
    """
    tiny = np.zeros(1, np.float32)
    # The best of several: on a shared host the best of 3 ranged from 3 to 37 us for one setup
    # (a busy moment makes o, and so every small-message choice, wrong for the whole epoch).
    run_ring_allreduce(tiny, "sum")  # warm-up: first frames
    best = math.inf
    for _ in range(small_reps):
        t0 = time.perf_counter()
        run_ring_allreduce(tiny, "sum")
        best = min(best, time.perf_counter() - t0)
    big = np.zeros(big_bytes // 4, np.float32)
    t_big = math.inf
    for _ in range(2):  # the first one also pays for page faults and scratch
        t0 = time.perf_counter()
        run_ring_allreduce(big, "sum")
        t_big = min(t_big, time.perf_counter() - t0)
    moved = 2 * (n - 1) / n * big_bytes  # bytes each rank sends
    # the worst over all ranks: max of (seconds per step, seconds per byte, 1 / CPUs)
    # and whether any rank has a link that is not shared memory
    agreed = np.array([best / (2 * (n - 1)), max(t_big - best, 1e-9) / moved, 1.0 / (os.cpu_count() or 1),
                       0.0 if shared_memory else 1.0])
    run_ring_allreduce(agreed, "max")
    per_step, secs_per_byte, cpus = float(agreed[0]), float(agreed[1]), round(1.0 / float(agreed[2]))
    hosts = list(hosts) if hosts and len(hosts) == n else [0] * n
    local = max(hosts.count(h) for h in set(hosts))
    host_Bps = local / secs_per_byte
    return CostModel(n, host_of=hosts, overhead_s=per_step, host_Bps=host_Bps,
                     rank_Bps=host_Bps / max(1, min(local, cpus)), source="measured",
                     shared_memory=agreed[3] == 0.0)


class Selector:
    """Algorithm choice for one membership epoch: its layout, its cost model, and a cache.

    The model is the topology's when there is one, else ``model`` (measured by the caller
    with :func:`calibrate`), else the defaults; choosing never measures (it runs no
    collective). Choices are cached per (collective, bytes): a decision is made once per size
    and epoch, and every rank makes the same one.
    """

    def __init__(self, world_size, topology=None, hosts=None, segment_bytes=1 << 19, model=None):
        self.layout = Layout(world_size, topology, hosts)
        self.segment_bytes = segment_bytes
        if self.layout.topology is not None:
            model = CostModel.from_topology(self.layout.topology)
        self._model = model if model is not None else CostModel(world_size, host_of=self.layout.hosts)
        self.measured = model is not None and model.source == "measured"
        self._choices = {}

    @property
    def needs_calibration(self):
        """True when no topology gives the model and nothing was measured (a group of 2 or more)."""
        return self.layout.topology is None and not self.measured and self.layout.world_size > 1

    def model(self):
        """The cost model (see the class)."""
        return self._model

    def choose_rooted(self, coll, algorithm, nbytes, root):
        """The plan of a reduce, gather or scatter: ``algorithm`` "direct" or "tree", or "auto"
        (the model's choice, cached per size and root as :meth:`choose`)."""
        if algorithm != "auto":
            return algorithm
        return self._remembered((coll, nbytes, root), coll, nbytes,
                                lambda: self.model().choose_rooted(coll, nbytes, root, self.segment_bytes))

    def choose(self, coll, algorithm, nbytes):
        """The algorithm that runs this call (``algorithm`` may be auto)."""
        if algorithm != "auto":
            return planners.effective(algorithm, coll)
        if coll == "barrier" or self.layout.world_size == 1:
            return "ring"
        return self._remembered((coll, nbytes), coll, nbytes,
                                lambda: self.model().choose(coll, nbytes, self.layout, self.segment_bytes))

    def _remembered(self, key, coll, nbytes, predict):
        """The choice cached under ``key``, else ``predict()``'s (algorithm, predicted times), logged
        and cached (bounded)."""
        chosen = self._choices.get(key)
        if chosen is None:
            chosen, times = predict()
            log.debug("auto: %s for %s of %d B (predicted %s)", chosen, coll, nbytes,
                      ", ".join(f"{a} {t * 1e3:.3f} ms" for a, t in sorted(times.items(), key=lambda x: x[1])))
            if len(self._choices) > 4096:
                self._choices.clear()
            self._choices[key] = chosen
        return chosen
