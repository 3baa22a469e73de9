"""pycoll.emulator: emulate a network of hosts with per-link delay, loss and
bandwidth caps on one Linux box (root; network namespaces + TUN + tc).

Quick use::

    from pycoll.emulator import Emulator, EmuSpec, available
    ok, why = available()
    with Emulator(EmuSpec.uniform(3, rate_bps=100e6, delay_s=0.025, loss=0.001)) as emu:
        p = emu.run_in(0, ["python3", "worker.py"])   # env has PEER_RANK, PEER_IPS
        ...

CLI: ``python -m pycoll.emulator --peers 3 --rate 100mbit --delay 25ms -- CMD...``.
Rates and times use pycoll.units' spellings ("100mbit" = "100mbps" = 100 megabits/s).
See core.py for the design (one netns per peer, a C delay line between TUN
devices, tc htb (+ifb for NIC ingress) for rates).
"""
from .spec import EmuSpec, LinkSpec, SiteSpec, parse_rate, parse_time, tc_rate
from .core import Emulator, available, cleanup_stale, list_netns, peer_address, RUN_PREFIX

__all__ = ["Emulator", "EmuSpec", "LinkSpec", "SiteSpec", "available", "cleanup_stale", "list_netns",
           "parse_rate", "parse_time", "peer_address", "tc_rate", "RUN_PREFIX"]
