"""Sites behind routers: the shared-uplink layout of the emulator (``EmuSpec.sites``).

::

    rank netns  emu0 (veth) ──┐  router netns (one per site)        router netns
    rank netns  emu0 (veth) ──┼─ br0 (bridge) ── forward ── emu0 (TUN) ─ delay line ─ emu0 (TUN) ─ ...
    rank netns  emu0 (veth) ──┘                  uplink htb: one capped queue for the whole site

* Ranks keep their addresses (10.77.x.y/16, :func:`peer_address`) and their interface name
  ``emu0``; a rank reaches ranks of its own site through the bridge (no delay, its NIC cap)
  and every other rank through its router (a /32 route each: members of a site need not be
  contiguous, e.g. an interleaved, rack-oblivious placement).
* Routers are the delay line's peers: it carries only traffic between sites and routes rank
  addresses to their site's router (``route`` directives). Delay, jitter and loss between two
  sites are those of the link between their first members.
* The uplink is an htb class on the router's TUN egress with a drop-tail queue (what the site
  sends), and the same on an ifb for its ingress (what it receives): every flow between two
  sites shares one queue per direction, and TCP there sees drops and queueing, not local
  backpressure, as behind a real rack switch. NIC caps (``host_nic_bps``) are per rank, on
  the rank's veth (egress) and the router's port to it (ingress).
"""
from __future__ import annotations

from typing import List, Optional

ROUTER_IP = "10.78.0.{}"      # the router's TUN (the delay line's peer address), site s -> s+1
GATEWAY_IP = "10.77.255.{}"   # the router's bridge, inside the ranks' /16; peer_address never uses .255.
BRIDGE = "br0"
TUN = "emu0"
IFB = "ifb0"


def router_ip(site: int) -> str:
    return ROUTER_IP.format(site + 1)


def gateway_ip(site: int) -> str:
    return GATEWAY_IP.format(site + 1)


def port_name(rank: int) -> str:
    """The router-side end of rank's veth (IFNAMSIZ: at most 15 characters)."""
    return f"p{rank}"


def router_sysctls() -> List[str]:
    return ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0"]


def router_links(site: int, ranks_here, rank_netns, mtu: int) -> List[str]:
    """``ip -n ROUTER -batch`` lines: the bridge, one veth per member (its far end moved into the
    member's namespace as ``emu0``), the uplink TUN up (the delay line created it)."""
    cmds = [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} mtu {mtu}",
            f"addr add {gateway_ip(site)}/16 dev {BRIDGE}", f"link set {BRIDGE} up"]
    for r in ranks_here:
        p = port_name(r)
        cmds += [f"link add {p} mtu {mtu} type veth peer name {TUN} netns {rank_netns[r]}",
                 f"link set {p} master {BRIDGE}", f"link set {p} up"]
    cmds += [f"link set {TUN} mtu {mtu} txqueuelen 1000", f"addr add {router_ip(site)}/32 dev {TUN}",
             f"link set {TUN} up"]
    return cmds


def router_routes(site: int, site_of, peer_ips) -> List[str]:
    """Every rank of another site through the TUN (the delay line forwards by address)."""
    return [f"route add {ip}/32 dev {TUN}" for r, ip in enumerate(peer_ips) if site_of[r] != site]


def rank_config(rank: int, site_of, peer_ips, mtu: int) -> List[str]:
    """``ip -n RANK -batch`` lines: address, up, a route through the router per remote rank."""
    s = site_of[rank]
    cmds = [f"link set {TUN} mtu {mtu} txqueuelen 1000", f"addr add {peer_ips[rank]}/16 dev {TUN}",
            f"link set {TUN} up"]
    cmds += [f"route add {ip}/32 via {gateway_ip(s)} dev {TUN}" for r, ip in enumerate(peer_ips)
             if site_of[r] != s]
    return cmds


def shaper(dev: str, rate_bps: float, burst: int, quantum: int, limit: int, tc_rate, tc_size) -> List[str]:
    """One htb class (everything on ``dev``) at ``rate_bps`` with a drop-tail queue of ``limit`` bytes."""
    return [f"qdisc add dev {dev} root handle 1: htb default 1",
            f"class add dev {dev} parent 1: classid 1:1 htb rate {tc_rate(rate_bps)} ceil {tc_rate(rate_bps)} "
            f"burst {tc_size(burst)} cburst {tc_size(burst)} quantum {quantum}",
            f"qdisc add dev {dev} parent 1:1 bfifo limit {limit}"]


def ingress_redirect(dev: str) -> List[str]:
    """Send everything arriving on ``dev`` through the ifb (whose egress is then shaped)."""
    return [f"qdisc add dev {dev} handle ffff: ingress",
            f"filter add dev {dev} parent ffff: protocol all prio 1 u32 match u32 0 0 "
            f"action mirred egress redirect dev {IFB}"]


def uplink_queue_bytes(rate_bps: float, mtu: int, rtt_s: float) -> int:
    """A router's buffer: about one bandwidth-delay product (at least 50 ms of the uplink),
    and at least 8 packets."""
    return int(max(8 * (mtu + 64), rate_bps / 8 * max(0.05, rtt_s)))


def site_of_ranks(sites, n: int) -> List[Optional[int]]:
    out: List[Optional[int]] = [None] * n
    for i, s in enumerate(sites):
        for r in s.members:
            out[r] = i
    return out
