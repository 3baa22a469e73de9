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
    }


# Fields a request kind cannot do without (checked here so that a handler
# never fails on a missing field after it began to change state).
REQUIRED = {"join": ("name", "addr")}


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
