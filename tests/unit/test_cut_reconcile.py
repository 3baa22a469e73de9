"""Reconciling cut-link reports (pycoll.control.coordinator.minimum_cover): exclude the fewest
members that explain every "I cannot reach X" report, the same way for the same reports."""
import itertools
import random

from pycoll.control.coordinator import minimum_cover

RANKS = {n: i for i, n in enumerate("abcdefghijklmnopqrstuvwxyz")}


def cover(edges):
    return sorted(minimum_cover(set(edges), RANKS.__getitem__))


def test_one_cut_peer_reported_by_all_and_reporting_all_is_the_one_excluded():
    edges = [(x, "d") for x in "abc"] + [("d", x) for x in "abc"]
    assert cover(edges) == ["d"]


def test_a_cut_peer_seen_only_from_its_side_or_only_from_the_others():
    assert cover([("b", x) for x in "acd"]) == ["b"]
    assert cover([(x, "b") for x in "acd"]) == ["b"]


def test_a_single_report_excludes_the_higher_rank():
    assert cover([("a", "c")]) == ["c"]
    assert cover([("c", "a")]) == ["c"]


def test_conflicting_reports_exclude_the_fewest():
    # a cannot reach b, b cannot reach c, c cannot reach b: excluding b explains all three
    assert cover([("a", "b"), ("b", "c"), ("c", "b")]) == ["b"]
    # two independent cuts need two exclusions
    assert cover([("a", "b"), ("c", "d")]) == ["b", "d"]


def test_the_cover_is_minimal_and_independent_of_report_order():
    rng = random.Random(5)
    for _ in range(200):
        nodes = list("abcdefg")[: rng.randint(2, 7)]
        edges = {tuple(rng.sample(nodes, 2)) for _ in range(rng.randint(1, 8))}
        got = minimum_cover(edges, RANKS.__getitem__)
        assert all(a in got or b in got for a, b in edges)
        smallest = min(k for k in range(1, len(nodes) + 1) for c in itertools.combinations(nodes, k)
                       if all(a in c or b in c for a, b in edges))
        assert len(got) == smallest
        shuffled = list(edges)
        rng.shuffle(shuffled)
        assert minimum_cover(set(shuffled), RANKS.__getitem__) == got


def test_many_members_fall_back_to_a_greedy_cover_that_still_covers():
    names = [f"n{i}" for i in range(40)]
    rank = {n: i for i, n in enumerate(names)}
    edges = {(n, "n7") for n in names if n != "n7"} | {("n3", "n9")}
    got = minimum_cover(edges, rank.__getitem__)
    assert "n7" in got and all(a in got or b in got for a, b in edges) and len(got) == 2
