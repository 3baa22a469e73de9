"""The emulator's shared uplinks (pycoll.emulator.sites): ranks behind a router per site.

Needs root (skipped with the reason otherwise, like test_emulator.py). Each test builds its own
network with the context manager and checks that no namespace (ranks' or routers') is left.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pycoll.emulator import Emulator, EmuSpec, RUN_PREFIX, SiteSpec, list_netns  # noqa: E402


def _spec(uplink, nic=None, delay=0.004, members=((0, 2), (1, 3))):
    base = EmuSpec.uniform(4, delay_s=delay)
    return EmuSpec(4, link=base.link, host_nic_bps=nic, sites=[SiteSpec(m, uplink) for m in members])


@pytest.mark.timeout(120)
def test_sites_route_and_delay_only_between_sites(emu_ok):
    """Interleaved placement (rank r in site r % 2): every pair reachable, RTT 2 x delay across
    sites and about 0 inside one; the delay line sees only traffic between the routers. A busy
    host only adds to a round trip (one median of 3 read 49 ms across), so the fastest of 5 is
    held to the bounds: every one of them delayed at least the 20 ms across, none inside."""
    with Emulator(_spec(None, delay=0.01)) as emu:
        assert len(emu.router_netns) == 2 and all(ns in list_netns() for ns in emu.router_netns)
        res = emu.loopback_check(count=5)
        for (u, v), r in res.items():
            if u % 2 == v % 2:
                assert r["expected"] == 0 and r["min"] < 0.01, (u, v, r)  # half the 20 ms across
            else:
                assert r["expected"] == pytest.approx(0.02) and 0.019 < r["min"] < 0.04, (u, v, r)
                assert r["rtt"] >= r["min"], (u, v, r)
        assert emu.stats()["unknown_dst"] == 0
        routes = emu.exec_in(0, ["ip", "route"], timeout=10).stdout
        assert "10.77.0.2 via 10.77.255.1" in routes and "10.77.0.3 via" not in routes
    assert not [ns for ns in list_netns() if ns.startswith(RUN_PREFIX)]


@pytest.mark.timeout(120)
def test_uplink_is_shared_by_every_flow_between_sites(emu_ok):
    cap = 40e6
    with Emulator(_spec(cap, nic=200e6)) as emu:
        one = emu.measure_transfers([(0, 1)], seconds=2.5)[0]["window_rate_bps"]
        two = [r["window_rate_bps"] for r in emu.measure_transfers([(0, 1), (2, 3)], seconds=3.0)]
        back = [r["window_rate_bps"] for r in emu.measure_transfers([(0, 1), (3, 2)], seconds=3.0)]
        local = emu.measure_transfers([(0, 2), (0, 1)], seconds=3.0)
        data = emu.measure_transfer(2, 3, nbytes=3 << 20, seconds=20)
    print("one", one / cap, "two", [x / cap for x in two], "both directions", [x / cap for x in back])
    assert 0.8 * cap <= one <= 1.05 * cap
    assert 0.8 * cap <= sum(two) <= 1.05 * cap            # two flows, two senders: one uplink
    assert all(0.8 * cap <= x <= 1.05 * cap for x in back)  # each direction has its own
    inside, across = (r["window_rate_bps"] for r in local)
    assert inside + across <= 1.05 * 200e6 and inside > 3 * cap  # the NIC, not the uplink
    assert data["bytes"] == 3 << 20 and data["sha256"] == data["sent_sha256"]


@pytest.mark.timeout(60)
def test_delayline_rejects_a_bad_route(tmp_path):
    from pycoll.emulator._build import delayline_binary
    conf = tmp_path / "c.conf"
    conf.write_text("peers 1\npeer 0 - t0 10.0.0.1\nroute 10.77.0.0/40 0\n")
    r = subprocess.run([delayline_binary(), str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "bad directive" in r.stderr
