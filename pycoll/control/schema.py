"""Shape checks for coordinator requests, run before any handler sees one.

A request is a msgpack map. Each field a handler reads has a type and bounds
here; a request that breaks one is dropped whole, so a handler never starts
changing state on input it would fail on halfway. Fields not listed pass
through untouched (new request kinds need no change here to work).
"""

_U63 = (1 << 63) - 1


def _int(lo, hi, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"an integer in [{lo}, {hi}]" + (" or nil" if optional else "")
        return None
    return check


def _str(lo, hi, printable=True):
    """A string of lo..hi characters; printable ones only unless told (names
    end up in log lines: no forged lines through a newline in a name)."""
    def check(v):
        if not isinstance(v, str) or not lo <= len(v) <= hi or (printable and not v.isprintable()):
            return f"a string of {lo}..{hi}{' printable' if printable else ''} characters"
        return None
    return check


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _addr(v):
    if (not isinstance(v, (list, tuple)) or len(v) != 2 or not isinstance(v[0], str) or not 1 <= len(v[0]) <= 255
            or isinstance(v[1], bool) or not isinstance(v[1], int) or not 1 <= v[1] <= 65535):
        return "[host, port] with a host name of at most 255 characters and a port in 1..65535"
    return None


def _info(v):
    return None if v is None or isinstance(v, dict) else "a map or nil"


def _float(lo, hi):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            return f"a number in [{lo}, {hi}]"
        return None
    return check


def _tensors(v):
    """Shared-state reports: [[name, [dtype, dims..., nbytes], hash], ...]."""
    if not isinstance(v, list) or len(v) > 100000:
        return "a list of at most 100000 [name, key, hash] entries"
    for t in v:
        if (not isinstance(t, list) or len(t) != 3 or not isinstance(t[0], str) or not 1 <= len(t[0]) <= 1024
                or not isinstance(t[1], list) or not 2 <= len(t[1]) <= 34 or not isinstance(t[1][0], str)
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in t[1][1:])
                or isinstance(t[2], bool) or not isinstance(t[2], int) or not 0 <= t[2] < 1 << 64):
            return "a list of [name, [dtype, dims..., nbytes], 64-bit hash] entries"
    return None


def _resume(v):
    """What a peer remembers of its group when it re-registers."""
    if (not isinstance(v, dict) or isinstance(v.get("epoch"), bool) or not isinstance(v.get("epoch"), int)
            or not 0 <= v["epoch"] <= _U63 or not isinstance(v.get("members"), list) or len(v["members"]) > 1 << 16
            or not all(isinstance(n, str) and 1 <= len(n) <= 128 for n in v["members"])
            or not (v.get("rank") is None or (isinstance(v["rank"], int) and not isinstance(v["rank"], bool)))
            or not (v.get("dead") is None or (isinstance(v["dead"], list) and len(v["dead"]) <= 1 << 16
                                              and all(isinstance(n, str) and 1 <= len(n) <= 128 for n in v["dead"])))
            or not (v.get("seen") is None or (isinstance(v["seen"], int) and not isinstance(v["seen"], bool)
                                              and 0 <= v["seen"] <= _U63))):
        return "a map with epoch, members (names), rank, dead (names) and seen (an epoch)"
    return None


def _names(v):
    """Member names (a failure report's unreachable peers)."""
    if (not isinstance(v, list) or len(v) > 1 << 16
            or not all(isinstance(n, str) and 1 <= len(n) <= 128 for n in v)):
        return "a list of member names"
    return None


def fields(max_peers):
    """Field name -> check (returns None when fine, else what was expected)."""
    return {
        "t": _str(1, 32),
        "rid": _int(0, _U63),
        "name": _str(1, 128),
        "cred": _str(0, 64),
        "epoch": _int(0, _U63),
        "proto": _int(0, 1 << 16),
        "addr": _addr,
        "host_id": _str(0, 256),
        "rank": _int(0, max_peers - 1, optional=True),
        "world_size": _int(1, max_peers, optional=True),
        "info": _info,
        "rebuild": _bool,
        "why": _str(0, 4096, printable=False),
        # elastic groups, agreement rounds, shared state (pycoll.control.coordinator)
        "admit": _bool,
        "heartbeat_timeout": _float(0.01, 86400.0),
        "seq": _int(0, _U63),
        "status": _int(-1, 1 << 16),
        "withdraw": _bool,
        "kind": _str(1, 32),
        "ok": _bool,
        "digest": _int(0, (1 << 64) - 1),
        "call": _int(0, (1 << 32) - 1),
        "callno": _int(0, _U63),
        "revision": _int(-(1 << 62), _U63),
        "tensors": _tensors,
        "resume": _resume,
        "job": _str(1, 128),  # the job id (PYCOLL_JOB_ID / TORCHELASTIC_RUN_ID) of a joiner
        "unreachable": _names,  # members a failure report found unreachable over the data network
    }


# Fields a request kind cannot do without (checked here so that a handler
# never fails on a missing field after it began to change state).
REQUIRED = {"join": ("name", "addr"), "round": ("epoch", "seq", "kind")}


def check_request(msg, checks):
    """Raise ValueError saying what is wrong with ``msg``, if anything."""
    if not isinstance(msg, dict):
        raise ValueError(f"a request must be a map, got {type(msg).__name__}")
    if "t" not in msg:
        raise ValueError("a request needs a 't' (kind) field")
    for key in REQUIRED.get(msg["t"], ()) if isinstance(msg["t"], str) else ():
        if key not in msg:
            raise ValueError(f"a {msg['t']!r} request needs a {key!r} field")
    for key, value in msg.items():
        check = checks.get(key)
        if check is None:
            continue
        want = check(value)
        if want is not None:
            raise ValueError(f"field {key!r} must be {want}")
