"""Joining a coordinator: the one bootstrap path of ``pycoll.init``/``pycoll.connect``
(:mod:`pycoll.group`) and of the standalone aggregator (:mod:`pycoll.aggregator`).

:func:`join` checks the coordinator's endpoint, loads the secret and the limits, opens this
process's data listener and its coordinator client (rank 0 of ``init`` also hosts the
coordinator when none listens yet), sends the join until the coordinator takes it (waiting,
with a WARNING line every few seconds, while none answers or one is shutting down), starts the
heartbeats and returns a :class:`Joined`. What comes next is the caller's: a
:class:`~pycoll.comm.communicator.Communicator` and its first sync for a peer, ``serve()`` for an aggregator.
"""
import logging
import os
import socket
import time

from pycoll import auth
from pycoll.control.client import CoordinatorClient, check_endpoint, resolve_host
from pycoll.control.coordinator import PROTOCOL, Coordinator
from pycoll.errors import CoordinatorError
from pycoll.limits import resolve
from pycoll.net.mesh import Listener, host_id, local_address_towards, reserve_port
from pycoll.options import environ

log = logging.getLogger("pycoll")

DEFAULT_DETECTION = 5.0  # seconds of silence before a peer (or the coordinator) counts as lost
PROGRESS_S = 5.0  # a WARNING line this often while a process waits to join (or for its group to form)


def job_id():
    """This process's job id: PYCOLL_JOB_ID, else torchrun's TORCHELASTIC_RUN_ID
    (unless it is torchrun's default, "none"), else None. A coordinator
    refuses joiners whose job id differs from its own (two jobs on one port)."""
    job = environ("PYCOLL_JOB_ID") or environ("TORCHELASTIC_RUN_ID")
    if not job or job == "none":
        return None
    return job[:128]


def start_coordinator_if_free(host, port, world_size, heartbeat_timeout, secret=None, limits=None):
    """Rank 0 hosts the coordinator unless one already listens on the port."""
    bind_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        if probe.connect_ex((host if host != "localhost" else "127.0.0.1", port)) == 0:
            return None  # someone (pycoll master) is already there
    finally:
        probe.close()
    try:
        return Coordinator(bind_host, port, world_size=world_size, heartbeat_timeout=heartbeat_timeout,
                           secret=secret, limits=limits).start()
    except Exception as exc:  # noqa: BLE001 - port raced away: use whoever has it
        log.info("not hosting a coordinator on port %d: %s", port, exc)
        return None


def _request_join(client, join, deadline, host, rank, who, retry_host):
    """Send the join until the coordinator takes it: waits (with progress
    lines) while no coordinator answers yet or one is shutting down, fails at
    once on a refusal that waiting cannot fix."""
    last_progress = start = time.monotonic()
    why_waiting = "no coordinator answers yet" + (" (rank 0 starts it: has it started?)" if rank else "")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CoordinatorError(
                f"{who or 'this peer'} could not join the coordinator at "
                f"{host}:{client.port} within {deadline - start:.0f} s: {why_waiting}. Check MASTER_ADDR/MASTER_PORT "
                "and that rank 0 (or `pycoll master`) runs; PYCOLL_JOIN_TIMEOUT sets this wait")
        try:
            return client.request(join, timeout=min(left, 2.0))
        except CoordinatorError as exc:
            if getattr(exc, "retry", False):
                why_waiting = str(exc).split(": ", 1)[-1]
            elif not getattr(exc, "timed_out", False):
                raise
            else:
                check_endpoint(host, client.port, wait=3.0)  # another program took the port: say so now
        if retry_host is not None:
            retry_host()
        now = time.monotonic()
        if now - last_progress >= PROGRESS_S:
            last_progress = now
            log.warning("pycoll: %s waiting to join the coordinator at %s:%d for %.0f s (of %.0f s): %s",
                        who or "a peer", host, client.port, now - start, deadline - start, why_waiting)
        time.sleep(0.1)


class Joined:
    """What :func:`join` hands back: the coordinator ``client`` (heartbeats running), the data
    ``listener``, the ``join`` message (sent again to re-register), the ``coordinator`` this
    process hosts (or None), the mesh key, and the join's ``started``/``deadline`` (monotonic)."""

    def __init__(self, client, listener, join, coordinator, mesh_key, started, deadline, standby=None):
        self.client, self.listener, self.join, self.coordinator = client, listener, join, coordinator
        self.mesh_key, self.started, self.deadline = mesh_key, started, deadline
        # (socket of the port kept for a successor coordinator, bind host, secret, limits,
        # detection bound): what pycoll.comm.failover.Standby takes; None without failover
        self.standby = standby

    def close(self):
        """Release everything :func:`join` opened (the caller's set-up after the join failed)."""
        if self.standby is not None:
            self.standby[0].close()
        self.listener.close()
        self.client.close()
        if self.coordinator is not None:
            self.coordinator.stop()


def join(master_addr, master_port, *, join_timeout, rank=None, world_size=None, heartbeat_interval=None,
         heartbeat_timeout=None, host_coordinator=False, token=None, limits=None, name=None, info=None, job=None,
         sockbuf=0, who=None, standby=False):
    """Join the coordinator at ``master_addr:master_port`` within ``join_timeout`` s; returns a
    :class:`Joined`. ``rank``/``world_size``: a fixed group's (``init``), None for an elastic
    joiner or an aggregator. ``host_coordinator``: start the coordinator here when none
    listens (rank 0), again when the one found was shutting down. ``heartbeat_timeout``: the
    detection bound (None: the coordinator's, and :data:`DEFAULT_DETECTION` for the client).
    ``info``: added to the join's info (``pid`` is always there); ``job``: the job id to carry
    (see :func:`job_id`). ``who``: how progress lines and errors name this process. ``standby``:
    keep a port for a successor coordinator and advertise it (a worker that takes part in
    failover, see pycoll.comm.failover)."""
    secret = auth.load_secret(token)
    limits = resolve(limits)
    started = time.monotonic()
    deadline = started + join_timeout
    resolve_host(master_addr, master_port)  # a name that does not resolve: say so now, not at the timeout
    check_endpoint(master_addr, master_port)  # another program on the port: the same
    advertise = environ("PYCOLL_ADDR") or local_address_towards(master_addr)
    bind = "127.0.0.1" if advertise.startswith("127.") else "0.0.0.0"
    detection = heartbeat_timeout or DEFAULT_DETECTION
    coordinator = None
    if host_coordinator:
        coordinator = start_coordinator_if_free(master_addr, master_port, world_size, detection, secret, limits)
    client = listener = kept = None
    try:
        if standby:
            kept = reserve_port(bind)
            info = dict(info or {}, standby=kept.getsockname()[1])
        auth.warn_if_exposed(bind, secret, "this peer's data listener")
        listener = Listener(bind, advertise, sockbuf=sockbuf, limits=limits)
        client = CoordinatorClient(master_addr, master_port, name=name, heartbeat_interval=heartbeat_interval,
                                   heartbeat_timeout=detection, secret=secret, limits=limits)

        def retry_host():  # rank 0: the coordinator it found was shutting down (or the port was busy): host anew
            nonlocal coordinator
            if coordinator is None:
                coordinator = start_coordinator_if_free(master_addr, master_port, world_size, detection, secret,
                                                        limits)
                if coordinator is not None:
                    coordinator.host_name = client.name

        if coordinator is not None:
            coordinator.host_name = client.name  # its leave means the coordinator stops: joins then wait
        msg = {"t": "join", "proto": PROTOCOL, "addr": list(listener.addr), "host_id": host_id(),
               "rank": rank, "world_size": world_size, "info": {"pid": os.getpid(), **(info or {})}}
        if job is not None:
            msg["job"] = job
        if heartbeat_timeout:
            msg["heartbeat_timeout"] = float(heartbeat_timeout)
        _request_join(client, msg, deadline, master_addr, rank, who, retry_host if host_coordinator else None)
        client.start_heartbeats()
        return Joined(client, listener, msg, coordinator, auth.derive(secret, "mesh"), started, deadline,
                      None if kept is None else (kept, bind, secret, limits, detection))
    except BaseException:
        if kept is not None:
            kept.close()
        if listener is not None:
            listener.close()
        if coordinator is not None:  # first: it would take our client's goodbye for a member's death
            coordinator.stop()
        if client is not None:
            client.close()
        raise
