"""Deciding parity from hashes (pure Python; runs inside the coordinator).

Peers report, per tensor, a *key* (dtype, shape, byte count) and a 64-bit
hash of the bytes, plus the revision of their state. From these reports:

* the *target revision* is the highest one reported (a peer behind it, such
  as a newcomer, is out of date by definition);
* for each tensor the *majority hash* is the most common hash among the
  peers at the target revision; a tie goes to the hash held by the lowest
  rank, so every run decides the same way;
* a peer whose hash differs from the majority *fetches* the tensor from the
  peers that hold it (any revision: identical bytes are identical), cut
  into pieces striped across up to ``max_sources`` holders. Pieces start on
  the hash's 64 KiB blocks (:data:`BLOCK`), so that the receiver can hash
  them as they land; each goes to the holder that serves the fewest bytes
  so far (ties: rotated by tensor and fetcher), so a state of many small
  tensors is spread over the holders as evenly as one of a few big ones.

Everything here is deterministic in its inputs.
"""
from collections import Counter

MIN_PIECE = 256 * 1024      # smaller pieces cost more in round trips than they gain
MAX_SOURCES = 8
BLOCK = 64 * 1024           # the hash's block (pycoll.h PC_HASH_BLOCK): pieces start on one


class LayoutMismatch(ValueError):
    """Peers disagree on which tensors exist or on their dtype/shape."""


def majority(values_by_rank):
    """The most common value; ties go to the value of the lowest rank."""
    counts = Counter(values_by_rank.values())
    best = max(counts.values())
    for rank in sorted(values_by_rank):
        if counts[values_by_rank[rank]] == best:
            return values_by_rank[rank]
    raise ValueError("no values")


def _layout(reports):
    """Tensor names and keys all peers must share, in a fixed order."""
    layouts = {r: tuple((t[0], tuple(t[1])) for t in rep["tensors"]) for r, rep in reports.items()}
    agreed = majority(layouts)
    odd = sorted(r for r, lay in layouts.items() if lay != agreed)
    if odd:
        mine = dict(agreed)
        details = []
        for r in odd[:4]:
            theirs = dict(layouts[r])
            missing = sorted(set(mine) - set(theirs))
            extra = sorted(set(theirs) - set(mine))
            differ = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
            details.append(f"rank {r}: missing {missing[:3]}, extra {extra[:3]}, different dtype/shape {differ[:3]}")
        raise LayoutMismatch("shared state differs in layout across peers (names, dtypes and shapes must "
                             "match): " + "; ".join(details))
    return [name for name, _ in agreed], dict(agreed)


def _cuts(nbytes, k):
    """k + 1 offsets cutting nbytes into k nearly equal pieces that start on BLOCK boundaries
    (k <= the number of blocks, so none is empty)."""
    blocks = -(-nbytes // BLOCK)
    return [min(nbytes, BLOCK * (blocks * j // k)) for j in range(k + 1)]


def plan_sync(reports, min_piece=MIN_PIECE, max_sources=MAX_SOURCES):
    """Decide a shared-state sync.

    ``reports``: {rank: {"revision": int, "tensors": [[name, key, hash], ...]}}
    where key is [dtype, shape..., nbytes] (compared as a whole).
    Returns {"revision", "names", "majority": {name: hash},
    "fetch": {rank: [[index, [[src, off, len], ...]], ...]},
    "serve": {rank: [[index, [[dst, off, len], ...]], ...]}, "fetchers": {name: [ranks]}}.
    Raises LayoutMismatch when peers disagree on the layout.
    """
    names, keys = _layout(reports)
    target = max(rep["revision"] for rep in reports.values())
    current = [r for r, rep in reports.items() if rep["revision"] == target]
    hashes = {r: {t[0]: t[2] for t in rep["tensors"]} for r, rep in reports.items()}
    fetch = {r: [] for r in reports}
    serve = {r: [] for r in reports}
    chosen, fetchers = {}, {}
    load = {r: 0 for r in reports}  # bytes each peer serves so far
    for index, name in enumerate(names):
        want = majority({r: hashes[r][name] for r in current})
        chosen[name] = want
        holders = sorted(r for r in reports if hashes[r][name] == want)
        need = sorted(r for r in reports if hashes[r][name] != want)
        if not need:
            continue
        fetchers[name] = need
        nbytes = int(keys[name][-1])
        k = max(1, min(len(holders), max_sources, nbytes // min_piece, -(-nbytes // BLOCK)))
        cuts = _cuts(nbytes, k)
        outgoing = {}
        for i, dst in enumerate(need):
            turn = {h: (j - i - index) % len(holders) for j, h in enumerate(holders)}
            sources = sorted(holders, key=lambda h: (load[h], turn[h]))[:k]
            pieces = []
            for j, src in enumerate(sources):
                off, length = cuts[j], cuts[j + 1] - cuts[j]
                if length == 0:
                    continue
                load[src] += length
                pieces.append([src, off, length])
                outgoing.setdefault(src, []).append([dst, off, length])
            fetch[dst].append([index, pieces])
        for src, items in outgoing.items():
            serve[src].append([index, items])
    return {"revision": target, "names": names, "majority": chosen, "fetch": fetch, "serve": serve,
            "fetchers": fetchers}


def compare(reports):
    """Parity report without fixing: {"revision": max, "names", "majority",
    "differ": {name: [ranks whose hash differs]}, "behind": [ranks below max revision]}."""
    names, _ = _layout(reports)
    target = max(rep["revision"] for rep in reports.values())
    current = [r for r, rep in reports.items() if rep["revision"] == target]
    hashes = {r: {t[0]: t[2] for t in rep["tensors"]} for r, rep in reports.items()}
    chosen, differ = {}, {}
    for name in names:
        want = majority({r: hashes[r][name] for r in current})
        chosen[name] = want
        odd = sorted(r for r in reports if hashes[r][name] != want)
        if odd:
            differ[name] = odd
    behind = sorted(r for r, rep in reports.items() if rep["revision"] < target)
    return {"revision": target, "names": names, "majority": chosen, "differ": differ, "behind": behind}
