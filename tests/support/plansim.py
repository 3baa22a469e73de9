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

SEND, RECV, RECV_REDUCE, COPY, REDUCE, SCALE, ENCODE, DECODE, DECODE_REDUCE = range(9)
IN, OUT, SCRATCH = range(3)


class PlanDeadlock(AssertionError):
    pass


def simulate(plans, bufs, itemsize, reduce_fn, scale_fn=None, codec=None, check_races=False, aliased=False):
    """Run ``plans[r]`` (lists of op dicts) over ``bufs[r]`` = [IN, OUT, SCRATCH]
    element arrays (mutated in place). Raises PlanDeadlock if stuck.
    ``aliased``: IN and OUT are the same memory (for the race check)."""
    n = len(plans)
    tails = [p.tail_first if hasattr(p, "tail_first") else len(p) for p in plans]
    coded = [bool(getattr(p, "codec", 0)) for p in plans]
    plans = [p.ops() if callable(getattr(p, "ops", None)) else p for p in plans]
    assert codec is not None or not any(coded), "compressed plans need a codec"
    if check_races:
        for r in range(n):
            check_plan_races(plans[r], tails[r], codec, aliased, rank=r)
    enc = [dict() for _ in range(n)]  # (buf, off) -> encoded payload
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
                    elif coded[r] and op["len"]:
                        payload = enc[r][(op["src_buf"], op["src_off"])]
                        assert _nbytes(payload, codec) == op["len"], \
                            f"rank {r} op {i}: sends {op['len']} bytes of an encoding of another size"
                    else:
                        payload = b[op["src_buf"]][el(op["src_off"], op["len"])].copy()
                    channels.setdefault((r, op["peer"], op["stripe"]), []).append((op["tag"], payload))
                elif k in (RECV, RECV_REDUCE):
                    ch = channels.get((op["peer"], r, op["stripe"]))
                    if not ch:
                        continue
                    tag, payload = ch.pop(0)
                    assert tag == op["tag"], f"rank {r} op {i}: tag {tag:#x} != expected {op['tag']:#x}"
                    if coded[r] and op["len"]:
                        assert k == RECV and op["dst_buf"] == SCRATCH, "compressed plans receive into scratch"
                        assert _nbytes(payload, codec) == op["len"], f"rank {r} op {i}: length mismatch"
                        enc[r][(op["dst_buf"], op["dst_off"])] = payload
                    else:
                        assert len(payload) * itemsize == op["len"], f"rank {r} op {i}: length mismatch"
                    if coded[r] and op["len"]:
                        pass  # stored above
                    elif op["dst_buf"] < 0:
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
                elif k == ENCODE:
                    values = b[op["src_buf"]][el(op["src_off"], op["len"])]
                    enc[r][(op["dst_buf"], op["dst_off"])] = codec.encode(values.copy(), (r, i))
                elif k == DECODE:
                    payload = enc[r][(op["src_buf"], op["src_off"])]
                    b[op["dst_buf"]][el(op["dst_off"], op["len"])] = codec.decode(payload, op["len"] // itemsize)
                elif k == DECODE_REDUCE:
                    payload = enc[r][(op["aux_buf"], op["aux_off"])]
                    local = b[op["src_buf"]][el(op["src_off"], op["len"])]
                    b[op["dst_buf"]][el(op["dst_off"], op["len"])] = reduce_fn(local, codec.decode(payload, op["len"] // itemsize))
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


def _nbytes(payload, codec):
    """Bytes an encoded payload occupies (a symbolic frame, or real bytes)."""
    if hasattr(payload, "values"):
        return codec.nbytes(len(payload.values))
    return len(payload)


# ---- races ------------------------------------------------------------------
def _accesses(op, codec, itemsize):
    """(space, lo, hi, writes) byte ranges an op touches; IN and OUT are
    spaces 0 and 1, scratch 2."""
    k, length = op["kind"], op["len"]
    if not length:
        return []
    enc_len = codec.nbytes(length // 4) if codec is not None and k in (ENCODE, DECODE, DECODE_REDUCE) else length
    out = []

    def add(buf, off, ln, w):
        if buf is not None and buf >= 0:
            out.append((buf, off, off + ln, w))
    if k == SEND:
        add(op["src_buf"], op["src_off"], length, False)
    elif k == RECV:
        add(op["dst_buf"], op["dst_off"], length, True)
    elif k in (RECV_REDUCE, COPY):
        add(op["src_buf"], op["src_off"], length, False)
        add(op["dst_buf"], op["dst_off"], length, True)
    elif k in (REDUCE, SCALE):
        if k == REDUCE:
            add(op["src_buf"], op["src_off"], length, False)
        add(op["dst_buf"], op["dst_off"], length, False)
        add(op["dst_buf"], op["dst_off"], length, True)
    elif k == ENCODE:
        add(op["src_buf"], op["src_off"], length, False)
        add(op["dst_buf"], op["dst_off"], enc_len, True)
    elif k == DECODE:
        add(op["src_buf"], op["src_off"], enc_len, False)
        add(op["dst_buf"], op["dst_off"], length, True)
    elif k == DECODE_REDUCE:
        add(op["src_buf"], op["src_off"], length, False)
        add(op["aux_buf"], op["aux_off"], enc_len, False)
        add(op["dst_buf"], op["dst_off"], length, True)
    return out


def check_plan_races(ops, tail_first, codec=None, aliased=False, rank=None, itemsize=4):
    """Assert that every two ops touching overlapping bytes, one of them
    writing, are ordered (deps, FIFO order per connection and direction, the
    tail). The engine runs everything else concurrently."""
    anc = [0] * len(ops)
    last_on = {}
    pre_tail = 0
    for i, op in enumerate(ops):
        preds = list(op["deps"])
        if op["kind"] in (SEND, RECV, RECV_REDUCE):
            key = (op["peer"], op["stripe"], op["kind"] == SEND)
            if key in last_on:
                preds.append(last_on[key])
            last_on[key] = i
        a = 0
        for p in preds:
            a |= anc[p] | (1 << p)
        if i >= tail_first:
            a |= pre_tail
        anc[i] = a
        if i < tail_first:
            pre_tail |= 1 << i
    spaces = {}
    for i, op in enumerate(ops):
        for buf, lo, hi, w in _accesses(op, codec, itemsize):
            space = 1 if (aliased and buf == 0) else buf
            spaces.setdefault(space, []).append((lo, hi, i, w))
    for space, items in spaces.items():
        items.sort()
        active = []
        for lo, hi, i, w in items:
            active = [x for x in active if x[1] > lo]
            for alo, ahi, j, aw in active:
                if (w or aw) and i != j and not ((anc[i] >> j) & 1 or (anc[j] >> i) & 1):
                    raise AssertionError(f"rank {rank}: ops {j} and {i} race on buffer {space} "
                                         f"[{max(lo, alo)}, {min(hi, ahi)}): {ops[j]} / {ops[i]}")
            active.append((lo, hi, i, w))


# ---- symbolic expressions -------------------------------------------------
def leaves(expr):
    """Flatten an expression into its (rank, index) leaves, in order."""
    if expr[0] == "op":
        return leaves(expr[1]) + leaves(expr[2])
    if expr[0] == "scale":
        return leaves(expr[1])
    if expr[0] == "q":  # a decoded value: what was encoded
        return leaves(expr[3])
    return [expr]


def quantised(expr):
    """Number of encodings along the path to this value (max over leaves)."""
    if expr[0] == "op":
        return max(quantised(expr[1]), quantised(expr[2]))
    if expr[0] == "scale":
        return quantised(expr[1])
    if expr[0] == "q":
        return 1 + quantised(expr[3])
    return 0


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
