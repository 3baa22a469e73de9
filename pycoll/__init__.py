"""pycoll: fault-tolerant collective communication for ML training.

A small C core moves and reduces tensors over TCP; this package keeps a
group of peers working while peers crash, join and leave.

    import pycoll
    comm = pycoll.init()                 # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    comm.all_reduce(arr, op="sum")       # in place
"""
from pycoll.comm.communicator import Communicator, Stat
from pycoll.errors import (Cancelled, CollectiveError, CollectiveTimeout, CoordinatorError, InvalidArgument,
                     ParityError, PeerFailure, ProtocolError)
from pycoll.group import connect, init
from pycoll.limits import Limits
from pycoll.observability import configure_logging
from pycoll.options import Options
from pycoll.comm.work import Work

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
