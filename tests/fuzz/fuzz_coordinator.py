"""Coverage-guided fuzzing of the coordinator's message handling (atheris).

    pip install atheris
    PYTHONPATH=$PWD python tests/fuzz/fuzz_coordinator.py -max_total_time=300

Without atheris it runs the same target on seeded random inputs:

    PYTHONPATH=$PWD python tests/fuzz/fuzz_coordinator.py --random 200000 [seed]

Each input becomes one message for ``Coordinator.handle``: signed with the
group's key (an insider's garbage: reaches the shape checks and handlers)
or not (an outsider's: must be refused before parsing). Requests are built
from the fields handlers read, with values of every type. After each input
``handle`` must not have raised and the coordinator's state must be sound.
"""
import random
import sys
import time

try:
    import atheris
except ImportError:  # the random driver below still works
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["pycoll"]):
        import msgpack
        from pycoll import auth
        from pycoll.control.coordinator import PROTOCOL, Coordinator
else:
    import msgpack
    from pycoll import auth
    from pycoll.control.coordinator import PROTOCOL, Coordinator

SECRET = b"fuzz"
FIELDS = ["t", "rid", "name", "cred", "epoch", "proto", "addr", "host_id", "rank", "world_size", "info",
          "rebuild", "why"]
KINDS = ["join", "sync", "hb", "leave", "status", "fail"]

coord = Coordinator("127.0.0.1", 0, secret=SECRET, heartbeat_timeout=0.05)
sealer = auth.Sealer(auth.derive(SECRET, "to-coordinator"))
stats = {"inputs": 0, "signed": 0}


class RandomData:
    """The bits of atheris.FuzzedDataProvider this target uses, from a PRNG."""

    def __init__(self, rng):
        self.r = rng

    def ConsumeIntInRange(self, lo, hi):
        return self.r.randint(lo, hi)

    def ConsumeBool(self):
        return self.r.random() < 0.5

    def ConsumeUnicodeNoSurrogates(self, n):
        return "".join(chr(self.r.randint(32, 0x2FF)) for _ in range(self.r.randint(0, n)))

    def ConsumeBytes(self, n):
        return bytes(self.r.getrandbits(8) for _ in range(self.r.randint(0, n)))

    def ConsumeFloat(self):
        return self.r.choice([0.0, -1.5, float("inf"), float("nan"), 1e308])


def value(fdp, depth=0):
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-3, 70000)
    if kind == 3:
        return fdp.ConsumeIntInRange(-(1 << 63), (1 << 64) - 1)
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    if kind == 5:
        return fdp.ConsumeBytes(16)
    if kind == 6:
        return fdp.ConsumeFloat()
    if kind == 7:
        return ["127.0.0.1", fdp.ConsumeIntInRange(-1, 70000)]
    if kind == 8:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {str(value(fdp, depth + 1)): value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def message(fdp):
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return fdp.ConsumeBytes(200)  # not even msgpack
    msg = {}
    if fdp.ConsumeBool():
        msg["t"] = KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)]
        if msg["t"] == "join" and fdp.ConsumeBool():
            msg.update(proto=PROTOCOL, addr=["127.0.0.1", fdp.ConsumeIntInRange(1, 65535)])
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
        msg[key] = value(fdp)
    if fdp.ConsumeBool():  # aim at a real member
        names = list(coord.members)
        if names:
            m = coord.members[names[fdp.ConsumeIntInRange(0, len(names) - 1)]]
            msg["name"] = m.name
            if fdp.ConsumeBool():
                msg["cred"] = m.cred
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return fdp.ConsumeBytes(64)


def check_state():
    for name, m in coord.members.items():
        assert isinstance(name, str) and 1 <= len(name) <= 128, name
        assert isinstance(m.addr, list) and len(m.addr) == 2 and isinstance(m.addr[0], str)
        assert isinstance(m.addr[1], int) and 1 <= m.addr[1] <= 65535
        assert m.rank_hint is None or 0 <= m.rank_hint < coord.limits.max_peers
        assert isinstance(m.info, dict) and isinstance(m.host_id, str)
    assert all(n in coord.members for n in coord.epoch_members)
    assert coord.world_size is None or 1 <= coord.world_size <= coord.limits.max_peers
    assert len(coord.members) <= coord.limits.max_peers


def one_input(data):
    fdp = atheris.FuzzedDataProvider(data) if atheris is not None and isinstance(data, bytes) else data
    payload = message(fdp)
    signed = fdp.ConsumeBool()
    stats["inputs"] += 1
    stats["signed"] += signed
    coord.handle(b"fuzz", sealer.seal(payload) if signed else payload)  # must not raise
    if stats["inputs"] % 64 == 0:
        coord._check_liveness()  # members that never heartbeat expire
        if coord.world_size is not None and coord.epoch == 0 and stats["inputs"] % 4096 == 0:
            coord.world_size = None  # let later inputs reach epoch formation again
    check_state()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--random":
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
        rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
        t0 = time.monotonic()
        for _ in range(n):
            one_input(RandomData(rng))
        print(f"fuzz_coordinator: {stats['inputs']} inputs ({stats['signed']} signed) in "
              f"{time.monotonic() - t0:.1f} s, epochs formed {coord.epoch}, refusals {coord.refusals.count}; "
              "no crash, state sound")
        return
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris, or run with --random N")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
