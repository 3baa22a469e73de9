"""Executes pycoll plans in Python, for every rank at once, without sockets.

Two uses:
- *reference*: with NumPy element arrays and reduce functions that mirror
  the C kernels, it yields the exact bits a correct engine must produce
  (same reduction order);
- *symbolic verifier*: with object arrays whose elements are expressions
  (leaves ``(rank, index)``, reductions ``("op", a, b)``), it shows who
  contributed to every output element and in which order.
"""
import numpy as np

SEND, RECV, RECV_REDUCE, COPY, REDUCE, SCALE = range(6)
IN, OUT, SCRATCH = range(3)


class PlanDeadlock(AssertionError):
    pass


def simulate(plans, bufs, itemsize, reduce_fn, scale_fn=None):
    """Run ``plans[r]`` (lists of op dicts) over ``bufs[r]`` = [IN, OUT, SCRATCH]
    element arrays (mutated in place). Raises PlanDeadlock if stuck."""
    n = len(plans)
    tails = [p.tail_first if hasattr(p, "tail_first") else len(p) for p in plans]
    plans = [p.ops() if callable(getattr(p, "ops", None)) else p for p in plans]
    done = [[False] * len(p) for p in plans]
    channels = {}  # (src, dst, stripe) -> list of (tag, payload)
    send_pos = [dict() for _ in range(n)]
    remaining = sum(len(p) for p in plans)

    def el(off, length):
        assert off % itemsize == 0 and length % itemsize == 0, "ranges must be whole elements"
        return slice(off // itemsize, (off + length) // itemsize)

    # per-rank FIFO order of net ops per channel
    fifo = []
    for r, plan in enumerate(plans):
        q = {}
        for i, op in enumerate(plan):
            if op["kind"] in (SEND, RECV, RECV_REDUCE):
                key = (op["peer"], op["stripe"], op["kind"] == SEND)
                q.setdefault(key, []).append(i)
        fifo.append({k: [v, 0] for k, v in q.items()})

    progress = True
    while remaining and progress:
        progress = False
        for r, plan in enumerate(plans):
            ops = plan
            before_tail = all(done[r][:tails[r]])
            for i, op in enumerate(ops):
                if done[r][i] or not all(done[r][d] for d in op["deps"]):
                    continue
                if i >= tails[r] and not before_tail:
                    continue
                k = op["kind"]
                if k in (SEND, RECV, RECV_REDUCE):
                    key = (op["peer"], op["stripe"], k == SEND)
                    order, head = fifo[r][key]
                    if order[head] != i:
                        continue
                b = bufs[r]
                if k == SEND:
                    if op["src_buf"] < 0:  # an empty frame (barrier)
                        payload = np.empty(0, dtype=object)
                    else:
                        payload = b[op["src_buf"]][el(op["src_off"], op["len"])].copy()
                    channels.setdefault((r, op["peer"], op["stripe"]), []).append((op["tag"], payload))
                elif k in (RECV, RECV_REDUCE):
                    ch = channels.get((op["peer"], r, op["stripe"]))
                    if not ch:
                        continue
                    tag, payload = ch.pop(0)
                    assert tag == op["tag"], f"rank {r} op {i}: tag {tag:#x} != expected {op['tag']:#x}"
                    assert len(payload) * itemsize == op["len"], f"rank {r} op {i}: length mismatch"
                    if op["dst_buf"] < 0:
                        pass
                    elif k == RECV:
                        dst = el(op["dst_off"], op["len"])
                        b[op["dst_buf"]][dst] = payload
                    else:
                        dst = el(op["dst_off"], op["len"])
                        local = b[op["src_buf"]][el(op["src_off"], op["len"])]
                        b[op["dst_buf"]][dst] = reduce_fn(local, payload)
                elif k == COPY:
                    b[op["dst_buf"]][el(op["dst_off"], op["len"])] = b[op["src_buf"]][el(op["src_off"], op["len"])]
                elif k == REDUCE:
                    dst = el(op["dst_off"], op["len"])
                    b[op["dst_buf"]][dst] = reduce_fn(b[op["dst_buf"]][dst], b[op["src_buf"]][el(op["src_off"], op["len"])])
                elif k == SCALE:
                    if scale_fn is not None:
                        dst = el(op["dst_off"], op["len"])
                        b[op["dst_buf"]][dst] = scale_fn(b[op["dst_buf"]][dst])
                if k in (SEND, RECV, RECV_REDUCE):
                    fifo[r][key][1] += 1
                done[r][i] = True
                remaining -= 1
                progress = True
    if remaining:
        stuck = [(r, i, plans[r][i]) for r in range(n) for i in range(len(plans[r])) if not done[r][i]][:5]
        raise PlanDeadlock(f"{remaining} ops never ran, e.g. {stuck}")
    leftovers = {k: v for k, v in channels.items() if v}
    assert not leftovers, f"messages never received: {list(leftovers)[:5]}"


# ---- symbolic expressions -------------------------------------------------
def leaves(expr):
    """Flatten an expression into its (rank, index) leaves, in order."""
    if expr[0] == "op":
        return leaves(expr[1]) + leaves(expr[2])
    if expr[0] == "scale":
        return leaves(expr[1])
    return [expr]


def sym_reduce(a, b):
    out = np.empty(len(a), dtype=object)
    for i in range(len(a)):
        out[i] = ("op", a[i], b[i])
    return out


def sym_scale(a):
    out = np.empty(len(a), dtype=object)
    for i in range(len(a)):
        out[i] = ("scale", a[i])
    return out


def sym_array(rank, count, base=0):
    out = np.empty(count, dtype=object)
    for i in range(count):
        out[i] = (rank, base + i)
    return out
