"""Making communicators: ``init`` (a fixed group, torchrun-style) and
``connect`` (join an elastic group at any time)."""
import logging
import os
import socket

from . import auth
from .comm import DEFAULT_TIMEOUT, Communicator
from .control import CoordinatorClient
from .coordinator import PROTOCOL, Coordinator
from .errors import CollectiveError, InvalidArgument
from .limits import resolve
from .mesh import Listener, host_id, local_address_towards, transport_mode
from .wan import resolve_stripes

log = logging.getLogger("pycoll")


def _env_int(name):
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise InvalidArgument(f"environment variable {name}={v!r} is not an integer") from None


def _env_master_port():
    """The coordinator's port: PYCOLL_MASTER_PORT (set by `pycoll run`, which
    leaves MASTER_PORT to torch.distributed), else MASTER_PORT (torchrun)."""
    port = _env_int("PYCOLL_MASTER_PORT")
    return port if port is not None else _env_int("MASTER_PORT")


def _stripes(stripes, options):
    """stripes: an int, "auto" (from link=/topology=, see pycoll.wan), or $PYCOLL_STRIPES."""
    try:
        return resolve_stripes(stripes, options)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _start_coordinator_if_free(host, port, world_size, heartbeat_timeout, secret=None, limits=None):
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


DEFAULT_DETECTION = 5.0  # seconds of silence before a peer (or the coordinator) counts as lost


def _make(master_addr, master_port, rank, world_size, *, join_timeout, heartbeat_interval, heartbeat_timeout,
          host_coordinator, token=None, limits=None, name=None, **comm_options):
    secret = auth.load_secret(token)
    limits = resolve(limits)
    advertise = os.environ.get("PYCOLL_ADDR") or local_address_towards(master_addr)
    bind = "127.0.0.1" if advertise.startswith("127.") else "0.0.0.0"
    coordinator = None
    if host_coordinator:
        coordinator = _start_coordinator_if_free(master_addr, master_port, world_size,
                                                 heartbeat_timeout or DEFAULT_DETECTION, secret, limits)
    auth.warn_if_exposed(bind, secret, "this peer's data listener")
    listener = Listener(bind, advertise, sockbuf=comm_options.get("sockbuf", 0), limits=limits)
    client = CoordinatorClient(master_addr, master_port, name=name, heartbeat_interval=heartbeat_interval,
                               heartbeat_timeout=heartbeat_timeout or DEFAULT_DETECTION, secret=secret,
                               limits=limits)
    comm_options["mesh_key"] = auth.derive(secret, "mesh")
    comm = None
    try:
        join = {"t": "join", "proto": PROTOCOL, "addr": list(listener.addr), "host_id": host_id(),
                "rank": rank, "world_size": world_size,
                "info": {"pid": os.getpid(), "transport": transport_mode(comm_options.get("transport"))}}
        if heartbeat_timeout:
            join["heartbeat_timeout"] = float(heartbeat_timeout)
        client.request(join, timeout=join_timeout)
        client.start_heartbeats()
        comm = Communicator(client, listener, coordinator=coordinator, sync_timeout=join_timeout, **comm_options)
        comm._join_msg = join
        comm._sync(rebuild=True)
        return comm
    except BaseException:
        if comm is not None:
            comm._drop_comm()
        listener.close()
        client.close()
        if coordinator is not None:
            coordinator.stop()
        raise


def init(rank=None, world_size=None, master_addr=None, master_port=None, *, timeout=DEFAULT_TIMEOUT,
         join_timeout=120.0, heartbeat_interval=None, heartbeat_timeout=None, stripes=None,
         preserve_input=True, token=None, limits=None, **options):
    """Join a group of ``world_size`` peers as ``rank``.

    Arguments default to torchrun's environment variables RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT. ``stripes``: connections per peer pair, or
    "auto" with ``link="2gbit/50ms"`` or ``topology=`` (see :mod:`pycoll.wan`). Rank 0 starts the coordinator on
    MASTER_PORT unless one (``pycoll master``) is already running there.
    Returns once all ``world_size`` peers are connected.
    ``heartbeat_timeout`` is the detection bound (default 5 s): a peer silent
    that long counts as dead, and so does a coordinator.

    ``token``: the group's shared secret (default ``PYCOLL_SECRET``); every
    peer and the coordinator must use the same one. ``limits``: a
    :class:`pycoll.Limits` (default: from the environment).
    """
    rank = rank if rank is not None else _env_int("RANK")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = master_port if master_port is not None else _env_master_port()
    if rank is None or world_size is None or master_port is None:
        raise InvalidArgument("pycoll.init needs rank, world_size and master_port (or RANK, WORLD_SIZE, "
                              "MASTER_PORT in the environment, as torchrun and `pycoll run` set them)")
    if not 0 <= rank < world_size:
        raise InvalidArgument(f"rank {rank} is not in [0, {world_size})")
    stripes, options = _stripes(stripes, options)
    return _make(master_addr, master_port, rank, world_size, join_timeout=join_timeout,
                 heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                 host_coordinator=(rank == 0), timeout=timeout, stripes=stripes,
                 preserve_input=preserve_input, token=token, limits=limits, **options)


def connect(master_addr=None, master_port=None, *, timeout=DEFAULT_TIMEOUT, join_timeout=300.0,
            heartbeat_interval=None, heartbeat_timeout=None, stripes=None, name=None, token=None, limits=None,
            **options):
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
    reported by name. ``token`` and ``limits`` as for :func:`init`.
    """
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = master_port if master_port is not None else _env_master_port()
    if master_port is None:
        raise InvalidArgument("pycoll.connect needs master_port (or MASTER_PORT in the environment)")
    stripes, options = _stripes(stripes, options)
    return _make(master_addr, master_port, None, None, join_timeout=join_timeout,
                 heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                 host_coordinator=False, timeout=timeout, stripes=stripes, name=name, token=token, limits=limits,
                 **options)


__all__ = ["init", "connect", "CollectiveError"]
