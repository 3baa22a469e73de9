"""Fuzz tests in the normal suite (hypothesis): the C frame check, the
engine's receive path, and the coordinator's message handling. Each must
refuse what it cannot use, with a status or a log line, never a crash, and
never leave its state inconsistent. The long-running fuzzers live in
tests/fuzz/ (README there)."""
import struct
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import wire_helpers as wh
from pycoll import auth
from pycoll.core.native import ffi, lib
from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator, pack

def fuzz(n):
    """Settings for a fuzz test of n examples (deterministic, so CI is repeatable)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)

# ---- pc_frame_check ---------------------------------------------------------
u16, u32, u64 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


def frame_check(hdr, tag, desc, seq, length, why_len=256):
    why = ffi.new("char[]", why_len + 16)
    ffi.memmove(why, b"\x7f" * (why_len + 16), why_len + 16)
    st_ = lib.pc_frame_check(hdr, tag, desc, seq, length, why, why_len)
    raw = ffi.buffer(why, why_len + 16)[:]
    return st_, raw


@fuzz(1500)
@given(fields=st.tuples(u32, u16, u16, u32, u32, u64, u64), expect=st.tuples(u32, u32, u64, u64),
       same=st.lists(st.booleans(), min_size=4, max_size=4), why_len=st.integers(0, 300))
def test_frame_check_accepts_exactly_the_expected_header(fields, expect, same, why_len):
    magic, version, kind, tag, desc, seq, length = fields
    # half the time make some fields right, so both verdicts are reached often
    if same[0]:
        magic, version, kind = wh.MAGIC, lib.PC_VERSION, 1
    e_tag, e_desc, e_seq, e_len = [f if s else e for f, e, s in zip((tag, desc, seq, length), expect, same)]
    hdr = wh.HDR.pack(magic, version, kind, tag, desc, seq, length)
    status, why = frame_check(hdr, e_tag, e_desc, e_seq, e_len, why_len)
    ok = (magic, version, kind, tag, desc, seq, length) == (wh.MAGIC, lib.PC_VERSION, 1, e_tag, e_desc, e_seq, e_len)
    assert status == (lib.PC_OK if ok else lib.PC_ERR_PROTO)
    assert why[why_len:] == b"\x7f" * 16, "wrote past why_len"
    if not ok and why_len:
        assert b"\0" in why[:why_len], "reason not terminated"
        if why_len > 40:
            text = why[:why.index(b"\0")].decode()
            assert any(w in text for w in ("magic", "version", "kind", "collective", "digest", "length", "tag"))


@fuzz(600)
@given(pos=st.integers(0, 31), val=st.integers(0, 255), tag=u32, length=st.integers(0, 2**40))
def test_any_single_byte_change_of_a_valid_header_is_refused(pos, val, tag, length):
    good = bytearray(wh.header(tag, length))
    assert frame_check(bytes(good), tag, wh.DESC, wh.SEQ, length)[0] == lib.PC_OK
    if good[pos] == val:
        val ^= 0xFF
    good[pos] = val
    assert frame_check(bytes(good), tag, wh.DESC, wh.SEQ, length)[0] == lib.PC_ERR_PROTO


# ---- the engine's receive path ------------------------------------------------
@st.composite
def hostile_streams(draw):
    coll = draw(st.sampled_from(wh.COLLS))
    count = draw(st.sampled_from(wh.COUNTS[1:]))
    segment = draw(st.sampled_from(wh.SEGMENTS))
    stream = bytearray(wh.valid_stream(coll, count, segment))
    how = draw(st.sampled_from(["random", "flip", "field", "truncate", "extend", "oversize"]))
    if not stream:  # rank 0 receives nothing in this collective: any stream goes unread
        how = "random"
    if how == "random":
        stream = bytearray(draw(st.binary(max_size=600)))
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(stream) - 1))
            stream[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "field":  # one header field of one frame
        at = draw(st.sampled_from(wh.frame_offsets(stream)))
        off, width = draw(st.sampled_from([(0, 4), (4, 2), (6, 2), (8, 4), (12, 4), (16, 8), (24, 8)]))
        stream[at + off:at + off + width] = draw(st.integers(0, 2**(8 * width) - 1)).to_bytes(width, "little")
    elif how == "truncate":
        stream = stream[:draw(st.integers(0, len(stream) - 1))]
    elif how == "extend":  # a valid stream, then a second copy of a header
        stream += stream[:32]
    else:  # a header that announces an enormous payload
        at = draw(st.sampled_from(wh.frame_offsets(stream)))
        stream = stream[:at + 32]
        stream[at + 24:at + 32] = draw(st.sampled_from([2**63, 2**64 - 1, 1 << 40, 0xFFFFFFFF])).to_bytes(8, "little")
    return coll, count, segment, bytes(stream), how


@pytest.mark.timeout(120)
@fuzz(400)
@given(case=hostile_streams())
def test_engine_survives_any_stream(case):
    coll, count, segment, stream, how = case
    t0 = time.monotonic()
    status, failed, err, intact = wh.feed_rank0(coll, count, segment, stream)
    assert time.monotonic() - t0 < 4, "a closed stream must end the run at once, not at the deadline"
    assert status in (lib.PC_OK, lib.PC_ERR_PROTO, lib.PC_ERR_PEER), (status, err)
    if how in ("truncate", "oversize"):
        assert status != lib.PC_OK
    if how == "extend":
        assert status == lib.PC_OK  # extra bytes after the plan's frames are never read
    if status != lib.PC_OK:
        assert failed == 1, err
        assert "rank 1" in err
        if coll in ("all_reduce", "broadcast"):
            assert intact, "a refused stream changed the caller's buffer"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coll", wh.COLLS)
def test_valid_streams_pass(coll):
    for count in wh.COUNTS[1:]:
        for segment in wh.SEGMENTS:
            status, _, err, _ = wh.feed_rank0(coll, count, segment, wh.valid_stream(coll, count, segment))
            assert status == lib.PC_OK, (count, segment, err)


# ---- coordinator message handling -------------------------------------------------
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), c, max_size=4),
    max_leaves=12)
KINDS = ["join", "sync", "hb", "leave", "status", "fail", "nope", ""]
plausible = {
    "name": st.sampled_from(["a", "b", "victim", ""]) | junk,
    "rid": st.integers(0, 10) | junk,
    "epoch": st.integers(0, 3) | junk,
    "proto": st.just(PROTOCOL) | junk,
    "addr": st.tuples(st.sampled_from(["127.0.0.1", "x" * 300]), st.integers(-1, 70000)).map(list) | junk,
    "rank": st.none() | st.integers(-2, 5) | junk,
    "world_size": st.none() | st.integers(-1, 5000) | junk,
    "host_id": st.text(max_size=5) | junk,
    "info": st.none() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2) | junk,
    "rebuild": st.booleans() | junk,
    "why": st.text(max_size=10) | junk,
    "cred": st.text(max_size=10) | junk,
}
requests = st.fixed_dictionaries({"t": st.sampled_from(KINDS) | junk}, optional=plausible)


def _assert_consistent(c):
    """Invariants of the coordinator's state after any input."""
    for name, m in c.members.items():
        assert isinstance(name, str) and m.name == name and 1 <= len(name) <= 128
        assert isinstance(m.addr, list) and len(m.addr) == 2 and isinstance(m.addr[0], str)
        assert isinstance(m.addr[1], int) and 1 <= m.addr[1] <= 65535
        assert m.rank_hint is None or (isinstance(m.rank_hint, int) and 0 <= m.rank_hint < c.limits.max_peers)
        assert isinstance(m.host_id, str) and isinstance(m.info, dict)
    assert all(n in c.members for n in c.epoch_members)
    assert c.world_size is None or (isinstance(c.world_size, int) and 1 <= c.world_size <= c.limits.max_peers)


@pytest.fixture(scope="module")
def fuzz_coordinator():
    c = Coordinator("127.0.0.1", 0, secret=b"fuzz-secret", heartbeat_timeout=0.1)
    yield c
    c._sock.disable_monitor()  # never served: close what serve() would have
    c._monitor.close(0)
    c._sock.close(0)


@pytest.mark.timeout(120)
@fuzz(500)
@given(msg=requests | junk, signed=st.booleans(), raw=st.binary(max_size=64))
def test_coordinator_handles_any_message(fuzz_coordinator, msg, signed, raw):
    c = fuzz_coordinator
    try:
        payload = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        payload = raw
    data = auth.Sealer(auth.derive(b"fuzz-secret", "to-coordinator")).seal(payload) if signed else payload
    before = c.epoch
    c.handle(b"fuzz-ident", data)  # must not raise
    _assert_consistent(c)
    if not signed:
        assert c.epoch == before
    c._check_liveness()  # joined junk expires (no heartbeats) rather than piling up
    assert len(c.members) <= c.limits.max_peers


@pytest.mark.timeout(60)
def test_coordinator_works_after_garbage():
    """Garbage through the real socket, signed and not; then real clients
    join, form an epoch and keep working."""
    import zmq
    secret = b"after-garbage"
    c = Coordinator("127.0.0.1", 0, secret=secret, min_world_size=2).start()
    clients = []
    try:
        ctx = zmq.Context.instance()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 2000)  # deliver everything before close
        d.connect(f"tcp://127.0.0.1:{c.port}")
        sealer = auth.Sealer(auth.derive(secret, "to-coordinator"))
        rng = np.random.default_rng(5)
        for i in range(300):
            blob = rng.bytes(int(rng.integers(0, 200)))
            d.send(blob if i % 2 else sealer.seal(blob))
        d.send_multipart([b"two", b"frames"])
        d.send(sealer.seal(pack({"t": "join"})))                 # missing fields
        d.send(sealer.seal(pack({"t": "join", "proto": PROTOCOL, "name": "n", "addr": "abc"})))
        d.send(sealer.seal(pack([1, 2, 3])))
        d.close()
        for _ in range(2):
            cl = CoordinatorClient("127.0.0.1", c.port, secret=secret)
            clients.append(cl)
            cl.request({"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", 1000 + len(clients)]}, timeout=5)
            cl.start_heartbeats()
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(2) as ex:
            replies = list(ex.map(lambda cl: cl.request({"t": "sync", "epoch": 0, "rebuild": True}, timeout=10),
                                  clients))
        assert [r["epoch"] for r in replies] == [1, 1]
        assert sorted(r["rank"] for r in replies) == [0, 1]
        assert len(replies[0]["members"]) == 2, "garbage must not have become a member"
        deadline = time.monotonic() + 5
        while c.refusals.count < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.refusals.count >= 300  # every garbage message was refused (and logged, rate-limited)
    finally:
        for cl in clients:
            cl.close()
        c.stop()
