"""Coordinator failover: when the coordinator's process is gone (or silent past the heartbeat
bound), the members of the last epoch pick a successor among themselves and go on under it.

* Every peer reserves a TCP port at join (:class:`Standby`, bound, not listening) and advertises
  it; the coordinator hands every member every member's port with the epoch's membership, so a
  successor's address is known to all with no configuration.
* :func:`elect`: each survivor probes the members' data listeners (pycoll.net.mesh.probe_addrs).
  A refused connection is a *known death* (the kernel answered for a process that is gone); a
  silent one is *unknown* (a cut link). The successor is the lowest rank of the last epoch whose
  listener accepted (or this peer itself), the same on every rank that sees the same deaths.
* The successor starts a :class:`pycoll.control.coordinator.Coordinator` on its reserved port;
  everyone (the successor too) re-registers there with what it remembers: epoch, members, rank
  and the members it knows dead. The new coordinator forms an epoch only when the members it
  does not hear from are known dead or fewer than those it hears from (no split brain: see
  ``Coordinator._maybe_form_epoch`` and docs/fault-model.md).
* Every member must leave the lost coordinator's epoch at the same operation: a round it decided
  and told only some members before it died is told to the others by the successor
  (:func:`told_decision`, :func:`completes`), so either every survivor completes the operation
  or none does and all run it again in the successor's first epoch.
"""
import logging
import threading
import time

from pycoll.control.coordinator import Coordinator
from pycoll.net.mesh import probe_addrs

__all__ = ["Standby", "elect", "reachability", "probe_addrs", "PROBE_TIMEOUT", "completes", "told_decision"]

log = logging.getLogger("pycoll")

#: seconds a liveness probe of a member's listener waits before it counts as "unknown"
PROBE_TIMEOUT = 0.5
#: seconds a successor keeps joiners waiting for the old members' re-registration at most
RESUME_EXPECTED_S = 120.0


class Standby:
    """A port kept for a successor coordinator, and what starting one takes (the group's
    secret and limits, the detection bound). The port is bound without listening: nobody else
    takes it, and a connection to it is refused until a coordinator binds it."""

    def __init__(self, sock, bind_host, secret=None, limits=None, heartbeat_timeout=5.0):
        """``sock``: the reserved port (pycoll.net.mesh.reserve_port), owned from now on."""
        self.bind_host, self.secret, self.limits = bind_host, secret, limits
        self.heartbeat_timeout = heartbeat_timeout
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.coordinator = None

    def start_coordinator(self, name, origin=None, addrs=None):
        """Become the coordinator (once): bind the kept port and serve. ``name``: our member
        name (its leave stops the coordinator once the others have left); ``origin``: the lost
        coordinator's (host, port), served too when it is on this host and free (joiners that
        know only that address find the group); ``addrs``: name -> data listener of the last
        epoch's members, probed while they re-register (see watch_resume)."""
        if self.coordinator is None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            coord = None
            for _ in range(50):  # the kernel may hold the port a moment after the close
                try:
                    coord = Coordinator(self.bind_host, self.port, heartbeat_timeout=self.heartbeat_timeout,
                                        secret=self.secret, limits=self.limits)
                    break
                except Exception as exc:  # noqa: BLE001 - zmq's "address in use": try again shortly
                    log.debug("successor coordinator: bind %s:%d failed: %s", self.bind_host, self.port, exc)
                    time.sleep(0.01)
            if coord is None:
                raise OSError(f"cannot bind the successor coordinator to {self.bind_host}:{self.port}")
            coord.host_name = name
            # joiners wait for the old members (bounded: our own re-registration comes within the
            # sync timeout, or we gave up; see Coordinator.resume_expected_until)
            coord.resume_expected_until = time.monotonic() + RESUME_EXPECTED_S
            if origin is not None:
                coord.also_listen(*origin, after_resume=True)
            self.coordinator = coord.start()
            if addrs:
                threading.Thread(target=watch_resume, args=(coord, addrs), name="pycoll-resume-probe",
                                 daemon=True).start()
            log.warning("this peer (%s) now hosts the group's coordinator on %s:%d", name, self.bind_host, self.port)
        return self.coordinator

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watch_resume(coord, addrs, interval=0.1, limit=300.0):
    """While the successor ``coord`` waits for the old epoch's members to re-register, probe
    those still missing (``addrs``: name -> data listener) and hand it what it finds
    (``coord.resume_probe``): a dead one is not waited for, an alive one (slow to notice the
    loss) is waited for longer than a silent one (see Coordinator._maybe_form_epoch)."""
    deadline = time.monotonic() + limit
    started = False
    while time.monotonic() < deadline and not coord.closing:
        missing = coord.resume_missing()
        if missing is None:
            if started or time.monotonic() > deadline - limit + 30.0:
                return  # re-formed (or nobody ever re-registered)
            time.sleep(0.01)
            continue
        started = True
        known = [n for n in missing if n in addrs]
        if known:
            seen = probe_addrs([tuple(addrs[n]) for n in known], PROBE_TIMEOUT)
            coord.resume_probe = dict(zip(known, seen))
        time.sleep(interval)


def reachability(members, addrs, rank, timeout=PROBE_TIMEOUT):
    """Probe the other members' data listeners from ``rank``: {rank: "alive"/"dead"/"unknown"}
    (see pycoll.net.mesh.probe_addrs), ``rank`` itself alive."""
    others = [i for i in range(len(members)) if i != rank]
    seen = dict(zip(others, probe_addrs([tuple(addrs[i]) for i in others], timeout)))
    seen[rank] = "alive"
    return seen


def elect(members, addrs, standby_ports, rank, timeout=PROBE_TIMEOUT, lost=None, host=None):
    """Who succeeds the lost coordinator, seen from ``rank`` of the last epoch (``members``:
    names; ``addrs``: their data listeners; ``standby_ports``: their kept ports, 0 for none).
    ``lost``: the lost coordinator's "host:port": a member that hosted it on its kept port is
    counted dead (a dying process closes its listeners one by one, so its data listener may
    still accept a probe after its coordinator's port refused; electing it costs a timeout).
    ``host``: the name of the member whose process hosted the lost coordinator, as the epoch
    told (it also serves at the group's first address, which is all a joiner knows): dead too.
    Pass both only when the coordinator's death is confirmed (its port refuses).
    Returns (successor's rank, names known dead, names unknown)."""
    seen = reachability(members, addrs, rank, timeout)
    for i in range(len(members)):
        hosted = members[i] == host or (lost is not None and standby_ports[i]
                                        and f"{addrs[i][0]}:{standby_ports[i]}" == lost)
        if i != rank and hosted:
            seen[i] = "dead"
    dead = [members[i] for i in range(len(members)) if seen[i] == "dead"]
    unknown = [members[i] for i in range(len(members)) if seen[i] == "unknown"]
    eligible = [i for i in range(len(members)) if seen[i] == "alive" and standby_ports[i]]
    successor = eligible[0] if eligible else rank
    return successor, dead, unknown


#: decisions that end an agreed operation with nothing more to exchange: the same on every
#: member (a plain state decision is per rank, but without transfers its rank's parts are empty)
_FINAL = {"collective": ("commit", "parity"), "parity": ("report",), "state": ("state",)}


def completes(kind, reply):
    """Whether ``reply``, the lost coordinator's decision of a round of ``kind`` that another
    member got, completes that operation for a member that did not get it. A state decision
    that moves bytes does not: its transfers and their round ran (or stall) on the old epoch's
    links, so every member runs the whole sync again (the member that got it fails at the
    next round, which the lost coordinator cannot have decided without this one's report)."""
    if not isinstance(reply, dict) or reply.get("decision") not in _FINAL.get(kind, ()):
        return False
    return not (kind == "state" and reply.get("transfer"))


def told_decision(last_round, epoch):
    """What a member tells its successor at re-registration about the last round it got a
    decision for (``last_round``: the client's (epoch, seq, kind, reply)), None if nothing of
    ``epoch`` (the members that missed that decision take it from the successor)."""
    if last_round is None or last_round[0] != epoch:
        return None
    _, seq, kind, reply = last_round
    if not completes(kind, reply):
        return None
    return {"seq": seq, "kind": kind, "reply": reply}
