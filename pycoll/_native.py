"""The compiled C core, and the one place C status codes become exceptions."""
from . import errors

try:
    from ._core import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "pycoll's C extension is not built; install with `pip install -e .` "
        f"(which compiles csrc/ with cffi): {exc}"
    ) from exc

_STATUS_EXC = {
    lib.PC_ERR_ARG: errors.InvalidArgument,
    lib.PC_ERR_NOMEM: errors.CollectiveError,
    lib.PC_ERR_IO: errors.PeerFailure,
    lib.PC_ERR_PEER: errors.PeerFailure,
    lib.PC_ERR_PROTO: errors.ProtocolError,
    lib.PC_ERR_TIMEOUT: errors.CollectiveTimeout,
    lib.PC_ERR_CANCELLED: errors.Cancelled,
}


def status_error(status, message, peer=None):
    """Exception object for a non-zero C status."""
    cls = _STATUS_EXC.get(status, errors.CollectiveError)
    return cls(message, status=status, peer=peer)


def check(status, what):
    """Raise for a failed call of a C function that has no comm to ask."""
    if status != lib.PC_OK:
        raise status_error(status, f"{what} failed (status {status})")
