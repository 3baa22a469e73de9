"""Building an epoch's mesh when a member is already gone fails at once, not at the mesh timeout.

Every peer listens from its join to its close, so a listener that refuses is a process that is
gone. Before, a peer dialling a dead lower rank retried refused connections, and a peer waiting
for a dead higher rank to dial it waited, both until the mesh timeout (30 s by default; a chaos
run lost 30 s when the coordinator's host died just after its last epoch was announced)."""
import os
import threading
import time

import pytest

from pycoll.errors import PeerFailure
from pycoll.net.mesh import Listener, build_mesh, reserve_port


def _gone_addr():
    """An address where nothing listens any more (bound, never listening: refused)."""
    sock = reserve_port("127.0.0.1")
    return sock, ("127.0.0.1", sock.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gone_rank", [0, 2])  # the one we dial / the one that should dial us
def test_a_gone_member_fails_the_mesh_within_a_second(gone_rank):
    listeners = {r: Listener() for r in range(3) if r != gone_rank}
    held, gone = _gone_addr()
    addrs = [listeners[r].addr if r in listeners else gone for r in range(3)]
    results = {}

    def member(r):
        t0 = time.monotonic()
        try:
            fds = build_mesh(listeners[r], r, addrs, 1, 7, "tok", 30.0)
            results[r] = ("built", time.monotonic() - t0)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        except PeerFailure as exc:
            results[r] = (str(exc), time.monotonic() - t0)

    threads = [threading.Thread(target=member, args=(r,)) for r in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    held.close()
    for lst in listeners.values():
        lst.close()
    assert set(results) == set(listeners), results
    for r, (what, seconds) in results.items():  # every live member fails, naming the gone one, at once
        assert what != "built" and f"rank {gone_rank}" in what and seconds < 3.0, results
