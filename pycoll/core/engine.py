"""The engine boundary: the one module that calls the C communicator (``lib.pc_comm_*``).

A C communicator (``pc_comm``) owns one epoch's connections and runs plans on them with the
GIL released. Everything above (the communicator, agreed calls, shared state, the switches and
the standalone aggregator) creates, runs, cancels and frees it through the functions here, and
turns a failed run into an exception with :func:`error` only, so that which exception a C
status becomes is decided in one place (the table in :mod:`pycoll.core.native`).

The per-call functions (:data:`run`, :data:`clear_cancel`, :data:`cancel`) are the C functions
themselves, not wrappers: the fast path binds them once and pays nothing for the boundary.
``tests/unit/test_architecture.py`` checks that no other module names ``pc_comm_``.
"""
from pycoll.core.native import ffi, lib, status_error

OK = lib.PC_OK

# ---- per call: the C functions themselves (no Python frame in between) ------------------------
#: run(comm, plan, bufs, sizes, dtype, op, seq, desc, timeout, failed) -> status: a whole plan
run = lib.pc_comm_run
#: clear_cancel(comm): re-arm a comm before a run (a cancel before it still counts, see Epoch.launch)
clear_cancel = lib.pc_comm_clear_cancel
#: cancel(comm): thread-safe; the running (or next) run returns PC_ERR_CANCELLED promptly
cancel = lib.pc_comm_cancel


def run_body(comm, plan, bufs, sizes, dtype, op, seq, desc, timeout, failed):
    """Every transfer of ``plan``; results stay in the comm's scratch (an agreed call, see
    :mod:`pycoll.comm.agreement`). Returns the status."""
    return lib.pc_comm_run_part(comm, plan, lib.PC_RUN_BODY, bufs, sizes, dtype, op, seq, desc, timeout, failed)


def run_buffers(comm, plan, nbufs, bufs, sizes, seq, desc, timeout, seed, digests, threads, failed):
    """A buffer plan (``pc_plan_create_buffers``) over ``nbufs`` caller buffers, received bytes
    straight into them; with ``digests`` (else ``ffi.NULL``) hashed as they land (pycoll.h,
    ``pc_comm_run_buffers``). Returns the status."""
    return lib.pc_comm_run_buffers(comm, plan, nbufs, bufs, sizes, seq, desc, timeout, seed, digests, threads, failed)


def run_remapped(comm, plan, nbufs, bufs, sizes, dtype, op, seq, desc, timeout, failed):
    """A plan from ``pc_plan_remap`` (pycoll.plan.remap) over the caller's ``nbufs`` buffers
    (``bufs``: their addresses, ``sizes``: their bytes). Returns the status."""
    return lib.pc_comm_run_remapped(comm, plan, nbufs, bufs, sizes, dtype, op, seq, desc, timeout, failed)


def run_tail(comm, plan, bufs, sizes, dtype, op, seq, desc, timeout, failed):
    """The local copies of ``plan`` out of scratch, after :func:`run_body` (not cancellable)."""
    return lib.pc_comm_run_part(comm, plan, lib.PC_RUN_TAIL, bufs, sizes, dtype, op, seq, desc, timeout, failed)


# ---- lifetime ----------------------------------------------------------------------------------
def create(rank, nranks, stripes, links, spin_us=None, single_copy=None, stall_timeout=None, psk=None,
           handshake_timeout=10.0, single_copy_adapt=None):
    """A C communicator over ``links`` (:class:`pycoll.net.mesh.Links`: a kind and fds per
    connection; the comm owns them from here on, also when this fails) with its settings
    (None: the C default). ``psk``: the key of the PC_CONN_TLS connections (their TLS 1.3
    handshakes finish here, each within ``handshake_timeout`` s). Raises the status's exception."""
    out = ffi.new("pc_comm **")
    failed = ffi.new("int32_t *", -1)
    key = psk or b""
    st = lib.pc_comm_create_keyed(rank, nranks, stripes, links.kinds, links.fds, links.shm_fds, 0, key, len(key),
                                  float(handshake_timeout), failed, out)
    if st != OK:
        if failed[0] >= 0 and lib.PC_CONN_TLS in links.kinds:
            why = {lib.PC_ERR_PROTO: "the peer does not hold the group key (another PYCOLL_SECRET) or does not "
                                     "encrypt (PYCOLL_ENCRYPT differs)",
                   lib.PC_ERR_TIMEOUT: f"no answer within {handshake_timeout:g} s",
                   lib.PC_ERR_PEER: "the peer closed the connection"}.get(st, "")
            raise error(None, st, None, peer=failed[0],
                        message=f"rank {rank}: the encrypted connection (TLS 1.3) to rank {failed[0]} failed its "
                                f"handshake: {why}")
        raise error(None, st, "cannot create the C communicator")
    comm = out[0]
    if spin_us is not None:
        lib.pc_comm_set_spin(comm, spin_us)
    if single_copy is not None:
        lib.pc_comm_set_single_copy(comm, single_copy)
    if single_copy_adapt is not None:
        lib.pc_comm_set_single_copy_adapt(comm, bool(single_copy_adapt))
    if stall_timeout is not None:
        lib.pc_comm_set_stall_timeout(comm, float(stall_timeout))
    return comm


def create_tcp(rank, nranks, stripes, fds):
    """A C communicator over TCP sockets only (``fds[peer * stripes + s]``, -1 for ourselves;
    owned by the comm from here on)."""
    out = ffi.new("pc_comm **")
    st = lib.pc_comm_create(rank, nranks, stripes, fds, 0, out)
    if st != OK:
        raise error(None, st, "cannot create the C communicator")
    return out[0]


def shutdown(comm):
    """Close every connection of ``comm`` (peers blocked on us fail at once); None: nothing."""
    if comm is not None:
        lib.pc_comm_shutdown(comm)


def close(comm):
    """Shut ``comm`` down and free it; None: nothing."""
    if comm is not None:
        lib.pc_comm_shutdown(comm)
        lib.pc_comm_free(comm)


# ---- failures ----------------------------------------------------------------------------------
def last_error(comm):
    """The text of ``comm``'s last failure ('' for no comm)."""
    return ffi.string(lib.pc_comm_last_error(comm)).decode(errors="replace") if comm is not None else ""


def error(comm, status, what, peer=None, message=None):
    """The exception for C status ``status`` of a call on ``comm``: its class from the status
    (see :func:`pycoll.core.native.status_error`), its text ``what: <comm's last error>``.
    ``message`` replaces the comm's last error (e.g. with the coordinator's word added);
    with neither, the text names the status."""
    if message is None:
        message = last_error(comm)
    if not message:
        message = f"status {status}"
    return status_error(status, f"{what}: {message}" if what else message, peer)


# ---- measurement -------------------------------------------------------------------------------
def bytes_sent(comm):
    """Bytes ``comm``'s connections carried out of this peer (0 for no comm)."""
    return lib.pc_comm_bytes_sent(comm) if comm is not None else 0


def probe_single_copy(comm):
    """Decide now, on every same-host connection, whether the peer may be read directly
    (single copy); otherwise that happens at each connection's first receive."""
    lib.pc_comm_probe_single_copy(comm)


def single_copy_refused(comm, peer):
    """The errno with which the kernel refused ``comm``'s reads of same-host ``peer``'s memory
    (0: allowed, not a shared-memory peer, or not known yet)."""
    return int(lib.pc_comm_single_copy_refused(comm, peer)) if comm is not None else 0


def single_copy_runs(comm):
    """(runs sent single-copy, runs sent through the rings) among ``comm``'s runs big enough for
    single copy with same-host peers that allow it ((0, 0) for no comm)."""
    if comm is None:
        return 0, 0
    single, rings = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.pc_comm_single_copy_runs(comm, single, rings)
    return int(single[0]), int(rings[0])


def bytes_single_copy(comm):
    """Bytes ``comm`` copied straight out of same-host peers' memory (0 for no comm)."""
    return lib.pc_comm_bytes_single_copy(comm) if comm is not None else 0


def bytes_from_windows(comm):
    """Of those, bytes copied out of peers' result windows (0 for no comm)."""
    return lib.pc_comm_bytes_from_windows(comm) if comm is not None else 0


def bytes_from_shared(comm):
    """Of those, bytes read out of our mappings of peers' shared buffers (0 for no comm)."""
    return lib.pc_comm_bytes_from_shared(comm) if comm is not None else 0


def shared_buffers_stats():
    """This process's shared buffers: {"moved", "dropped", "live"} (see pycoll.h)."""
    moved, dropped, live = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int32_t *")
    lib.pc_shared_buffers_stats(moved, dropped, live)
    return {"moved": int(moved[0]), "dropped": int(dropped[0]), "live": int(live[0])}


def wait_stats(comm):
    """(seconds ``comm`` spun in its waits, waits that slept in the kernel); (0.0, 0) for no comm."""
    if comm is None:
        return 0.0, 0
    spun, sleeps = ffi.new("double *"), ffi.new("uint64_t *")
    lib.pc_comm_wait_stats(comm, spun, sleeps)
    return float(spun[0]), int(sleeps[0])


def stream_ring(comm, nbytes, timeout):
    """Stream ``nbytes`` to the right-hand neighbour while receiving as many from the left;
    returns (status, seconds)."""
    secs = ffi.new("double *")
    st = lib.pc_comm_stream_ring(comm, nbytes, timeout, secs)
    return st, secs[0]


def probe(comm, seq, tag, timeout):
    """Receive from any source: wait (at most ``timeout`` s) until some other rank's first
    connection starts with a frame of ``seq`` and ``tag`` for us (or closed); returns
    (status, that rank)."""
    peer = ffi.new("int32_t *")
    st = lib.pc_comm_probe(comm, seq, tag, float(timeout or 0), peer)
    return st, int(peer[0])


def peak_running(reset=False):
    """The most plans seen running at once in this process (any comms) since the last reset;
    ``reset``: return it and start again from the plans running now."""
    return lib.pc_engine_peak_running(1 if reset else 0)
