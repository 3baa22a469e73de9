"""pycoll: fault-tolerant collective communication for ML training.

A small C core moves and reduces tensors over TCP; this package keeps a
group of peers working while peers crash, join and leave.

    import pycoll
    comm = pycoll.init()                 # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    comm.all_reduce(arr, op="sum")       # in place
"""
import importlib
from typing import TYPE_CHECKING

from pycoll.errors import (Cancelled, CollectiveError, CollectiveTimeout, CoordinatorError, InvalidArgument,
                           ParityError, PeerFailure, ProtocolError)
from pycoll.limits import Limits
from pycoll.observability import Stat, configure_logging
from pycoll.options import Options

# The communicator and the group need the C core and ZeroMQ: they load on first use, so that
# `import pycoll.plan.planners` (or `pycoll --help`) does not pull in the network.
_LAZY = {"init": "pycoll.group", "connect": "pycoll.group", "Communicator": "pycoll.comm.communicator",
         "Work": "pycoll.comm.work"}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported here
    from pycoll.comm.communicator import Communicator
    from pycoll.comm.work import Work
    from pycoll.group import connect, init


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pycoll' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


try:
    configure_logging()  # PYCOLL_LOG=debug|info|warning|error
except ValueError as _exc:  # a bad PYCOLL_LOG must not make `import pycoll` (or `pycoll --help`) fail
    import logging as _logging
    _logging.getLogger("pycoll").warning("%s (ignored)", _exc)

__version__ = "0.1.0"

__all__ = [
    "init", "connect", "Communicator", "Work", "Stat", "configure_logging",
    "CollectiveError", "PeerFailure", "ProtocolError", "CollectiveTimeout", "Cancelled",
    "InvalidArgument", "CoordinatorError", "ParityError", "Limits", "Options",
]
