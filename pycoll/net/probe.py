"""Measure the network between the members of a group: latency and bandwidth matrices.

Every rank runs a :class:`ProbeServer` (a TCP listener on its data address, ephemeral port,
open only while the probe runs; a connection must start with the session's random token, which
the group agreed through its own authenticated channel, or it is dropped). Then, in lock step
(``exchange``, an all-reduce of the group, ends every phase):

1. latency: each rank pings every other at once (a few 8-byte round trips each);
2. sites: :func:`pycoll.plan.measured.find_sites` on the round-trip matrix;
3. bandwidth: the rounds of :func:`pycoll.plan.measured.probe_rounds`; in each, every pair of
   a task sends both ways at once for ``seconds`` (full duplex); the receiver reports the rate
   over the last two thirds of its flow (the first third is slow start);
4. the result (:class:`ProbeResult`): matrices, sites, shared uplinks, a topology file.

Bounded everywhere: every socket has a deadline, every phase a timeout.
"""
from __future__ import annotations

import json
import logging
import math
import os
import select
import socket
import struct
import threading
import time

import numpy as np

from pycoll.auth import recv_exact
from pycoll.plan import measured
from pycoll.plan.topology import parse_topology

log = logging.getLogger("pycoll")
HELLO = struct.Struct("!4s16sBd")  # magic, token, mode, seconds
MAGIC = b"PCPR"
PING, BULK, BULK_MEAN = 1, 2, 3  # BULK: the flow's best stretch; BULK_MEAN: its mean (shared tests)
CHUNK = 1 << 18
WARMUP = 1 / 3  # of a bulk flow's time, not counted (slow start)
ANSWER_MAX = 4096  # bytes of a receiver's rate line


class ProbeServer:
    """Echoes pings and sinks bulk flows for one probe session (closed by :meth:`close`)."""

    def __init__(self, host, token, timeout=30.0):
        self._token = token
        self._known = threading.Event()  # a faster peer may dial before we learn the token
        if token is not None:
            self._known.set()
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._accepter = threading.Thread(target=self._accept, name="pycoll-probe", daemon=True)
        self._accepter.start()

    @property
    def token(self):
        return self._token

    @token.setter
    def token(self, value):
        self._token = value
        self._known.set()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            # (daemons, each bounded by its socket's timeout and _stop: never joined)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            magic, token, mode, seconds = HELLO.unpack(recv_exact(conn, HELLO.size, "probe"))
            self._known.wait(self.timeout)
            if magic != MAGIC or self.token is None or token != self.token or not math.isfinite(seconds):
                return  # not this session's (or a NaN flow time, which no clamp bounds): drop it
            if mode == PING:
                while not self._stop.is_set():
                    data = conn.recv(8)
                    if not data:
                        return
                    conn.sendall(data)
            elif mode in (BULK, BULK_MEAN):
                self._sink(conn, min(max(seconds, 0.01), self.timeout), mode == BULK_MEAN)
        except (OSError, ConnectionError, struct.error):
            return
        finally:
            conn.close()

    @staticmethod
    def _sink(conn, seconds, mean=False):
        """Read for ``seconds`` from the first byte; answer the rate after the warm-up and close
        at once (what the sender still has queued is discarded, not drained: a thin link would
        otherwise hold the round for as long as its buffers take to empty)."""
        first = None
        total = 0
        samples = []  # (time, bytes so far) after the warm-up
        buf = bytearray(CHUNK)
        while True:
            n = conn.recv_into(buf)
            now = time.perf_counter()
            if not n:
                break
            total += n
            if first is None:
                first = now
            elif now - first >= seconds * WARMUP:
                samples.append((now, total))
            if now - first >= seconds:
                break
        if mean:  # two flows sharing a link take turns: their best stretches would add up to more
            rate = _best_window(samples, math.inf)
        else:
            rate = _best_window(samples, seconds * (1 - WARMUP) / 2)
        conn.sendall(json.dumps({"rate": rate}).encode() + b"\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self._accepter.join(timeout=2)


def _best_window(samples, width):
    """The best rate (bytes/s) over any ``width`` seconds of (time, cumulative bytes) samples: a
    short stall (a scheduling hiccup on a busy host, one loss) must not pass for the link's
    capacity, so the flow's best stretch counts, as capacity probes do."""
    best, j = 0.0, 0
    for i in range(len(samples)):
        while samples[i][0] - samples[j][0] > width:
            j += 1
        if j and samples[i][0] - samples[j - 1][0] >= width:
            best = max(best, (samples[i][1] - samples[j - 1][1]) / (samples[i][0] - samples[j - 1][0]))
    if best == 0.0 and len(samples) > 1 and samples[-1][0] > samples[0][0]:
        best = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])  # shorter than one window
    return best


def _connect(addr, token, mode, seconds, timeout):
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(HELLO.pack(MAGIC, token, mode, float(seconds)))
    return s


def ping(addr, token, count=5, timeout=10.0):
    """Least round trip (seconds) over ``count`` 8-byte ping-pongs (after one warm-up)."""
    s = _connect(addr, token, PING, 0.0, timeout)
    try:
        best = math.inf
        for i in range(count + 1):
            t = time.perf_counter()
            s.sendall(struct.pack("!d", t))
            recv_exact(s, 8, "probe")
            if i:
                best = min(best, time.perf_counter() - t)
        return best
    finally:
        s.close()


def bulk(addr, token, seconds, timeout=30.0, mean=False):
    """Send as fast as TCP allows until the receiver answers (it reads for ``seconds``); its
    rate (bytes/s) after the warm-up: the best half-window, or with ``mean`` the mean."""
    s = _connect(addr, token, BULK_MEAN if mean else BULK, seconds, timeout)
    try:
        payload = memoryview(os.urandom(CHUNK))
        end = time.perf_counter() + seconds + timeout
        line, off = b"", 0
        s.setblocking(False)
        while not line.endswith(b"\n"):
            if time.perf_counter() > end:
                raise TimeoutError("probe: no answer from the receiver")
            if len(line) > ANSWER_MAX:  # the answer is one short JSON line: more is not a probe
                raise ValueError(f"probe: the receiver's answer is over {ANSWER_MAX} bytes")
            readable, writable, _ = select.select([s], [s] if not line else [], [], 0.05)
            if readable:
                try:
                    part = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                if not part:
                    break
                line += part
            elif writable:
                try:
                    off = (off + s.send(payload[off:])) % CHUNK
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # the receiver closed after answering: read the answer
                    s.setblocking(True)
                    s.settimeout(timeout)
                    line += s.recv(4096)
        return float(json.loads(line)["rate"])
    finally:
        s.close()


def _or(fallback, fn):
    """fn() or, if the measurement failed (a refused or broken connection), ``fallback``: every
    rank must still reach the probe's next exchange, so a failure is a value, not an exception."""
    def run():
        try:
            return fn()
        except (OSError, ValueError, ConnectionError) as exc:
            log.warning("probe: a measurement failed (%s); counted as %s", exc, fallback)
            return fallback
    return run


def _parallel(jobs, timeout):
    """Run callables in threads; their results in order (an exception is re-raised)."""
    out, errors = [None] * len(jobs), []

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as exc:  # reported below, on this rank
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(jobs)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"probe: a measurement took longer than {timeout} s")
    if errors:
        raise errors[0]
    return out


class ProbeResult:
    """Matrices (``bw`` bytes/s and ``lat`` one-way seconds, [u, v] = u -> v), ``rtt``, the
    ``sites`` found, shared ``uplinks`` {site: bytes/s}, the wall time it took."""

    def __init__(self, bw, lat, rtt, sites, uplinks, seconds, rounds, results=None):
        self.results = results or {}  # {(kind, (a, b)): (rate a->b, rate b->a)}: what was measured
        self.bw, self.lat, self.rtt = bw, lat, rtt
        self.sites, self.uplinks, self.seconds, self.rounds = sites, uplinks, seconds, rounds

    def toml(self, name="measured", names=None):
        """The topology file (``pycoll.plan.topology`` format), with how it was made in comments."""
        note = (f"measured by pycoll probe in {self.seconds:.2f} s ({self.rounds} bandwidth rounds);\n"
                f"sites found by clustering round-trip times: {self.sites}\n"
                "edit freely: bandwidth per direction, latency one way")
        return measured.topology_toml(self.bw, self.lat, self.sites, self.uplinks, name, names, note)

    def topology(self, name="measured"):
        return parse_topology(self.toml(name), source=f"<{name}>")

    def table(self):
        """The matrices as text (Mbit/s and ms), for people."""
        n = len(self.bw)
        head = "      " + "".join(f"{v:>9d}" for v in range(n))
        rows = ["bandwidth u -> v, Mbit/s", head]
        for u in range(n):
            rows.append(f"{u:>5d} " + "".join(
                f"{'-':>9}" if u == v else f"{self.bw[u, v] * 8 / 1e6:9.1f}" for v in range(n)))
        rows += ["round trip u <-> v, ms", head]
        for u in range(n):
            rows.append(f"{u:>5d} " + "".join(
                f"{'-':>9}" if u == v else f"{self.rtt[u, v] * 1e3:9.3f}" for v in range(n)))
        solo = {(self.sites[a], self.sites[b]): v for (k, (a, b)), v in self.results.items() if k == "solo"}
        for (s, t), one in sorted(solo.items()):
            two = [v for (k, (a, b)), v in self.results.items() if k == "dual" and (self.sites[a], self.sites[b]) == (s, t)]
            if len(two) == 2:
                rows.append(f"uplink test site{s} -> site{t}: one flow {one[0] * 8e-6:.1f}, two at once "
                            f"{two[0][0] * 8e-6:.1f} + {two[1][0] * 8e-6:.1f} Mbit/s; back: one {one[1] * 8e-6:.1f}, "
                            f"two {two[0][1] * 8e-6:.1f} + {two[1][1] * 8e-6:.1f}")
        rows.append(f"sites: {self.sites}; shared uplinks: "
                    + (", ".join(f"site{s} {b * 8 / 1e6:.1f} Mbit/s" for s, b in sorted(self.uplinks.items()))
                       or "none found"))
        return "\n".join(rows)


def probe(rank, addrs, exchange, seconds=0.3, pings=5, timeout=30.0):
    """Run the probe on every member (collective: all call it with the same arguments but
    ``rank``). ``addrs[r]`` = (host, port) of member r (the host is what the probe dials);
    ``exchange(array, op)`` all-reduces a float64 array over the group ("sum" or "max")."""
    t0 = time.perf_counter()
    n = len(addrs)
    server = ProbeServer(addrs[rank][0], None, timeout)  # no token yet: it refuses everyone
    try:
        # one exchange: rank 0's random session token (2 doubles) and every rank's port
        first = np.zeros(2 + n, np.float64)
        if rank == 0:
            first[:2] = np.frombuffer(os.urandom(16), np.float64)
            first[:2][~np.isfinite(first[:2])] = 1.0  # keep NaN/inf bit patterns out of a sum
        first[2 + rank] = server.port
        exchange(first, "sum")
        token = first[:2].tobytes()
        server.token = token
        where = [(addrs[r][0], int(first[2 + r])) for r in range(n)]
        # 1. latency, all at once (tiny flows)
        rtt = np.zeros((n, n))
        others = [v for v in range(n) if v != rank]
        rtt[rank, others] = _parallel([_or(timeout, (lambda v: lambda: ping(where[v], token, pings, timeout))(v))
                                       for v in others], timeout + 5)
        exchange(rtt, "sum")
        rtt = np.maximum(rtt, rtt.T)  # (both directions measured the same round trip)
        # 2. sites; 3. bandwidth rounds
        sites = measured.find_sites(rtt)
        rounds = measured.probe_rounds(sites)
        slots = [(kind, tuple(p)) for tasks in rounds for kind, pairs in tasks for p in pairs]
        rates = np.zeros((len(slots), 2))

        def run_rounds(rounds):
            for tasks in rounds:
                jobs = []
                for kind, pairs in tasks:
                    for a, b in pairs:
                        i = slots.index((kind, (a, b)))
                        if rank == a:
                            jobs.append((i, 0, b, kind == "dual"))
                        elif rank == b:
                            jobs.append((i, 1, a, kind == "dual"))
                got = _parallel([_or(0.0, (lambda v, m: lambda: bulk(where[v], token, seconds, timeout, m))(v, m))
                                 for _, _, v, m in jobs], seconds + timeout + 5)
                for (i, d, _, _), r in zip(jobs, got):
                    rates[i, d] = max(rates[i, d], r)
                exchange(np.zeros(1), "sum")  # the round is over on every rank

        run_rounds(rounds)
        exchange(rates, "sum")

        def second_look(tasks):
            """Measure ``tasks`` again; each slot keeps the better of its two looks."""
            mine = rates.copy()
            rates[:] = 0
            for i, slot in enumerate(slots):  # each rank keeps only its own entries to re-sum
                a, b = slot[1]
                if rank == a:
                    rates[i, 0] = mine[i, 0]
                elif rank == b:
                    rates[i, 1] = mine[i, 1]
            extra = measured.pack_rounds(tasks, sites)
            run_rounds(extra)
            exchange(rates, "sum")
            return extra

        first = rounds
        # One second look at intra-site pairs far below their site's median: on a busy host a
        # flow now and then stalls for its whole window (seen: 1 in 20 at 200 Mbit/s).
        again = measured.suspicious(sites, slots, rates)
        if again:
            rounds = rounds + second_look([("pair", [slots[i][1]]) for i in again])
        # ... and at site pairs whose uplink test saw no sharing from uneven flows (starved ones).
        doubtful = measured.doubtful_uplinks(sites, {slot: tuple(rates[i]) for i, slot in enumerate(slots)})
        if doubtful:
            rounds = rounds + second_look([(kind, pairs) for rnd in first for kind, pairs in rnd if kind != "pair"
                                           and (sites[pairs[0][0]], sites[pairs[0][1]]) in doubtful])
    finally:
        server.close()
    if (rates <= 0).any() and (rates > 0).any():  # failed flows: assume the worst measured rate
        rates[rates <= 0] = rates[rates > 0].min()
    results = {slot: (float(rates[i, 0]), float(rates[i, 1])) for i, slot in enumerate(slots)}
    bw, lat, uplinks = measured.fill_matrices(sites, results, rtt)
    return ProbeResult(bw, lat, rtt, sites, uplinks, time.perf_counter() - t0, len(rounds), results)
