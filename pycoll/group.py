"""Making communicators: ``init`` (a fixed group, torchrun-style) and
``connect`` (join an elastic group at any time)."""
import logging
import time

from pycoll import bootstrap
from pycoll.bootstrap import PROGRESS_S, job_id  # job_id: public here too, as before
from pycoll.comm.communicator import Communicator
from pycoll.comm.failover import Standby
from pycoll.errors import CollectiveError, CoordinatorError, InvalidArgument
from pycoll.limits import Limits
from pycoll.net.links import settle
from pycoll.options import Options, environ

log = logging.getLogger("pycoll")


def _env_master_port():
    """The coordinator's port: PYCOLL_MASTER_PORT (set by `pycoll run`, which
    leaves MASTER_PORT to torch.distributed), else MASTER_PORT (torchrun)."""
    port = environ("PYCOLL_MASTER_PORT")
    return port if port is not None else environ("MASTER_PORT")


def _join_timeout(join_timeout, default):
    """The join wait: the argument, else PYCOLL_JOIN_TIMEOUT (seconds), else ``default``."""
    if join_timeout is not None:
        return float(join_timeout)
    value = environ("PYCOLL_JOIN_TIMEOUT")
    return default if value is None else value


def _options(join_timeout, arguments):
    """The communicator's options: ``arguments`` over the environment over the defaults
    (pycoll.options), stripes="auto" settled (pycoll.net.links); its sync points wait as
    long as joining does."""
    return settle(Options.resolve(**arguments)).replace(sync_timeout=join_timeout)


def _forming_text(client, world_size):
    """"2 of 4 ranks joined; waiting for ranks 2, 3" from the coordinator's last heartbeat."""
    forming = client.last_status.get("forming") if isinstance(client.last_status, dict) else None
    if not isinstance(forming, dict) or world_size is None:
        return None
    ranks = [r for r in forming.get("ranks", []) if isinstance(r, int)]
    missing = [r for r in range(world_size) if r not in ranks]
    text = f"{len(ranks)} of {world_size} ranks joined"
    if missing:
        shown = ", ".join(str(r) for r in missing[:16]) + (", ..." if len(missing) > 16 else "")
        text += f"; waiting for rank{'s' if len(missing) > 1 else ''} {shown}"
    return text


def _make(master_addr, master_port, rank, world_size, *, join_timeout, heartbeat_interval, heartbeat_timeout,
          host_coordinator, options, token=None, limits=None, name=None):
    joined = bootstrap.join(master_addr, master_port, join_timeout=join_timeout, rank=rank, world_size=world_size,
                            heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                            host_coordinator=host_coordinator, token=token, limits=limits, name=name,
                            info={"transport": options.transport}, job=job_id(), sockbuf=options.sockbuf,
                            who=f"rank {rank}" if rank is not None else None, standby=options.failover)
    client, started, deadline = joined.client, joined.started, joined.deadline
    comm = standby = None
    who = f"rank {rank}" if rank is not None else f"peer {client.name}"

    def progress(kind, waited):
        if kind != "sync":
            return
        text = _forming_text(client, world_size) if rank is not None else \
            "waiting to be admitted (the members admit joiners at their next update_topology())"
        if text:
            log.warning("pycoll: %s waiting for the group at %s:%d for %.0f s (of %.0f s): %s", who, master_addr,
                        master_port, time.monotonic() - started, join_timeout, text)

    try:
        standby = None if joined.standby is None else Standby(*joined.standby)
        joined.standby = None  # (the Standby owns the port now)
        comm = Communicator(client, joined.listener, options, coordinator=joined.coordinator, mesh_key=joined.mesh_key,
                            join=joined.join, standby=standby)
        epoch = comm.epoch_state
        client.on_wait, client.progress_interval = progress, PROGRESS_S
        try:  # the first epoch: the join wait covers both steps
            epoch.sync(rebuild=True, timeout=max(1.0, deadline - time.monotonic()))
        except CoordinatorError as exc:
            text = _forming_text(client, world_size) if rank is not None else None
            if not getattr(exc, "timed_out", False):
                if not (text and client.coordinator_lost()):
                    raise
                # the coordinator went away while the group was forming: rank 0, which hosts it,
                # gave up at its own join timeout (nearly ours) because a rank never came
                raise CoordinatorError(f"{who}: the group at {master_addr}:{master_port} did not form: {text}; "
                                       f"its coordinator went away meanwhile ({exc}). Did every rank start, with "
                                       "the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE? PYCOLL_JOIN_TIMEOUT sets "
                                       "this wait") from None
            raise CoordinatorError(
                f"{who}: the group at {master_addr}:{master_port} did not form within {join_timeout:.0f} s"
                + (f": {text}" if text else " (this peer was not admitted: do the members call update_topology()?)")
                + (". Did every rank start, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE? "
                   "PYCOLL_JOIN_TIMEOUT sets this wait" if rank is not None else "")) from None
        finally:
            client.on_wait = None
        if world_size is not None and comm.world_size != world_size:
            raise CoordinatorError(f"{who}: the coordinator at {master_addr}:{master_port} formed a group of "
                                   f"{comm.world_size}, not world_size {world_size}: another group shares this port?")
        if rank is None:
            epoch.joined_fresh()  # admitted: a first update_topology() has nothing left to do
        return comm
    except BaseException:
        if comm is not None:
            comm.epoch_state.drop()
        if standby is not None:
            standby.close()
        joined.close()
        raise


def init(rank: int | None = None, world_size: int | None = None, master_addr: str | None = None,
         master_port: int | None = None, *, timeout: float | None = None, join_timeout: float | None = None,
         heartbeat_interval: float | None = None, heartbeat_timeout: float | None = None,
         stripes: int | str | None = None, preserve_input: bool = True, token: str | bytes | None = None,
         limits: "Limits | None" = None, **options: object) -> Communicator:
    """Join a group of ``world_size`` peers as ``rank``.

    Arguments default to torchrun's environment variables RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT. ``stripes``: connections per peer pair, or
    "auto" with ``link="2gbit/50ms"`` or ``topology=`` (see :mod:`pycoll.net.links`). Rank 0 starts the coordinator on
    MASTER_PORT unless one (``pycoll master``) is already running there.
    Returns once all ``world_size`` peers are connected.
    ``heartbeat_timeout`` is the detection bound (default 5 s): a peer silent
    that long counts as dead, and so does a coordinator. ``join_timeout``: how
    long to wait for the group to form (default ``PYCOLL_JOIN_TIMEOUT``, else
    120 s); a WARNING line every 5 s says which ranks are still missing.
    ``timeout`` (default ``PYCOLL_TIMEOUT``, else 120 s) and the other
    ``options`` are the communicator's settings: see :class:`pycoll.options.Options`,
    which also lists the environment variables that set them.

    ``token``: the group's shared secret (default ``PYCOLL_SECRET``); every
    peer and the coordinator must use the same one. ``limits``: a
    :class:`pycoll.Limits` (default: from the environment).
    """
    rank = rank if rank is not None else environ("RANK")
    world_size = world_size if world_size is not None else environ("WORLD_SIZE")
    master_addr = master_addr or environ("MASTER_ADDR") or "127.0.0.1"
    master_port = master_port if master_port is not None else _env_master_port()
    if rank is None or world_size is None or master_port is None:
        raise InvalidArgument("pycoll.init needs rank, world_size and master_port (or RANK, WORLD_SIZE, "
                              "MASTER_PORT in the environment, as torchrun and `pycoll run` set them)")
    if not 0 <= rank < world_size:
        raise InvalidArgument(f"rank {rank} is not in [0, {world_size})")
    join_timeout = _join_timeout(join_timeout, 120.0)
    resolved = _options(join_timeout, dict(options, timeout=timeout, stripes=stripes, preserve_input=preserve_input))
    return _make(master_addr, master_port, rank, world_size, join_timeout=join_timeout,
                 heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                 host_coordinator=(rank == 0), options=resolved, token=token, limits=limits)


def connect(master_addr: str | None = None, master_port: int | None = None, *, timeout: float | None = None,
            join_timeout: float | None = None, heartbeat_interval: float | None = None,
            heartbeat_timeout: float | None = None, stripes: int | str | None = None, name: str | None = None,
            token: str | bytes | None = None, limits: "Limits | None" = None,
            **options: object) -> Communicator:
    """Join an elastic group through its coordinator, at any time.

    Returns once this peer has been admitted, which happens when the current
    members next call ``update_topology()`` (immediately if the group is empty).
    A joiner's first call must match what the members do right after
    ``update_topology()`` (typically ``sync_shared_state``).

    ``heartbeat_timeout``: this peer's detection bound (default: the
    coordinator's, 5 s unless ``pycoll master --heartbeat-timeout`` says
    otherwise): silent that long, it counts as dead and the group goes on
    without it. ``name``: a stable, unique peer name (default: random);
    ``comm.members`` and the contributors of ``retry=True`` collectives are
    reported by name. ``token``, ``limits``, ``timeout`` and the other options as
    for :func:`init` (``join_timeout`` defaults to 300 s here).
    """
    master_addr = master_addr or environ("MASTER_ADDR") or "127.0.0.1"
    master_port = master_port if master_port is not None else _env_master_port()
    if master_port is None:
        raise InvalidArgument("pycoll.connect needs master_port (or MASTER_PORT in the environment)")
    join_timeout = _join_timeout(join_timeout, 300.0)
    resolved = _options(join_timeout, dict(options, timeout=timeout, stripes=stripes))
    return _make(master_addr, master_port, None, None, join_timeout=join_timeout,
                 heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                 host_coordinator=False, options=resolved, name=name, token=token, limits=limits)


__all__ = ["init", "connect", "CollectiveError"]
