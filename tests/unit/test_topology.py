"""Tests for pycoll.plan.topology: the TOML format, validation, link resolution and ring order."""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pycoll.plan.topology as topo

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"
SHIPPED = sorted(TOPOLOGIES.glob("*.toml"))
GBIT = 1e9 / 8
MBIT = 1e6 / 8

MINIMAL = """
[defaults]
bandwidth = "1gbit"
latency = "1ms"
[[group]]
name = "a"
peers = ["a0", "a1"]
[[group]]
name = "b"
count = 2
"""

pytestmark = pytest.mark.timeout(60)


def test_all_example_files_are_shipped_and_load():
    names = {p.name for p in SHIPPED}
    assert {
        "single-host-4.toml",
        "two-racks.toml",
        "three-sites-wan.toml",
        "full-mesh-5.toml",
        "shared-nic-4.toml",
    } <= names
    for path in SHIPPED:
        t = topo.load_topology(path)
        assert t.world_size == len(t.peers) > 0
        assert t.source == str(path)
        assert t.bandwidth_matrix().shape == (t.world_size, t.world_size)


def test_single_host_4_file():
    t = topo.load_topology(TOPOLOGIES / "single-host-4.toml")
    assert t.world_size == 4
    assert t.hosts() == ["localhost"]
    assert t.link(0, 3) == topo.LinkParams(20e9, 10e-6, 0.0)


def test_two_racks_file():
    t = topo.load_topology(TOPOLOGIES / "two-racks.toml")
    assert t.world_size == 8
    assert [g.name for g in t.groups] == ["rack0", "rack1"]
    assert [g.name for g in t.aggregator_groups()] == ["rack0", "rack1"]
    assert all(g.aggregator == "switch" and g.agent_rank is None for g in t.groups)
    assert t.link("r0p0", "r0p3").bandwidth_Bps == pytest.approx(100 * GBIT)
    assert t.link(0, 4) == t.link(4, 0) == topo.LinkParams(1 * GBIT, 200e-6, 0.0)
    assert t.group_of(5).name == "rack1"


def test_three_sites_file_is_asymmetric_and_ring_order_fixes_it():
    t = topo.load_topology(TOPOLOGIES / "three-sites-wan.toml")
    assert t.peers == ("eu-0", "eu-1", "asia-0", "asia-1", "us-0", "us-1")
    eu, asia, us = t.rank_of("eu-0"), t.rank_of("asia-0"), t.rank_of("us-0")
    assert t.link(eu, us).bandwidth_Bps == pytest.approx(1 * GBIT)
    assert t.link(us, eu).bandwidth_Bps == pytest.approx(500 * MBIT)
    latencies = [t.link(a, b).latency_s for a in (eu, asia, us) for b in (eu, asia, us) if a != b]
    assert min(latencies) == pytest.approx(0.025) and max(latencies) == pytest.approx(0.1)
    order = topo.ring_order(t)
    assert order == [0, 1, 4, 5, 2, 3]
    assert bottleneck(t, order) == pytest.approx(300 * MBIT)
    assert bottleneck(t, list(range(6))) == pytest.approx(100 * MBIT)


def test_full_mesh_and_shared_nic_files():
    mesh = topo.load_topology(TOPOLOGIES / "full-mesh-5.toml")
    assert mesh.world_size == 5 and len(mesh.hosts()) == 5
    off_diagonal = ~np.eye(5, dtype=bool)
    assert np.all(mesh.bandwidth_matrix()[off_diagonal] == pytest.approx(100 * MBIT))
    nic = topo.load_topology(TOPOLOGIES / "shared-nic-4.toml")
    assert len(nic.hosts()) == 4
    assert nic.host_nic_Bps() == pytest.approx(10 * GBIT) == nic.link(0, 1).bandwidth_Bps


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10gbit", 10 * GBIT),
        ("10Gbit", 10 * GBIT),
        ("100Mbps", 100 * MBIT),
        ("2.5 Gbit/s", 2.5 * GBIT),
        ("8bit", 1.0),
        ("1.25GB", 1.25e9),
        ("1kB", 1e3),
        ("3MBps", 3e6),
        ("1e3B/s", 1e3),
        ("2tbit", 2e12 / 8),
        ("unlimited", math.inf),
    ],
)
def test_bandwidth_units(text, expected):
    assert topo.parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("50us", 50e-6),
        ("50µs", 50e-6),
        ("5ms", 5e-3),
        ("1.5s", 1.5),
        ("100ns", 100e-9),
        ("0us", 0.0),
        (0, 0.0),
    ],
)
def test_latency_units(value, expected):
    assert topo.parse_latency(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["10", 10, "10gb", "10gbits", "fast", "-1gbit", "0gbit", "1xbit", "", True])
def test_bad_bandwidth(value):
    with pytest.raises(ValueError, match="bandwidth"):
        topo.parse_bandwidth(value)


@pytest.mark.parametrize("value", ["5", 5, "-5ms", -1, "5 min", "ms", True])
def test_bad_latency(value):
    with pytest.raises(ValueError, match="latency"):
        topo.parse_latency(value)


def _replace(old, new):
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


BAD_INPUTS = {
    "unknown top-level key": (MINIMAL + 'colour = "red"\n', ["colour", "unknown key"]),
    "unknown defaults key": (
        _replace('latency = "1ms"', 'latncy = "1ms"'),
        ["defaults.latncy", "unknown key"],
    ),
    "unknown group key": (_replace('name = "b"', 'name = "b"\nsize = 3'), ["group[1].size", "unknown key"]),
    "unknown link key": (
        MINIMAL + '[[link]]\na = "a"\nb = "b"\nbandwith = "1gbit"\n',
        ["link[0].bandwith", "unknown key"],
    ),
    "duplicate peer": (
        _replace('peers = ["a0", "a1"]', 'peers = ["a0", "a0"]'),
        ["group[0].peers[1]", "duplicate peer"],
    ),
    "duplicate peer across groups": (
        _replace("count = 2", 'peers = ["b0", "a1"]'),
        ["group[1].peers[1]", "duplicate peer", "'a'"],
    ),
    "duplicate group": (_replace('name = "b"', 'name = "a"'), ["group[1].name", "duplicate group"]),
    "group and peer share a name": (
        _replace('name = "b"', 'name = "a0"'),
        ["'a0'", "both a group and a peer"],
    ),
    "missing group name": (_replace('name = "b"\n', ""), ["group[1].name", "missing"]),
    "bad peer name": (_replace('"a1"', '"a 1"'), ["group[0].peers[1]"]),
    "bandwidth without unit": (
        _replace('bandwidth = "1gbit"', "bandwidth = 1000"),
        ["defaults.bandwidth", "unit"],
    ),
    "bad bandwidth unit": (_replace('"1gbit"', '"1gbits"'), ["defaults.bandwidth", "bad bandwidth"]),
    "negative bandwidth": (_replace('"1gbit"', '"-1gbit"'), ["defaults.bandwidth", "negative"]),
    "zero bandwidth": (_replace('"1gbit"', '"0gbit"'), ["defaults.bandwidth", "positive"]),
    "bad latency unit": (_replace('"1ms"', '"1 min"'), ["defaults.latency", "bad latency"]),
    "negative latency": (MINIMAL + '[intra]\nlatency = "-5us"\n', ["intra.latency", "negative"]),
    "negative loss": (
        _replace('latency = "1ms"', 'latency = "1ms"\nloss = -0.1'),
        ["defaults.loss", "negative"],
    ),
    "loss of one": (_replace('latency = "1ms"', 'latency = "1ms"\nloss = 1'), ["defaults.loss", "below 1"]),
    "bad host_nic": (
        _replace('latency = "1ms"', 'latency = "1ms"\nhost_nic = "lots"'),
        ["defaults.host_nic"],
    ),
    "empty peers": (_replace('["a0", "a1"]', "[]"), ["group[0].peers", "empty group"]),
    "zero count": (_replace("count = 2", "count = 0"), ["group[1].count", "empty group"]),
    "negative count": (_replace("count = 2", "count = -2"), ["group[1].count", "empty group"]),
    "peers and count": (_replace("count = 2", 'count = 2\npeers = ["x"]'), ["group[1]", "exactly one of"]),
    "no groups": ('[defaults]\nbandwidth = "1gbit"\n', ["group", "at least one"]),
    "bad aggregator": (_replace('name = "b"', 'name = "b"\naggregator = "tor"'), ["group[1].aggregator"]),
    "link to unknown group": (
        MINIMAL + '[[link]]\na = "a"\nb = "c"\nlatency = "1ms"\n',
        ["link[0].b", "unknown group or peer 'c'"],
    ),
    "link missing endpoint": (MINIMAL + '[[link]]\na = "a"\nlatency = "1ms"\n', ["link[0].b", "missing"]),
    "link sets nothing": (MINIMAL + '[[link]]\na = "a"\nb = "b"\n', ["link[0]", "sets none"]),
    "link peer to itself": (
        MINIMAL + '[[link]]\na = "a0"\nb = "a0"\nlatency = "1ms"\n',
        ["link[0]", "same peer"],
    ),
    "link symmetric not bool": (
        MINIMAL + '[[link]]\na = "a"\nb = "b"\nlatency = "1ms"\nsymmetric = "yes"\n',
        ["link[0].symmetric"],
    ),
    "link bad latency": (MINIMAL + '[[link]]\na = "a"\nb = "b"\nlatency = "1"\n', ["link[0].latency"]),
    "group not a table": ("group = 3\n", ["group", "array of tables"]),
    "TOML syntax": (MINIMAL + "broken = = 1\n", ["invalid TOML", "line 11"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_source_and_field(case):
    text, fragments = BAD_INPUTS[case]
    with pytest.raises(topo.TopologyError) as info:
        topo.parse_topology(text, source="bad.toml")
    message = str(info.value)
    assert message.startswith("bad.toml: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError)


def test_load_topology_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(MINIMAL.replace('"1ms"', '"1 min"'))
    with pytest.raises(topo.TopologyError, match=r"broken\.toml: defaults\.latency"):
        topo.load_topology(path)
    with pytest.raises(topo.TopologyError, match=r"missing\.toml: cannot read"):
        topo.load_topology(tmp_path / "missing.toml")


def test_minimal_file_layout():
    t = topo.parse_topology(MINIMAL, source="x/minimal.toml")
    assert t.name == "minimal"
    assert t.peers == ("a0", "a1", "b-0", "b-1")
    assert [g.ranks for g in t.groups] == [(0, 1), (2, 3)]
    assert t.group_of(3).name == "b" and t.rank_of("b-0") == 2
    assert t.hosts() == ["a0", "a1", "b-0", "b-1"]  # no `host`: each peer is its own host
    assert t.host_nic_Bps() == math.inf
    assert t.aggregator_groups() == []
    with pytest.raises(IndexError):
        t.group_of(4)
    with pytest.raises(KeyError):
        t.rank_of("nobody")
    with pytest.raises(ValueError):
        t.link(1, 1)


def test_link_resolution_layers():
    text = MINIMAL + """
[intra]
bandwidth = "10gbit"
[[group]]
name = "c"
count = 2
host = "box"
aggregator = "agent"
[[link]]              # group-group, both directions
a = "a"
b = "b"
bandwidth = "100mbit"
[[link]]              # peer-peer beats group-group regardless of file order
a = "a1"
b = "b-0"
latency = "7ms"
bandwidth = "5mbit"
symmetric = false
[[link]]              # a later entry of the same level wins
a = "b"
b = "a"
bandwidth = "200mbit"
symmetric = false
[[link]]              # the same group on both ends overrides its inside links
a = "c"
b = "c"
latency = "3us"
[[link]]              # peer-group
a = "a0"
b = "c"
loss = 0.01
"""
    t = topo.parse_topology(text)
    ms = 1e-3
    assert t.link("a0", "a1") == topo.LinkParams(10 * GBIT, 1 * ms, 0.0)  # intra bandwidth, default latency
    assert t.link("a0", "b-1") == topo.LinkParams(100 * MBIT, 1 * ms, 0.0)
    assert t.link("b-1", "a0") == topo.LinkParams(200 * MBIT, 1 * ms, 0.0)
    assert t.link("a1", "b-0") == topo.LinkParams(5 * MBIT, 7 * ms, 0.0)
    assert t.link("b-0", "a1") == topo.LinkParams(200 * MBIT, 1 * ms, 0.0)
    assert t.link("c-0", "c-1") == topo.LinkParams(10 * GBIT, 3e-6, 0.0)
    assert t.link("a0", "c-1") == topo.LinkParams(1 * GBIT, 1 * ms, 0.01)
    assert t.link("c-1", "a0") == topo.LinkParams(1 * GBIT, 1 * ms, 0.01)
    assert t.group_of(t.rank_of("c-1")).agent_rank == t.rank_of("c-0")
    assert [g.name for g in t.aggregator_groups()] == ["c"]
    assert t.hosts() == ["a0", "a1", "b-0", "b-1", "box"]
    bw, lat, loss = t.bandwidth_matrix(), t.latency_matrix(), t.loss_matrix()
    for u in range(t.world_size):
        assert bw[u, u] == math.inf and lat[u, u] == 0.0 and loss[u, u] == 0.0
        for v in range(t.world_size):
            if u != v:
                assert t.link(u, v) == topo.LinkParams(bw[u, v], lat[u, v], loss[u, v])
    bw[0, 1] = 0.0  # matrices are copies
    assert t.bandwidth_matrix()[0, 1] == 10 * GBIT


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_single_host(n):
    t = topo.single_host(n)
    assert t.world_size == n and len(t.groups) == 1 and t.hosts() == ["localhost"]
    assert t.peers == tuple(f"p{i}" for i in range(n))
    if n > 1:
        assert t.link(0, n - 1) == topo.LinkParams(math.inf, 0.0, 0.0)
    assert topo.ring_order(t) == list(range(n))


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_single_host_rejects_bad_n(n):
    with pytest.raises(ValueError):
        topo.single_host(n)


def bottleneck(t, order):
    bw = t.bandwidth_matrix()
    return min(bw[u, v] for u, v in zip(order, order[1:] + order[:1]))


def total_latency(t, order):
    lat = t.latency_matrix()
    return sum(lat[u, v] for u, v in zip(order, order[1:] + order[:1]))


@st.composite
def random_topologies(draw):
    """Groups of random sizes with random, possibly asymmetric group and peer links."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=7))
    lines = ['[defaults]\nbandwidth = "1gbit"\nlatency = "1ms"\n[intra]\nbandwidth = "40gbit"\n']
    for gi, size in enumerate(sizes):
        lines.append(f'[[group]]\nname = "g{gi}"\ncount = {size}\n')
    for a in range(len(sizes)):
        for b in range(len(sizes)):
            if a != b and draw(st.booleans()):
                mbit = draw(st.sampled_from([10, 50, 100, 500, 1000]))
                ms = draw(st.integers(1, 100))
                lines.append(
                    f'[[link]]\na = "g{a}"\nb = "g{b}"\nbandwidth = "{mbit}mbit"\n'
                    f'latency = "{ms}ms"\nsymmetric = false\n'
                )
    peers = [f"g{gi}-{i}" for gi, size in enumerate(sizes) for i in range(size)]
    for _ in range(draw(st.integers(0, 3))):  # a few peer-level overrides
        a, b = draw(st.sampled_from(peers)), draw(st.sampled_from(peers))
        if a != b:
            mbit = draw(st.sampled_from([5, 20, 2000]))
            lines.append(f'[[link]]\na = "{a}"\nb = "{b}"\nbandwidth = "{mbit}mbit"\nsymmetric = false\n')
    return topo.parse_topology("".join(lines))


@settings(max_examples=80, deadline=None)
@given(t=random_topologies())
def test_ring_order_is_a_permutation_keeping_groups_contiguous(t):
    order = topo.ring_order(t)
    assert sorted(order) == list(range(t.world_size))
    assert order[0] == 0
    groups_in_order = [t.group_of(r).name for r in order]
    runs = [name for i, name in enumerate(groups_in_order) if i == 0 or name != groups_in_order[i - 1]]
    assert len(runs) == len(t.groups), f"a group is split: {groups_in_order}"
    assert topo.ring_order(t) == order  # deterministic
    # Never worse than plain rank order: wider bottleneck, or equal and no more latency.
    natural = list(range(t.world_size))
    assert (bottleneck(t, order), -total_latency(t, order)) >= (
        bottleneck(t, natural),
        -total_latency(t, natural),
    )


def test_ring_order_orders_members_by_peer_links():
    # One group of four sites; only 0 -> 2 -> 1 -> 3 -> 0 has wide links in that direction.
    text = '[defaults]\nbandwidth = "10mbit"\nlatency = "1ms"\n[[group]]\nname = "w"\ncount = 4\n'
    for a, b in [(0, 2), (2, 1), (1, 3), (3, 0)]:
        text += f'[[link]]\na = "w-{a}"\nb = "w-{b}"\nbandwidth = "1gbit"\nsymmetric = false\n'
    t = topo.parse_topology(text)
    assert topo.ring_order(t) == [0, 2, 1, 3]
