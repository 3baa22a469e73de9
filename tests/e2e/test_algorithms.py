"""Every algorithm on 1..9 real processes, over shared memory and over loopback TCP, and the
choice made by auto.

Each world size runs one batch of cases (algorithm x collective x dtype x op x uneven size)
under a topology whose groups mix an agent aggregator, no aggregator (incremental deployment)
and a "switch" group, so ``innetwork`` really aggregates. Results must be bit-identical on all
ranks and equal to the plans of the algorithm that ran, executed in Python (same reduction
order); integer results must be exactly equal across all algorithms.
"""
import numpy as np
import pytest

import pycoll.testing
from collective_cases import expected, make_plans, run_cases_algorithms, run_on
from pycoll.plan import planners
from pycoll.plan.costmodel import ALLPAIRS_MIN_BYTES, DIRECT_MAX_BYTES, CostModel, Selector, calibrate
from pycoll.plan.layout import Layout
from pycoll.plan.topology import load_topology, parse_topology

ALGOS = ["ring", "hamiltonian", "tree", "innetwork", "direct", "allpairs", "auto"]


def grouped_topology(n):
    """TOML: groups of up to 3 ranks, aggregators cycling agent / none / switch."""
    kinds = ["agent", None, "switch"]
    text, left, g = "", n, 0
    while left:
        size = min(3, left)
        text += f'[[group]]\nname = "g{g}"\ncount = {size}\n'
        if kinds[g % 3]:
            text += f'aggregator = "{kinds[g % 3]}"\n'
        left, g = left - size, g + 1
    return text


def cases_for(n):
    cases = []
    for i, algo in enumerate(ALGOS):
        cases += [
            ("all_reduce", "float32", "sum", 1000 + 7 * i, 11 + i, algo),
            ("all_reduce", "bfloat16", "avg", 97 + n, 12 + i, algo),
            ("all_reduce", "float64", "prod", 5, 13 + i, algo),
            ("all_reduce", "int32", "sum", 4099, 14, algo),      # same seed: compared across algorithms
            ("all_reduce", "int64", "max", 0, 15, algo),
            ("all_reduce", "uint8", "prod", 1, 16, algo),
            ("all_gather", "float32", "sum", 13 + i, 17 + i, algo),
            ("broadcast", "int16", "sum", 31 + i, 18 + n, algo),
            ("reduce_scatter", "float16", "sum", 7 + i, 19 + i, algo),
        ]
    # several pipeline segments (trees cut at 128 KiB, rings at 1 MiB)
    cases += [("all_reduce", "float32", "sum", 300007, 20, a) for a in ("tree", "innetwork", "hamiltonian")]
    # allpairs: chunks of several segments; and a buffer past single copy's size
    cases += [("all_reduce", "float32", "sum", 150001 * n, 24, "allpairs"),
              ("all_reduce", "float32", "avg", (1 << 20) + 5, 25, "auto")]
    cases += [("all_gather", "float32", "sum", 70001, 21, "hamiltonian"), ("broadcast", "float64", "sum", 40001,
                                                                             22, "tree")]
    return cases


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", range(1, 10))
def test_every_algorithm_bit_exact(n, transport, tmp_path):
    path = tmp_path / "groups.toml"
    path.write_text(grouped_topology(n))
    topo = load_topology(path)
    cases = cases_for(n)
    results = run_on(run_cases_algorithms, n, transport, args=(cases,), timeout=200,
                     init_kwargs={"timeout": 60, "topology": str(path)})
    int_results = {}
    for i, case in enumerate(cases):
        coll, dtype, op, count, seed, algo = case
        ran = {results[r][1][i] for r in range(n)}
        assert len(ran) == 1, f"ranks ran different algorithms for {case}: {ran}"
        ran = ran.pop()
        if algo != "auto":
            assert ran == planners.effective(algo, coll)
        want = expected(case, n, lambda c, k: make_plans(c, k, ran, topo))
        for r in range(n):
            assert results[r][0][i] == want[r], f"rank {r} differs for {case} (ran {ran})"
        if coll != "reduce_scatter":
            assert len({results[r][0][i] for r in range(n)}) == 1, f"ranks disagree on {case}"
        if dtype.startswith(("int", "uint")) and coll == "all_reduce":
            int_results.setdefault((dtype, op, count, seed), set()).add(results[0][0][i])
    for key, outs in int_results.items():
        assert len(outs) == 1, f"algorithms disagree on integer all-reduce {key}"


def _auto_choices(comm, sizes):
    # measured when the epoch was installed, before this first call: choosing runs no collective
    assert comm.epoch_state.selector().model().source == "measured"
    seq = comm.epoch_state.seq
    out = []
    for s in sizes:
        x = np.ones(s // 4, np.float32)
        comm.all_reduce(x)
        out.append((comm.stats[-1].algorithm, float(x[0]) if len(x) else None))
    assert comm.epoch_state.seq == seq + len(sizes)  # one collective per call: none of them calibrated
    return out


@pytest.mark.timeout(120)
def test_auto_measures_once_and_all_ranks_agree():
    """No topology: the cost model is measured once, when the epoch is installed (not at the first
    auto call), and every rank picks the same algorithms."""
    n = 4
    sizes = [4, 4096, 1 << 16, 1 << 20, 4 << 20]
    results = pycoll.testing.run(_auto_choices, n, args=(sizes,), timeout=100)
    assert all(res == results[0] for res in results)
    assert [v for _, v in results[0]] == [float(n)] * len(sizes)
    assert {a for a, _ in results[0]} <= set(planners.SUPPORTS)


# ---- the model's choices (no processes) -------------------------------------------------------
def shipped(name):
    topo = load_topology(f"{pycoll.__path__[0]}/../topologies/{name}.toml")
    return topo, Layout(topo.world_size, topo), CostModel.from_topology(topo)


def test_auto_picks_hamiltonian_on_a_full_mesh_of_links():
    topo, lay, model = shipped("full-mesh-5")
    algo, times = model.choose("all_gather", 64 << 20, lay)
    assert algo == "hamiltonian"
    assert times["ring"] / times["hamiltonian"] > 3  # 4 cycles, each on its own links
    assert model.choose("all_reduce", 64 << 20, lay)[0] == "hamiltonian"


def test_auto_keeps_the_ring_behind_a_shared_nic():
    topo, lay, model = shipped("shared-nic-4")
    for size in (4096, 1 << 20, 64 << 20):
        assert model.choose("all_reduce", size, lay)[0] != "hamiltonian"
        assert model.choose("all_gather", size, lay)[0] != "hamiltonian"


def test_auto_prefers_few_steps_for_small_messages_and_bandwidth_for_large():
    n = 16
    lay = Layout(n, None, hosts=[f"h{r}" for r in range(n)])
    model = CostModel(n, lat=np.full((n, n), 1e-3), nic_Bps=1e9)
    # one step (direct) while its n-1 frames per rank are cheap, then log-depth (tree), then bandwidth
    assert model.choose("all_reduce", 4096, lay)[0] == "direct"
    assert model.choose("all_reduce", 256 << 20, lay)[0] == "ring"
    points = model.switch_points("all_reduce", lay, [4 << k for k in range(28)])
    assert [a for _, a in points] == ["direct", "tree", "ring"]
    # direct is offered only up to DIRECT_MAX_BYTES (the model has no term for its extra reduction work)
    assert points[1][0] == DIRECT_MAX_BYTES * 2
    # the model alone would keep direct further (it has no term for the reduction work): the cap decides
    assert model.predict("direct", "all_reduce", DIRECT_MAX_BYTES * 2, lay) < \
        model.predict("tree", "all_reduce", DIRECT_MAX_BYTES * 2, lay)
    _, times = model.choose("all_reduce", DIRECT_MAX_BYTES * 2, lay, candidates=("tree", "direct"))
    assert "direct" not in times and "tree" in times


def test_direct_is_chosen_for_small_messages_on_one_host():
    """The same-host defaults: the one-step plan wins the smallest sizes for every group size,
    ring or tree take over before the cap."""
    for n in (2, 3, 4, 8):
        model, lay = CostModel(n), Layout(n)
        assert model.choose("all_reduce", 64, lay)[0] == "direct"
        assert model.choose("all_reduce", 4096, lay)[0] == "direct"
        assert model.choose("all_reduce", 1 << 20, lay)[0] != "direct"
        assert model.choose("broadcast", 64, lay)[0] != "direct"  # all_reduce only


def test_allpairs_is_offered_only_where_every_link_is_shared_memory():
    """allpairs wins an all-reduce from ALLPAIRS_MIN_BYTES where the measured model says every link
    is shared memory; never below that, never for other collectives, never by default (sockets,
    a topology file, no measurement)."""
    for n in (2, 4, 8):
        lay = Layout(n)
        shm, plain = CostModel(n, shared_memory=True), CostModel(n)
        for size in (ALLPAIRS_MIN_BYTES, 64 << 20):
            assert shm.choose("all_reduce", size, lay)[0] == "allpairs"
            assert plain.choose("all_reduce", size, lay)[0] != "allpairs"
            assert shm.choose("all_gather", size, lay)[0] != "allpairs"
            # it never costs more than the ring in the model (two steps, the same bytes)
            assert shm.predict("allpairs", "all_reduce", size, lay) <= shm.predict("ring", "all_reduce", size, lay)
        assert shm.choose("all_reduce", ALLPAIRS_MIN_BYTES // 2, lay)[0] != "allpairs"


def _calibrated(comm, shm):
    return calibrate(lambda a, op: comm.all_reduce(a, op=op, algorithm="ring"), comm.world_size,
                     shared_memory=shm[comm.rank]).shared_memory


@pytest.mark.timeout(120)
def test_calibration_agrees_on_shared_memory():
    """One rank with a link that is not shared memory turns it off for every rank."""
    assert pycoll.testing.run(_calibrated, 3, args=([True] * 3,), timeout=100) == [True] * 3
    assert pycoll.testing.run(_calibrated, 3, args=([True, False, True],), timeout=100) == [False] * 3


def test_auto_uses_aggregators_when_groups_are_far_apart():
    text = """
[defaults]
bandwidth = "100mbit"
latency = "10ms"
host_nic = "100mbit"
[intra]
bandwidth = "10gbit"
latency = "50us"
[[group]]
name = "a"
count = 4
aggregator = "agent"
host = "rack-a"
[[group]]
name = "b"
count = 4
aggregator = "agent"
host = "rack-b"
"""
    topo = parse_topology(text)
    lay = Layout(8, topo)
    model = CostModel.from_topology(topo)
    for size in (1 << 20, 64 << 20):
        algo, times = model.choose("all_reduce", size, lay)
        assert algo == "innetwork", (size, times)
    # 4 KiB: one crossing of the 10 ms link (direct) beats two (the aggregators' ring), even with
    # every rank's frames sharing the 100 Mbit NIC
    algo, times = model.choose("all_reduce", 4096, lay)
    assert algo == "direct" and times["innetwork"] > times["direct"] > 0.010, times
    # a ring chunk crosses the slow link 2(n-1)/n * 2 = 3.5 times, an aggregator ring's twice;
    # and the ring's slow arcs carry 2(n-1)/n = 1.75 D, the aggregators' D: the slow link
    # dominates both, so the ratio is 1.75 up to the (small) intra-rack terms
    for size in (4096, 1 << 20, 64 << 20):
        ratio = model.predict("ring", "all_reduce", size, lay) / model.predict("innetwork", "all_reduce", size, lay)
        assert ratio == pytest.approx(1.75, rel=0.015), (size, ratio)


def test_selector_caches_and_respects_explicit_algorithms():
    sel = Selector(4, None, ["h"] * 4)
    assert sel.choose("all_gather", "tree", 100) == "ring"       # tree has no all-gather
    assert sel.choose("all_reduce", "innetwork", 100) == "innetwork"
    first = sel.choose("all_reduce", "auto", 1 << 20)
    assert sel.choose("all_reduce", "auto", 1 << 20) == first and (("all_reduce", 1 << 20) in sel._choices)
    assert sel.choose("barrier", "auto", 0) == "ring"


def _gather_auto(comm, count):
    x = np.full(count, comm.rank, np.int32)
    out = np.zeros(count * comm.world_size, np.int32)
    comm.all_gather(x, out)
    return comm.stats[-1].algorithm, out[::count].tolist()


@pytest.mark.timeout(120)
def test_auto_follows_the_topology_file():
    """With full-mesh-5 (a link per ordered pair), auto runs the multi-ring for large all-gathers."""
    path = f"{pycoll.__path__[0]}/../topologies/full-mesh-5.toml"
    results = pycoll.testing.run(_gather_auto, 5, args=(1 << 18,), timeout=100, init_kwargs={"topology": path})
    assert results == [("hamiltonian", [0, 1, 2, 3, 4])] * 5
