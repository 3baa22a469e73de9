"""Tests of pycoll.emulator (network namespaces + C delay line + tc).

Need root.  Skipped (with the reason printed) only when available() says the
namespaces/TUN/tc cannot be set up here.  Every test builds its own emulated
network and relies on the context manager for cleanup; test_teardown_* check
that nothing is left behind, including after SIGTERM and SIGKILL of the
process that owns an emulator.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Test the checkout this file lives in, even if another pycoll is installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pycoll.emulator import (Emulator, EmuSpec, LinkSpec, RUN_PREFIX,  # noqa: E402
                             cleanup_stale, list_netns, parse_rate, parse_time)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


# --------------------------------------------------------------- pure python

@pytest.mark.timeout(120)
def test_spec_parsing_and_from_topology():
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("100mbps") == 100e6  # megabits (pycoll.units), not tc's megabytes
    assert parse_rate("12.5MB/s") == 100e6
    assert parse_rate(None) is None and parse_rate("none") is None
    assert parse_time("25ms") == pytest.approx(0.025)
    assert parse_time(0.5) == 0.5
    with pytest.raises(ValueError):
        parse_rate("fast")

    class L:  # duck-typed pycoll.plan.topology link: bytes/s, seconds
        def __init__(self, bw, lat, loss=0.0):
            self.bandwidth_Bps, self.latency_s, self.loss = bw, lat, loss

    class Topo:
        world_size = 3

        def link(self, u, v):
            return L(12.5e6 if u < v else None, 0.001 * (u + v), 0.01 * (u == 0))

    spec = EmuSpec.from_topology(Topo())
    assert spec.n_peers == 3
    assert spec.link_spec(0, 1) == LinkSpec(100e6, 0.001, 0.01, 0.0)
    assert spec.link_spec(2, 1).rate_bps is None
    rate, delay, loss, _ = spec.link_spec(1, 2)
    assert (rate, delay, loss) == (100e6, 0.003, 0.0)
    assert EmuSpec.coerce({"n_peers": 2, "rate": "1gbit", "delay": "5ms"}).link_spec(1, 0) == \
        LinkSpec(1e9, 0.005, 0.0, 0.0)
    with pytest.raises(ValueError):
        EmuSpec.uniform(2, loss=2.0)


@pytest.mark.timeout(120)
def test_delayline_build_cache(tmp_path, monkeypatch):
    """The delay line compiles once into the cache dir (no root needed): $PYCOLL_CACHE_DIR, else
    $XDG_CACHE_HOME/pycoll, else (unusable) a per-user folder in the temp dir."""
    from pycoll.emulator import _build
    if _build.compiler() is None:
        pytest.fail("no C compiler: the emulator needs one (and so does installing pycoll)")
    for var in ("PYCOLL_DELAYLINE_BIN", "PYCOLL_DELAYLINE_SRC", "PYCOLL_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert _build.source_path().is_file()
    assert _build.source_path() in _build.source_candidates()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = Path(_build.delayline_binary())
    assert first.parent == tmp_path / "xdg" / "pycoll" and os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns
    assert Path(_build.delayline_binary()) == first and first.stat().st_mtime_ns == mtime  # cached
    r = subprocess.run([str(first)], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "usage" in r.stderr  # it is the delay line

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache unusable
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = Path(_build.delayline_binary())
    assert fallback.parent == tmp_path / "tmp" / f"pycoll-cache-{os.getuid()}", fallback

    monkeypatch.setenv("PYCOLL_CACHE_DIR", str(tmp_path / "explicit"))
    assert Path(_build.delayline_binary()).parent == tmp_path / "explicit"
    monkeypatch.setenv("PYCOLL_DELAYLINE_SRC", str(tmp_path / "missing.c"))
    with pytest.raises(RuntimeError, match="source not found"):
        _build.delayline_binary()


# --------------------------------------------------------------- (a) delay

@pytest.mark.timeout(120)
def test_rtt_two_peers_20ms(emu_ok):
    with Emulator(EmuSpec.uniform(2, delay_s=0.020)) as emu:
        res = emu.loopback_check(count=20)
    for pair, r in res.items():
        print(pair, r)
        # SYN and SYN-ACK cross the delay line too: connect takes one RTT.
        assert 0.040 <= r["rtt"] <= 0.060, r
        assert 0.040 <= r["connect_s"] <= 0.100, r


@pytest.mark.timeout(120)
def test_asymmetric_delay_and_jitter(emu_ok):
    links = {(0, 1): LinkSpec(None, 0.030, 0.0, 0.002), (1, 0): LinkSpec(None, 0.005, 0.0)}
    with Emulator(EmuSpec(2, links)) as emu:
        res = emu.loopback_check(count=10)
    for r in res.values():
        assert 0.033 <= r["rtt"] <= 0.055, r


# --------------------------------------------------------------- (b) rate

@pytest.mark.timeout(120)
def test_rate_cap_50mbit(emu_ok):
    cap = 50e6
    with Emulator(EmuSpec.uniform(2, rate_bps=cap, delay_s=0.005)) as emu:
        r = emu.measure_transfer(0, 1, seconds=3.0)
    print({k: v for k, v in r.items() if k != "timeline"})
    assert r["eof"] and r["bytes"] == r["sent_bytes"]
    assert 0.70 * cap <= r["rate_bps"] <= 1.05 * cap, r["rate_bps"]


# --------------------------------------------------------------- (c) loss

@pytest.mark.timeout(120)
def test_loss_1pct_byte_exact(emu_ok):
    # 9000-byte MTU: enough packets that 1 % loss surely hits some of them.
    nbytes = 24 << 20
    with Emulator(EmuSpec.uniform(2, delay_s=0.005, loss=0.01), mtu=9000, seed=7) as emu:
        r = emu.measure_transfer(0, 1, seconds=60.0, nbytes=nbytes)
        st = emu.stats()
    fwd = next(l for l in st["links"] if (l["src"], l["dst"]) == (0, 1))
    print(fwd, {k: v for k, v in r.items() if k != "timeline"})
    assert r["eof"]
    assert r["bytes"] == r["sent_bytes"] == nbytes
    assert r["sha256"] == r["sent_sha256"]
    assert fwd["loss_drops"] >= 5
    assert 0.003 <= fwd["loss_drops"] / fwd["in_pkts"] <= 0.03


# --------------------------------------------------------------- (d) teardown

@pytest.mark.timeout(120)
def test_teardown_leaves_nothing(emu_ok):
    emu = Emulator(EmuSpec.uniform(3, rate_bps=100e6, delay_s=0.002, host_nic_bps=200e6))
    pids = []
    with pytest.raises(RuntimeError, match="boom"):
        with emu:
            assert all(ns in list_netns() for ns in emu.netns)
            pids.append(emu.delayline_pid)
            for r in range(3):
                # a child that ignores SIGTERM and a grandchild in its group
                p = emu.run_in(r, ["sh", "-c", "trap '' TERM; sleep 60 & sleep 60; wait"])
                pids.append(p.pid)
            time.sleep(0.3)
            raise RuntimeError("boom")
    assert not [ns for ns in list_netns() if ns.startswith(emu.prefix)]
    assert not _wait_gone(pids)
    # Closing twice is harmless; using a closed emulator is an error.
    emu.close()
    with pytest.raises(RuntimeError):
        emu.run_in(0, ["true"])


_CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    from pycoll.emulator import Emulator, EmuSpec
    emu = Emulator(EmuSpec.uniform(2, delay_s=0.001)).start()   # no `with`: rely on handlers
    p = emu.run_in(1, ["sleep", "60"])
    print(json.dumps({{"prefix": emu.prefix, "pids": [emu.delayline_pid, p.pid]}}), flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_teardown_on_signal(emu_ok, sig):
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT))],
                             stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())
        assert all(ns.startswith(info["prefix"]) for ns in list_netns()
                   if ns.startswith(info["prefix"]))
        assert len([ns for ns in list_netns() if ns.startswith(info["prefix"])]) == 2
        child.send_signal(sig)
        child.wait(timeout=20)
        if sig == signal.SIGKILL:
            # No handler can run: the delay line notices its stdin closing
            # and exits; the namespaces are reclaimed by the next sweep.
            assert not _wait_gone(info["pids"][:1])
            removed = cleanup_stale()
            assert len([ns for ns in removed if ns.startswith(info["prefix"])]) == 2
        assert not [ns for ns in list_netns() if ns.startswith(info["prefix"])]
        assert not _wait_gone(info["pids"])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        cleanup_stale()


@pytest.mark.timeout(120)
def test_no_namespaces_left_by_this_run(emu_ok):
    assert not [ns for ns in list_netns() if ns.startswith(RUN_PREFIX)]


# --------------------------------------------------------------- (e) mesh

@pytest.mark.timeout(120)
def test_mesh_links_independent_and_nic_shared(emu_ok):
    cap = 40e6
    pairs = [(0, 1), (0, 2), (1, 2)]
    # Per-link caps only: host 0 sends two flows, host 2 receives two, and
    # still every flow gets its own link's full rate.
    with Emulator(EmuSpec.uniform(3, rate_bps=cap, delay_s=0.005)) as emu:
        res = emu.measure_transfers(pairs, seconds=3.0)
    rates = {r["pair"]: r["window_rate_bps"] for r in res}
    print("independent", {p: round(v / cap, 3) for p, v in rates.items()})
    for p, v in rates.items():
        assert 0.70 * cap <= v <= 1.05 * cap, (p, v)

    # Add a NIC cap equal to one link: 0->1 and 0->2 share host 0's egress,
    # 0->2 and 1->2 share host 2's ingress, so each gets about half.
    with Emulator(EmuSpec.uniform(3, rate_bps=cap, delay_s=0.005, host_nic_bps=cap)) as emu:
        res = emu.measure_transfers(pairs, seconds=3.0)
    rates = {r["pair"]: r["window_rate_bps"] for r in res}
    print("shared NIC", {p: round(v / cap, 3) for p, v in rates.items()})
    # The NIC qdiscs give each destination (egress) and each source
    # (ingress) an equal guaranteed share, so all three flows get ~half.
    for p, v in rates.items():
        assert 0.35 * cap <= v <= 0.65 * cap, (p, v)
    for a, b in (((0, 1), (0, 2)), ((0, 2), (1, 2))):
        assert 0.80 * cap <= rates[a] + rates[b] <= 1.05 * cap, (a, b, rates)


# --------------------------------------------------------------- CLI

@pytest.mark.timeout(120)
def test_cli_runs_command_in_every_peer(emu_ok):
    from pycoll.emulator.__main__ import main
    script = ('test "$PEER_IPS" = 10.77.0.1,10.77.0.2,10.77.0.3 && '
              'ip -br addr show emu0 | grep -q "$PEER_IP/16" && exit $((PEER_RANK * 3))')
    assert main(["--peers", "3", "--delay", "1ms", "--", "sh", "-c", script]) == 3
    assert main(["--peers", "2", "--", "true"]) == 0
    assert not [ns for ns in list_netns() if ns.startswith(RUN_PREFIX)]
