"""Tests for pycoll.plan.hamiltonian: arc-disjoint Hamiltonian cycles of K*_n."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pycoll.plan.hamiltonian as ham

SIZES = range(1, 33)
EXCEPTIONAL = {4: 2, 6: 4}  # n -> documented maximum number of arc-disjoint Hamiltonian cycles
DOCUMENTED_LEFTOVERS = {
    4: [(0, 2), (1, 3), (2, 0), (3, 1)],
    6: [(0, 4), (1, 3), (2, 5), (3, 1), (4, 0), (5, 2)],
}


def expected_count(n: int) -> int:
    if n <= 2:
        return 1
    return EXCEPTIONAL.get(n, n - 1)


def arc_owners(cycles):
    """Map every arc to the list of cycle indices that use it."""
    owners = {}
    for index, cycle in enumerate(cycles):
        for arc in ham.cycle_arcs(cycle):
            owners.setdefault(arc, []).append(index)
    return owners


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", SIZES)
def test_every_ordered_pair_in_exactly_one_cycle(n):
    cycles = ham.hamiltonian_cycles(n)
    assert len(cycles) == expected_count(n)
    for cycle in cycles:
        assert sorted(cycle) == list(range(n)), "each cycle visits every vertex exactly once"
    owners = arc_owners(cycles)
    assert all(len(users) == 1 for users in owners.values())
    leftovers = [(u, v) for u in range(n) for v in range(n) if u != v and (u, v) not in owners]
    assert leftovers == DOCUMENTED_LEFTOVERS.get(n, [])
    assert ham.leftover_arcs(n, cycles) == leftovers
    ham.verify_decomposition(n, cycles, require_complete=n not in EXCEPTIONAL)


@pytest.mark.timeout(60)
def test_small_cases_are_as_documented():
    assert ham.hamiltonian_cycles(1) == [[0]]
    assert ham.hamiltonian_cycles(2) == [[0, 1]]
    assert ham.leftover_arcs(2, [[0, 1]]) == []
    assert ham.leftover_arcs(1, [[0]]) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [4, 6])
def test_exceptional_sizes_have_no_full_decomposition(n):
    """Exhaustive check that n-1 arc-disjoint Hamiltonian cycles do not exist, so n-2 is the max."""
    # Every cycle of a full decomposition leaves vertex 0 by a different arc, so search for one
    # cycle per first hop 0 -> j, j = 1..n-1, all arc-disjoint.
    used = set()

    def cycles_from(first):
        rest = [v for v in range(1, n) if v != first]

        def paths(prefix, remaining):
            if not remaining:
                yield prefix
            for v in remaining:
                if (prefix[-1], v) not in used:
                    yield from paths(prefix + [v], [w for w in remaining if w != v])

        for path in paths([0, first], rest):
            arcs = ham.cycle_arcs(path)
            if not used.intersection(arcs):
                yield arcs

    def search(first):
        if first == n:
            return True
        for arcs in cycles_from(first):
            used.update(arcs)
            if search(first + 1):
                return True
            used.difference_update(arcs)
        return False

    assert not search(1)
    cycles = ham.hamiltonian_cycles(n)
    assert len(cycles) == n - 2
    ham.verify_decomposition(n, cycles)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", SIZES)
def test_deterministic_and_not_shared(n):
    first = ham.hamiltonian_cycles(n)
    snapshot = [list(c) for c in first]
    first[0].reverse()  # callers may mutate their copy without touching the cache
    first.append([0])
    assert ham.hamiltonian_cycles(n) == snapshot
    assert ham.hamiltonian_cycles(n) == ham.hamiltonian_cycles(n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", SIZES)
def test_schedule_cycles_are_the_decomposition(n):
    schedule = ham.schedule_cycles(n)
    assert schedule == ham.hamiltonian_cycles(n)
    ham.verify_decomposition(n, schedule)


@pytest.mark.timeout(60)
def test_uncached_search_is_fast_up_to_32():
    for n in range(8, 33, 2):
        start = time.perf_counter()
        cycles = ham._extend_odd_to_even(n)  # bypass the cache: time the search itself
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"n={n} took {elapsed:.2f} s"
        ham.verify_decomposition(n, cycles, require_complete=True)
        assert [list(c) for c in ham._extend_odd_to_even(n)] == ham.hamiltonian_cycles(n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        ham.hamiltonian_cycles(n)


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 32), data=st.data())
def test_verify_rejects_a_repeated_arc(n, data):
    cycles = ham.hamiltonian_cycles(n)
    first = data.draw(st.integers(0, len(cycles) - 1))
    shift = data.draw(st.integers(0, n - 1))
    repeat = cycles[first][shift:] + cycles[first][:shift]  # the same cycle, rotated
    with pytest.raises(ValueError, match=r"arc \d+->\d+ is used by cycle \d+ and again by cycle"):
        ham.verify_decomposition(n, cycles + [repeat])


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 32), data=st.data())
def test_verify_rejects_a_non_hamiltonian_cycle(n, data):
    cycles = ham.hamiltonian_cycles(n)
    index = data.draw(st.integers(0, len(cycles) - 1))
    broken = list(cycles[index])
    position = data.draw(st.integers(0, n - 1))
    broken[position] = broken[(position + 1) % n]  # a vertex twice, another missing
    cycles[index] = broken
    with pytest.raises(ValueError, match=rf"cycle {index} is not Hamiltonian on {n} vertices"):
        ham.verify_decomposition(n, cycles)


@pytest.mark.timeout(60)
def test_verify_reports_missing_arcs_when_complete_is_required():
    cycles = ham.hamiltonian_cycles(7)[:-1]
    ham.verify_decomposition(7, cycles)
    with pytest.raises(ValueError, match="7 arcs are not covered"):
        ham.verify_decomposition(7, cycles, require_complete=True)
