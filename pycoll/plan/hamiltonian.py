"""Arc-disjoint directed Hamiltonian cycles of the complete symmetric digraph K*_n.

Terms: vertices are ranks ``0..n-1``; an *arc* is an ordered pair ``(u, v)``, ``u != v``;
a *cycle* is a list of all n vertices in visiting order, with arcs ``c[i] -> c[(i+1) % n]``.
K*_n has ``n(n-1)`` arcs, a Hamiltonian cycle uses ``n``, so a full decomposition has ``n-1``
cycles. Tillson (1980) showed it exists for every n except 4 and 6. A multi-ring collective
(TASP) sends one share of the data along each cycle, so every ordered pair carries traffic.

Constructions
-------------
* n = 1: ``[[0]]`` (no arcs). n = 2: ``[[0, 1]]`` (0->1->0 uses both arcs).
* Odd n (Walecki): vertex ``n-1`` is a hub, the others sit on a circle ``Z_{n-1}``. The zigzag
  ``j, j+1, j-1, j+2, j-2, ..., j+(n-1)/2`` (mod n-1), closed through the hub, is a Hamiltonian
  cycle; rotations ``j = 0..(n-3)/2`` split the undirected K_n into (n-1)/2 of them. Each is used
  in both directions, giving n-1 directed cycles.
* Even n >= 8 (extension of the odd case): take the directed Walecki decomposition of K*_{n-1}
  (m = n-1 vertices, m-1 cycles; vertices relabelled by a seeded permutation) and colour every arc
  by its cycle. Find a *rainbow* Hamiltonian path ``p_0 -> ... -> p_{m-1}`` that takes exactly one
  arc of each colour. Insert the new vertex ``n-1`` into every cycle in place of that cycle's path
  arc ``(u, v)`` (giving ``u -> n-1 -> v``), and add one more cycle ``p_0 -> ... -> p_{m-1} -> n-1``
  made of the removed path arcs. The tails ``p_0..p_{m-2}`` and heads ``p_1..p_{m-1}`` are all
  distinct, so every arc into and out of ``n-1`` is used exactly once: n-1 cycles in all. The
  rainbow path comes from a seeded randomized depth-first search (most-constrained vertex first,
  forward checks near the end of the path) with a node budget and restarts; the seed is fixed per
  n, so the result is deterministic. Cost: milliseconds up to n = 32, about a second at n = 64,
  and it grows steeply beyond ~100. Results are cached per n.
  For n = 4 and 6 no rainbow path exists, as Tillson's theorem requires.
* n = 4 and n = 6 (no full decomposition; the nonexistence is checked exhaustively in the tests):
  the maximum is n-2 cycles, because n-1 arc-disjoint Hamiltonian cycles would cover all
  ``n(n-1)`` arcs, i.e. be a full decomposition. We return n-2 cycles: an undirected Hamiltonian
  decomposition of K_n minus a perfect matching ((n-2)/2 cycles), each used in both directions.
  The ``n`` leftover arcs are that matching in both directions:
  n = 4: 2 cycles, leftover ``(0,2) (2,0) (1,3) (3,1)``;
  n = 6: 4 cycles, leftover ``(0,4) (4,0) (1,3) (3,1) (2,5) (5,2)``.

Scheduling and the leftover arcs
--------------------------------
:func:`schedule_cycles` returns the cycles to split data over. For n not in {4, 6} that is the
full decomposition. For 4 and 6 it is the maximum arc-disjoint set above; every member is still a
Hamiltonian cycle, so a multi-ring all-gather over them is correct, but the leftover arcs
(:func:`leftover_arcs`) simply carry no traffic, so those two sizes get n-2 rings instead of
n-1. A caller that wants to use them too may add an extra "leftover round" in which the data
share meant for those arcs travels on the plain ring order ``0, 1, ..., n-1``; that is the
caller's choice and is not done here.
"""

from __future__ import annotations

import functools
import random

__all__ = [
    "hamiltonian_cycles",
    "schedule_cycles",
    "leftover_arcs",
    "verify_decomposition",
    "cycle_arcs",
]

# Maximum arc-disjoint sets for the two exceptional sizes (see the module docstring).
# n=4: the square 0-1-2-3 both ways; n=6: 0-1-2-3-4-5 and 0-2-4-1-5-3 both ways.
_EXCEPTIONAL = {
    4: ((0, 1, 2, 3), (3, 2, 1, 0)),
    6: (
        (0, 1, 2, 3, 4, 5),
        (5, 4, 3, 2, 1, 0),
        (0, 2, 4, 1, 5, 3),
        (3, 5, 1, 4, 2, 0),
    ),
}

# Node budget per depth-first attempt before restarting with a fresh vertex relabelling:
# a bad prefix rarely recovers, so short attempts with restarts beat one deep search.
_NODES_PER_ATTEMPT = 2_000
_MAX_ATTEMPTS = 10_000
# Forward checks cost O(rest^2); they only pay off near the end of the path.
_CHECK_TAIL = 30


def cycle_arcs(cycle: list[int]) -> list[tuple[int, int]]:
    """Return the arcs ``(c[i], c[(i+1) % len])`` of a cycle (none for a one-vertex cycle)."""
    if len(cycle) < 2:
        return []
    return [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def hamiltonian_cycles(n: int) -> list[list[int]]:
    """Return arc-disjoint directed Hamiltonian cycles of K*_n.

    n-1 cycles covering every ordered pair once for every n except 4 and 6; for those two the
    maximum of n-2 cycles (see :func:`leftover_arcs`). n = 1 gives ``[[0]]``, n = 2 ``[[0, 1]]``.
    Deterministic; a fresh list is returned on every call.
    """
    return [list(c) for c in _cycles_cached(_check_n(n))]


def schedule_cycles(n: int) -> list[list[int]]:
    """Return the cycles to split multi-ring traffic over.

    The full decomposition where it exists; for n = 4 and 6 the maximum arc-disjoint set of
    Hamiltonian cycles, whose leftover arcs then carry no traffic.
    """
    return hamiltonian_cycles(n)


def leftover_arcs(n: int, cycles: list[list[int]]) -> list[tuple[int, int]]:
    """Return the ordered pairs ``(u, v)``, ``u != v``, not used by any cycle, sorted."""
    used = {arc for c in cycles for arc in cycle_arcs(c)}
    return [(u, v) for u in range(n) for v in range(n) if u != v and (u, v) not in used]


def verify_decomposition(n: int, cycles: list[list[int]], require_complete: bool = False) -> None:
    """Raise ValueError unless every cycle is Hamiltonian on ``0..n-1`` and no arc is used twice.

    With ``require_complete`` it also raises if some ordered pair is left uncovered.
    """
    first_use: dict[tuple[int, int], int] = {}
    for index, cycle in enumerate(cycles):
        if sorted(cycle) != list(range(n)):
            raise ValueError(
                f"cycle {index} is not Hamiltonian on {n} vertices: {list(cycle)} "
                f"(must visit each of 0..{n - 1} exactly once)"
            )
        for arc in cycle_arcs(cycle):
            if arc in first_use:
                raise ValueError(
                    f"arc {arc[0]}->{arc[1]} is used by cycle {first_use[arc]} and again by cycle {index}"
                )
            first_use[arc] = index
    if require_complete:
        missing = leftover_arcs(n, cycles)
        if missing:
            shown = ", ".join(f"{u}->{v}" for u, v in missing[:8])
            raise ValueError(f"{len(missing)} arcs are not covered by any cycle: {shown}")


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return n


@functools.lru_cache(maxsize=None)
def _cycles_cached(n: int) -> tuple[tuple[int, ...], ...]:
    if n == 1:
        return ((0,),)
    if n == 2:
        return ((0, 1),)
    if n in _EXCEPTIONAL:
        return _EXCEPTIONAL[n]
    if n % 2 == 1:
        return tuple(tuple(c) for c in _walecki_directed(n))
    return tuple(tuple(c) for c in _extend_odd_to_even(n))


def _walecki_directed(n: int) -> list[list[int]]:
    """Walecki's decomposition of K*_n for odd n >= 3, each undirected cycle in both directions."""
    hub, circle = n - 1, n - 1
    half = circle // 2
    offsets = [0]
    for step in range(1, half):
        offsets += [step, -step]
    offsets.append(half)
    cycles = []
    for j in range(half):
        forward = [hub] + [(j + off) % circle for off in offsets]
        cycles += [forward, forward[::-1]]
    return cycles


def _extend_odd_to_even(n: int) -> list[list[int]]:
    """Decompose K*_n, n even >= 8, by threading a new vertex through K*_{n-1}'s cycles."""
    m, new_vertex = n - 1, n - 1
    base = _walecki_directed(m)
    rng = random.Random(0x7A5B + n)  # fixed seed per n keeps the result deterministic
    for _ in range(_MAX_ATTEMPTS):
        relabel = list(range(m))
        rng.shuffle(relabel)
        cycles = [[relabel[v] for v in c] for c in base]
        colour = [[-1] * m for _ in range(m)]
        for index, cycle in enumerate(cycles):
            for u, v in cycle_arcs(cycle):
                colour[u][v] = index
        path = _rainbow_path(colour, m, rng)
        if path is None:
            continue
        result = []
        for u, v in zip(path, path[1:]):
            cycle = cycles[colour[u][v]]
            at = cycle.index(u)  # cycle[at + 1] == v: put the new vertex between them
            result.append(cycle[: at + 1] + [new_vertex] + cycle[at + 1 :])
        result.append(path + [new_vertex])
        return result
    raise RuntimeError(f"no Hamiltonian decomposition found for n={n} (search budget exhausted)")


def _rainbow_path(colour: list[list[int]], m: int, rng: random.Random) -> list[int] | None:
    """Seeded DFS for a Hamiltonian path on m vertices whose m-1 arcs have distinct colours.

    Returns None when the node budget runs out, so the caller can restart with a new labelling.
    """
    visited = [False] * m
    colour_used = [False] * (m - 1)
    path = [rng.randrange(m)]
    visited[path[0]] = True
    budget = [_NODES_PER_ATTEMPT]

    def onward_choices(u: int, v: int) -> int:
        # Arcs that could follow u->v; trying the most constrained v first (Warnsdorff's rule)
        # finds dead ends early instead of at the bottom of the tree.
        taken = colour[u][v]
        return sum(
            1
            for w in range(m)
            if w != v and not visited[w] and not colour_used[colour[v][w]] and colour[v][w] != taken
        )

    def extend() -> bool:
        if len(path) == m:
            return True
        budget[0] -= 1
        if budget[0] < 0:
            return False
        u = path[-1]
        if not _tail_may_finish(colour, m, u, visited, colour_used):
            return False
        options = [v for v in range(m) if not visited[v] and not colour_used[colour[u][v]]]
        rng.shuffle(options)  # random tie-break among equally constrained choices
        options.sort(key=lambda v: onward_choices(u, v))
        for v in options:
            c = colour[u][v]
            visited[v] = colour_used[c] = True
            path.append(v)
            if extend():
                return True
            path.pop()
            visited[v] = colour_used[c] = False
        return False

    return list(path) if extend() else None


def _tail_may_finish(
    colour: list[list[int]], m: int, u: int, visited: list[bool], colour_used: list[bool]
) -> bool:
    """Cheap necessary conditions for completing a rainbow path from u over the unvisited rest.

    Only checked near the end (at most _CHECK_TAIL vertices left), where dead ends are common.
    """
    rest = [v for v in range(m) if not visited[v]]
    if len(rest) > _CHECK_TAIL:
        return True
    sources = rest + [u]
    # Every unvisited vertex must still be enterable by an arc of an unused colour.
    for v in rest:
        if not any(w != v and not colour_used[colour[w][v]] for w in sources):
            return False
    # Every unvisited vertex but the final one must still be leavable.
    stuck = 0
    for v in rest:
        if not any(w != v and not colour_used[colour[v][w]] for w in rest):
            stuck += 1
            if stuck > 1:
                return False
    # Every unused colour must still appear on some arc into the rest.
    missing = {c for c in range(m - 1) if not colour_used[c]}
    for w in sources:
        for v in rest:
            if w != v:
                missing.discard(colour[w][v])
        if not missing:
            return True
    return not missing
