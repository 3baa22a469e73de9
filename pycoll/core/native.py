"""The compiled C core, and the one place C status codes become exceptions."""
from pycoll import errors

try:
    from pycoll.core._core import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build is missing
    import os as _os
    _pkg = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))  # the pycoll package
    _hint = ("Install it with `pip install pycoll` (from a wheel, or from the sdist, which compiles "
             "csrc/ with cffi and needs a C compiler), or `pip install -e .` in a checkout")
    if _os.path.isdir(_os.path.join(_os.path.dirname(_pkg), "csrc")):
        _hint += (f"; note that {_pkg} is a source checkout: if pycoll is installed elsewhere, run "
                  "Python from another directory so that the checkout does not shadow it")
    raise ImportError(f"pycoll's C extension (pycoll.core._core) is not built: {exc}. {_hint}") from exc

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
