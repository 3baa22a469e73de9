"""Alpha-beta cost model behind ``algorithm="auto"``: predict every algorithm, run the fastest.

The model
---------
A collective over n ranks moves D bytes (the buffer for all_reduce and broadcast, the output of
all_gather, the input of reduce_scatter). Algorithm A is predicted to take

    T_A = sum over phases (steps · α_phase)  +  max(W_A, (L_A + S - 1) · u / B_path)

* **steps, α** (latency): a phase is a run of sequential steps over the same kind of link; α of
  a phase = the largest one-way latency of the links it uses plus the software overhead ``o``
  times the messages one rank handles per step. Ring all-reduce has 2(n-1) steps of 1 message
  per ring (R rings: R messages, which is what the multi-ring pays for its bandwidth); ring
  all-gather / reduce-scatter / broadcast n-1; the double tree 2·depth steps all-reduce
  (depth = ceil(lg n) + 1) and depth steps broadcast, up to 3 messages per step;
  ``innetwork`` 1 step up into the aggregators (m-1 messages at an aggregator of m), 2(k-1)
  ring steps among the k ring ranks, 1 step down. L_A is the total number of steps.
* **W** (bandwidth): the traffic of the algorithm's schedule, put on every resource it crosses,
  divided by that resource's capacity, for the busiest resource: every directed link (the
  topology's bandwidth), every host NIC direction (``host_nic``, traffic between hosts), and
  every rank's own processing rate ``proc_Bps`` (bytes one process can send, and separately
  receive, per second: the limit on loopback). E.g. each arc of R rings carries 2(n-1)/n·D/R
  in an all-reduce; a tree edge D/2 each way; an aggregator of m members receives (m-1)·D.
* **pipeline**: messages are cut into S segments of u bytes (a ring's chunk D/(nR), a tree's
  half D/2, at most the segment size); the first segment needs L_A steps to cross the
  schedule, so T is at least (L_A + S - 1)·u / B_path, B_path being the narrowest link or
  processing rate on the way. This is what makes an unpipelined tree lose on medium sizes.

So small messages pick the algorithm with the fewest steps (tree, innetwork), large ones the
least loaded resource: the ring where one rank's processing or one NIC is the limit, the
Hamiltonian multi-ring where every ordered pair has its own capacity (n-1 times a ring), and
innetwork where links between groups are thin (the ring between groups shrinks to k ranks).

Parameters
----------
From a topology file (:meth:`CostModel.from_topology`): link bandwidth and latency, host NIC.
Without one, from a measurement at start-up (:func:`calibrate`, run by the communicator at its
first ``auto`` call of an epoch; ``PYCOLL_CALIBRATE=0`` skips it): a tiny ring all-reduce
gives α per step, a 1 MiB one the processing rate; every rank takes the maximum over all ranks
(one small all-reduce), so every rank builds the same model and picks the same algorithm.
``o`` and ``proc_Bps`` default to :data:`DEFAULT_OVERHEAD_S` and :data:`DEFAULT_PROC_BPS`
(measured on a 2-vCPU VM over loopback) where neither source gives them.
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import planners

DEFAULT_OVERHEAD_S = 20e-6    # per message, engine + kernel, loopback TCP
DEFAULT_PROC_BPS = 1.5e9      # bytes/s one rank sends (and receives) over loopback TCP
CANDIDATES = ("ring", "hamiltonian", "tree", "innetwork")


class CostModel:
    """Predicts collective times on n ranks; see the module docstring for the model.

    ``bw``/``lat``: n×n matrices (bytes/s, inf = uncapped; seconds). ``host_of``: host id per
    rank, ``nic_Bps``: per-direction NIC cap of every host (inf = none). ``overhead_s``:
    software cost per message; ``proc_Bps``: per-rank processing rate.
    """

    def __init__(self, n, bw=None, lat=None, host_of=None, nic_Bps=math.inf, overhead_s=DEFAULT_OVERHEAD_S,
                 proc_Bps=DEFAULT_PROC_BPS, source="defaults"):
        self.n = n
        self.bw = np.full((n, n), math.inf) if bw is None else np.asarray(bw, dtype=float)
        self.lat = np.zeros((n, n)) if lat is None else np.asarray(lat, dtype=float)
        self.host_of = list(host_of) if host_of is not None else list(range(n))
        self.nic_Bps = float(nic_Bps)
        self.overhead_s = float(overhead_s)
        self.proc_Bps = float(proc_Bps)
        self.source = source

    @classmethod
    def from_topology(cls, topo, overhead_s=DEFAULT_OVERHEAD_S, proc_Bps=DEFAULT_PROC_BPS):
        n = topo.world_size
        return cls(n, topo.bandwidth_matrix(), topo.latency_matrix(), [topo.host_of(r) for r in range(n)],
                   topo.host_nic_Bps(), overhead_s, proc_Bps, source=f"topology {topo.name}")

    def __repr__(self):
        return (f"CostModel(n={self.n}, o={self.overhead_s * 1e6:.1f}us, proc={self.proc_Bps / 1e9:.2f}GB/s, "
                f"nic={self.nic_Bps / 1e9:.2f}GB/s, source={self.source})")

    # ---- prediction ------------------------------------------------------------------------
    def predict(self, algorithm, coll, nbytes, layout, segment_bytes=1 << 19):
        """Predicted seconds for ``algorithm`` (not auto) running ``coll`` on ``nbytes``."""
        algorithm = planners.effective(algorithm, coll)
        n = self.n
        if n == 1:
            return 0.0
        D = float(nbytes)
        if algorithm == "tree":
            traffic, phases = self._tree(coll, D)
            seg = min(segment_bytes, planners.TREE_SEGMENT)
            piece = D / 2
        elif algorithm == "innetwork":
            traffic, phases = self._hier(D, layout)
            seg, piece = segment_bytes, D / max(len(layout.agg_ring), 1)
        else:
            rings = layout.cycles if algorithm == "hamiltonian" else [layout.ring]
            traffic, phases = self._rings(coll, D, rings)
            seg = segment_bytes
            piece = D / len(rings) / (1 if coll == "broadcast" else n)
        latency = sum(steps * (lat + self.overhead_s * msgs) for steps, lat, msgs in phases)
        steps = sum(p[0] for p in phases)
        segs = max(1, math.ceil(piece / seg)) if piece > 0 else 1
        unit = piece / segs
        path = min(self._narrowest(traffic), self.proc_Bps)
        pipeline = (steps + segs - 1) * unit / path if path > 0 else 0.0
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
            if eff not in times:
                times[eff] = self.predict(eff, coll, nbytes, layout, segment_bytes)
        # ties go to the simpler algorithm (candidate order)
        best = min(times, key=lambda a: (times[a], CANDIDATES.index(a)))
        return best, times

    # ---- traffic of each schedule: ({(u, v): bytes}, [(steps, latency, msgs per step)]) --------
    def _rings(self, coll, D, rings):
        n, R = self.n, len(rings)
        factor = {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(coll, (n - 1) / n)
        steps = {"all_reduce": 2 * (n - 1)}.get(coll, n - 1)
        traffic = {}
        for order in rings:
            for i in range(n):
                arc = (order[i], order[(i + 1) % n])
                traffic[arc] = traffic.get(arc, 0.0) + factor * D / R
        worst = max(self.lat[u, v] for u, v in traffic)
        return traffic, [(steps, worst, R)]

    def _tree(self, coll, D):
        n = self.n
        depth = math.ceil(math.log2(n)) + 1
        traffic = {}
        for t in (0, 1):
            for r in range(n):
                p, _, _ = planners.tree_links(n, t, r)
                if p >= 0:
                    traffic[(p, r)] = traffic.get((p, r), 0.0) + D / 2
                    if coll == "all_reduce":
                        traffic[(r, p)] = traffic.get((r, p), 0.0) + D / 2
        worst = max(self.lat[u, v] for u, v in traffic)
        steps = 2 * depth if coll == "all_reduce" else depth
        return traffic, [(steps, worst, 3)]

    def _hier(self, D, layout):
        traffic, members = {}, {}
        for r, a in enumerate(layout.agg_of):
            if a != r:
                traffic[(r, a)] = D
                traffic[(a, r)] = D
                members[a] = members.get(a, 0) + 1
        phases = []
        if members:
            intra = max(self.lat[u, v] for u, v in traffic)
            fan = max(members.values())
            phases += [(1, intra, fan), (1, intra, fan)]
        k = len(layout.agg_ring)
        if k > 1:
            ring_traffic, ring_phases = self._sub_ring(D, layout.agg_ring)
            for arc, b in ring_traffic.items():
                traffic[arc] = traffic.get(arc, 0.0) + b
            phases += ring_phases
        return traffic, phases

    def _sub_ring(self, D, order):
        k = len(order)
        traffic = {(order[i], order[(i + 1) % k]): 2 * (k - 1) / k * D for i in range(k)}
        return traffic, [(2 * (k - 1), max(self.lat[u, v] for u, v in traffic), 1)]

    # ---- resources ---------------------------------------------------------------------------
    def _busiest(self, traffic):
        """Seconds the most loaded resource (link, NIC direction, rank) needs."""
        worst = 0.0
        sent, recv = np.zeros(self.n), np.zeros(self.n)
        nic_out, nic_in = {}, {}
        for (u, v), b in traffic.items():
            worst = max(worst, b / self.bw[u, v])
            sent[u] += b
            recv[v] += b
            hu, hv = self.host_of[u], self.host_of[v]
            if hu != hv:
                nic_out[hu] = nic_out.get(hu, 0.0) + b
                nic_in[hv] = nic_in.get(hv, 0.0) + b
        worst = max(worst, sent.max() / self.proc_Bps, recv.max() / self.proc_Bps)
        if math.isfinite(self.nic_Bps):
            worst = max([worst] + [b / self.nic_Bps for b in list(nic_out.values()) + list(nic_in.values())])
        return worst

    def _narrowest(self, traffic):
        caps = [self.bw[u, v] for u, v in traffic]
        if math.isfinite(self.nic_Bps) and any(self.host_of[u] != self.host_of[v] for u, v in traffic):
            caps.append(self.nic_Bps)
        return min(caps) if caps else math.inf

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
def calibrate(run_ring_allreduce, n, small_reps=3, big_bytes=1 << 20):
    """Measure (step latency, processing rate) with ring all-reduces and agree on them.

    ``run_ring_allreduce(array, op)`` must run a ring all-reduce on every rank (the caller's
    communicator). Returns a :class:`CostModel` every rank shares (max over ranks).
    """
    tiny = np.zeros(1, np.float32)
    run_ring_allreduce(tiny, "sum")  # warm-up: first frames, page faults
    best = math.inf
    for _ in range(small_reps):
        t0 = time.perf_counter()
        run_ring_allreduce(tiny, "sum")
        best = min(best, time.perf_counter() - t0)
    per_step = best / (2 * (n - 1))
    big = np.zeros(big_bytes // 4, np.float32)
    t0 = time.perf_counter()
    run_ring_allreduce(big, "sum")
    t_big = time.perf_counter() - t0
    moved = 2 * (n - 1) / n * big_bytes
    secs_per_byte = max(t_big - best, 1e-9) / moved
    agreed = np.array([per_step, secs_per_byte], np.float64)
    run_ring_allreduce(agreed, "max")
    return CostModel(n, overhead_s=float(agreed[0]), proc_Bps=1.0 / float(agreed[1]), source="measured")
