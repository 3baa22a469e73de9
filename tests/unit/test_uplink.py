"""Shared uplinks (a rack's one link to the rest): topology key, cost model, emulator spec. No sockets."""
import math

import pytest

from pycoll.plan.costmodel import CostModel
from pycoll.plan.layout import Layout
from pycoll.plan.topology import TopologyError, parse_topology

RACKS = """[defaults]
latency = "5ms"
host_nic = "1gbit"
[[group]]
name = "rack0"
count = 4
aggregator = "agent"
uplink = "100mbit"
[[group]]
name = "rack1"
count = 4
aggregator = "agent"
uplink = "100mbit"
"""
MiB = 1 << 20


def test_uplink_is_parsed_per_group():
    topo = parse_topology(RACKS)
    assert topo.uplinks_Bps() == [pytest.approx(12.5e6)] * 2
    assert [topo.group_index(r) for r in range(8)] == [0] * 4 + [1] * 4
    plain = parse_topology('[[group]]\nname = "g"\ncount = 2\n')
    assert plain.uplinks_Bps() == [math.inf]
    with pytest.raises(TopologyError, match=r"group\[0\]\.uplink"):
        parse_topology('[[group]]\nname = "g"\ncount = 2\nuplink = "fast"\n')


def test_model_counts_the_uplink_once_for_all_flows():
    """Ring all-reduce of D: the rack-aware ring crosses each uplink once per direction (7/4 D),
    a rack-oblivious order (alternating racks) four times; the uplink is the busiest resource."""
    topo = parse_topology(RACKS)
    model = CostModel.from_topology(topo)
    D, U = 64 * MiB, 12.5e6
    aware, _ = model._rings("all_reduce", D, [list(range(8))])
    assert model._busiest(aware) == pytest.approx(1.75 * D / U)
    oblivious, _ = model._rings("all_reduce", D, [[0, 4, 1, 5, 2, 6, 3, 7]])
    assert model._busiest(oblivious) == pytest.approx(4 * 1.75 * D / U)
    # one flow between racks never beats the uplink, whatever the link matrix says
    assert model.bw[0, 4] == pytest.approx(U) and math.isinf(model.bw[0, 1])


@pytest.mark.parametrize("size", [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB])
def test_auto_prefers_innetwork_and_never_the_multiring_behind_a_shared_uplink(size):
    topo = parse_topology(RACKS)
    model, layout = CostModel.from_topology(topo), Layout(8, topo)
    best, times = model.choose("all_reduce", size, layout)
    assert best == "innetwork"
    # the multi-ring puts 16 of its 56 arcs on each uplink direction: slower than the ring
    assert times["hamiltonian"] > 1.8 * times["ring"]
    # The bandwidth terms give 1.75x (the ring puts 7/4 D on each uplink direction, the aggregators'
    # 2-member ring D); the ring's 14 steps against innetwork's 4 only add latency on top, which
    # fades with size: at 64 MiB the ratio is the bound within 1 %.
    ratio = times["ring"] / times["innetwork"]
    assert ratio > 1.75
    if size == 64 * MiB:
        assert ratio == pytest.approx(1.75, rel=0.01)


def test_the_ring_over_innetwork_ratio_falls_to_the_bandwidth_bound_with_size():
    topo = parse_topology(RACKS)
    model, layout = CostModel.from_topology(topo), Layout(8, topo)
    ratios = [(lambda t: t["ring"] / t["innetwork"])(model.choose("all_reduce", s * MiB, layout)[1])
              for s in (1, 4, 16, 64)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1] + 0.2, ratios


def test_the_model_pipelines_innetwork_in_the_plans_pieces(monkeypatch):
    """predict() cuts innetwork's chunks as plan_hier does (hier_segment): at 1 MiB the
    aggregators' fill and drain are 64 KiB pieces, not whole 512 KiB chunks."""
    from pycoll.plan import planners
    topo = parse_topology(RACKS)
    model, layout = CostModel.from_topology(topo), Layout(8, topo)
    fine = model.predict("innetwork", "all_reduce", MiB, layout, segment_bytes=MiB)
    same = model.predict("innetwork", "all_reduce", MiB, layout, segment_bytes=64 << 10)
    monkeypatch.setattr(planners, "HIER_PIECES", 1)  # one piece per chunk: the schedule before
    coarse = model.predict("innetwork", "all_reduce", MiB, layout, segment_bytes=MiB)
    assert fine == pytest.approx(same) and fine < coarse


def test_without_a_shared_uplink_the_multiring_still_wins_on_private_links():
    """Per-pair caps and no uplink (the old two-racks model): the multi-ring's many links pay off."""
    topo = parse_topology(RACKS.replace('uplink = "100mbit"\n', "").replace(
        '[defaults]\n', '[defaults]\nbandwidth = "100mbit"\n').replace('host_nic = "1gbit"\n', ""))
    best, _ = CostModel.from_topology(topo).choose("all_reduce", 64 * MiB, Layout(8, topo))
    assert best == "hamiltonian"


def test_emulator_spec_builds_sites_from_uplinks():
    from pycoll.emulator import EmuSpec, SiteSpec
    spec = EmuSpec.from_topology(parse_topology(RACKS))
    assert spec.sites == [SiteSpec((0, 1, 2, 3), pytest.approx(100e6), "rack0"),
                          SiteSpec((4, 5, 6, 7), pytest.approx(100e6), "rack1")]
    assert spec.site_of(5) == 1 and spec.site_link(0, 1).delay_s == pytest.approx(0.005)
    assert spec.nic_bps(3) == pytest.approx(1e9)
    assert EmuSpec.from_topology(parse_topology('[[group]]\nname = "g"\ncount = 2\n')).sites is None
    for bad in ([((0, 1), None)], [((0, 1, 2), None), ((2, 3), None)], [((0, 1, 2, 3), -1.0)]):
        with pytest.raises(ValueError):
            EmuSpec(4, sites=bad)
    interleaved = EmuSpec(4, sites=[((0, 2), 1e8), ((1, 3), 1e8)])
    assert [interleaved.site_of(r) for r in range(4)] == [0, 1, 0, 1]
