"""Tiny TCP measurement tools run *inside* peer namespaces.

Standalone script (stdlib only, no pycoll import) so it can be started as
``python3 /path/to/probe.py MODE ...`` via ``Emulator.run_in`` without any
PYTHONPATH set-up.  Every mode is bounded in time; results are printed as
one JSON line on stdout.  Servers print ``LISTENING <port>`` once ready.

Modes:
  echo PORT SECONDS            echo server (threads), exits after SECONDS
  ping HOST PORT COUNT         connect, COUNT 8-byte ping-pongs -> rtts
  pingall PORT COUNT H1 H2..   ping each host, report median rtt per host
  sink PORT SECONDS            accept 1 connection, read to EOF -> bytes,
                               timing, sha256 of the stream and a timeline
                               of (CLOCK_MONOTONIC s, bytes) every 50 ms
  source HOST PORT SECONDS NBYTES SEED
                               send NBYTES (0: unbounded) for at most SECONDS,
                               then half-close and wait for the sink's close
"""
from __future__ import annotations

import hashlib
import json
import random
import socket
import statistics
import struct
import sys
import threading
import time

CHUNK = 1 << 20


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    print(f"LISTENING {port}", flush=True)
    return s


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """Connect with bounded retries (server may still be starting)."""
    last = None
    for _ in range(200):
        if time.monotonic() > deadline:
            break
        try:
            c = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"connect {host}:{port} failed: {last}")


def _recv_exact(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            raise ConnectionError("peer closed")
        buf += b
    return bytes(buf)


def echo(port: int, seconds: float) -> None:
    s = _listen(port)
    s.settimeout(0.2)
    end = time.monotonic() + seconds

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(max(0.1, end - time.monotonic()))
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()

    while time.monotonic() < end:
        try:
            c, _ = s.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def _ping(host: str, port: int, count: int, deadline: float) -> dict:
    t0 = time.monotonic()
    c = _connect(host, port, deadline)
    connect_s = time.monotonic() - t0
    c.settimeout(max(0.1, deadline - time.monotonic()))
    rtts = []
    try:
        for i in range(count):
            msg = struct.pack("<Q", i)
            t = time.perf_counter()
            c.sendall(msg)
            if _recv_exact(c, 8) != msg:
                raise RuntimeError("echo mismatch")
            rtts.append(time.perf_counter() - t)
    finally:
        c.close()
    return {"host": host, "connect_s": connect_s, "rtts": rtts,
            "median": statistics.median(rtts) if rtts else None}


def sink(port: int, seconds: float) -> None:
    s = _listen(port)
    s.settimeout(seconds)
    c, _ = s.accept()
    c.settimeout(seconds)
    end = time.monotonic() + seconds
    h = hashlib.sha256()
    n = 0
    t_first = t_last = None
    first_len = 0
    eof = False
    timeline = []
    next_sample = 0.0
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    while time.monotonic() < end:
        k = c.recv_into(buf)
        if k == 0:
            eof = True
            break
        now = time.monotonic()
        if t_first is None:
            t_first, first_len = now, k
        t_last = now
        n += k
        h.update(view[:k])
        if now >= next_sample:   # coarse (time, bytes) samples for windowed rates
            timeline.append((now, n))
            next_sample = now + 0.05
    c.close()
    dur = (t_last - t_first) if t_first is not None else 0.0
    # Exclude the first read's bytes: they arrived before the clock started.
    rate = (n - first_len) * 8 / dur if dur > 0 else None
    if t_last is not None:
        timeline.append((t_last, n))
    print(json.dumps({"bytes": n, "seconds": dur, "rate_bps": rate, "sha256": h.hexdigest(),
                      "eof": eof, "t_first": t_first, "t_last": t_last,
                      "timeline": timeline}), flush=True)


def source(host: str, port: int, seconds: float, nbytes: int, seed: int) -> None:
    """Send a deterministic stream: 1 MiB chunks, each tagged with its index
    so that a duplicated or reordered chunk changes the hash."""
    end = time.monotonic() + seconds
    block = bytearray(random.Random(seed).randbytes(CHUNK))
    c = _connect(host, port, end)
    c.settimeout(max(0.1, end - time.monotonic() + 30))
    h = hashlib.sha256()
    sent = 0
    i = 0
    t0 = time.monotonic()
    while time.monotonic() < end and (nbytes == 0 or sent < nbytes):
        block[:8] = struct.pack("<Q", i)
        want = CHUNK if nbytes == 0 else min(CHUNK, nbytes - sent)
        data = memoryview(block)[:want]
        c.sendall(data)
        h.update(data)
        sent += want
        i += 1
    send_s = time.monotonic() - t0
    c.shutdown(socket.SHUT_WR)
    try:   # wait for the sink to close: everything was delivered
        c.recv(1)
    except OSError:
        pass
    c.close()
    print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "send_s": send_s,
                      "total_s": time.monotonic() - t0}), flush=True)


def main(argv) -> int:
    mode = argv[0]
    if mode == "echo":
        echo(int(argv[1]), float(argv[2]))
    elif mode == "ping":
        deadline = time.monotonic() + 30
        print(json.dumps(_ping(argv[1], int(argv[2]), int(argv[3]), deadline)), flush=True)
    elif mode == "pingall":
        port, count = int(argv[1]), int(argv[2])
        deadline = time.monotonic() + 30
        out = {h: _ping(h, port, count, deadline) for h in argv[3:]}
        print(json.dumps(out), flush=True)
    elif mode == "sink":
        sink(int(argv[1]), float(argv[2]))
    elif mode == "source":
        source(argv[1], int(argv[2]), float(argv[3]), int(argv[4]), int(argv[5]))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
