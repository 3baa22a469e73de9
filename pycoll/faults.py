"""Fault points: named places in the code where a test may delay or kill this process.

pycoll calls them ``before:<collective>``, ``during:<collective>``, ``agreed:<collective>``,
``decided:<collective>``, ``before:state_transfer``, ``during:state_transfer``, ``calibrate``
(before each of the all-reduces that measure the cost model when an epoch is installed) and, in a
coordinator's process, ``coordinator:<round kind>`` (before it sends each member the decision of a
round: ``["coordinator:state", 2]`` dies having told one member), ``coordinator:sync`` (before it
answers each member's sync point when the group is unchanged) and ``failover:register`` (before a
member re-registers with a successor coordinator); user code adds
its own with :func:`fault_point`. A process is armed from its environment (``PYCOLL_FAULT``:
die at a point, ``PYCOLL_FAULT_DELAY``: sleep at points) or by :func:`arm` (which
:func:`pycoll.testing.run` calls in each rank it starts).

This is the bottom of the house: it imports nothing from pycoll, so the core (``comm``,
``consensus``, ``shared_state``) calls fault points without importing the test harness
(:mod:`pycoll.testing`, which arms them through this module). The points sit on the hot path:
callers test :data:`FAULTS_ARMED` first, read as ``faults.FAULTS_ARMED`` at call time (never
``from pycoll.faults import FAULTS_ARMED``, which would copy the flag before it is armed).
"""
import json
import os
import signal
import threading
import time

__all__ = ["FAULTS_ARMED", "fault_point", "fault_armed", "arm", "rearm_from_environment", "FAULT_ENV",
           "DELAY_ENV"]

FAULT_ENV = "PYCOLL_FAULT"        # JSON [point, nth]: this process dies at the nth hit of point
DELAY_ENV = "PYCOLL_FAULT_DELAY"  # seconds at every point, or JSON {point: seconds}

#: True when this process may hit a fault (lets pycoll skip fault points, which
#: sit on the hot path, at no cost otherwise). Set from the environment at
#: import, or by :func:`arm`.
FAULTS_ARMED = bool(os.environ.get(FAULT_ENV) or os.environ.get(DELAY_ENV))


def rearm_from_environment():
    """Read the environment's fault plan again, as at import: for a process whose environment
    was replaced after pycoll was imported (a rank forked from pycoll.testing's fork server).
    Never disarms what :func:`arm` armed."""
    global FAULTS_ARMED
    FAULTS_ARMED = FAULTS_ARMED or bool(os.environ.get(FAULT_ENV) or os.environ.get(DELAY_ENV))

_hits = {}
_hits_lock = threading.Lock()


def _kill_target():
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None, 0
    try:
        point, nth = json.loads(raw)
        return str(point), int(nth)
    except (ValueError, TypeError):
        return raw, 1  # a bare point name: its first hit


def _delay_for(name):
    raw = os.environ.get(DELAY_ENV)
    if not raw:
        return 0.0
    try:
        value = json.loads(raw)
    except ValueError:
        return 0.0
    if isinstance(value, dict):
        return float(value.get(name, 0.0))
    return float(value)


def fault_point(name):
    """Mark a named point in your code: the harness may delay or kill this rank here.

    Free when no fault is set up (one environment lookup). To arm it by hand, set
    PYCOLL_FAULT=<name> (die at its first hit) and/or PYCOLL_FAULT_DELAY=<seconds>."""
    if not (os.environ.get(FAULT_ENV) or os.environ.get(DELAY_ENV)):
        return
    delay = _delay_for(name)
    if delay > 0:
        time.sleep(delay)
    point, nth = _kill_target()
    if point == name:
        with _hits_lock:
            _hits[name] = _hits.get(name, 0) + 1
            hit = _hits[name]
        if hit >= nth:
            os.kill(os.getpid(), signal.SIGKILL)


def fault_armed(name):
    """True if this process is set to die at ``name`` (lets pycoll arm a
    background killer for ``during:*`` points only when needed)."""
    return _kill_target()[0] == name


def arm(fault=None, delay=None):
    """Set this process's fault plan: ``fault`` is a point name, (point name, nth hit) or
    seconds after start; ``delay`` is seconds at every point or {point: seconds}. Returns the
    kill-after seconds, if any (the caller starts that timer once the group is up)."""
    global FAULTS_ARMED
    if fault is not None or delay:
        FAULTS_ARMED = True
    if isinstance(delay, dict):
        os.environ[DELAY_ENV] = json.dumps({str(k): float(v) for k, v in delay.items()})
    elif delay:
        os.environ[DELAY_ENV] = str(float(delay))
    if fault is None:
        return None
    if isinstance(fault, (int, float)) and not isinstance(fault, bool):
        return float(fault)
    point, nth = (fault, 1) if isinstance(fault, str) else fault
    os.environ[FAULT_ENV] = json.dumps([str(point), int(nth)])
    return None
