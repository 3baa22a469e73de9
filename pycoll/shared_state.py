"""`pycoll.shared_state`, the documented name of `pycoll.comm.shared_state` from before the package had layers:
kept so users' imports go on working; it is the same module object, not a copy."""
import sys

from pycoll.comm import shared_state as _module

sys.modules[__name__] = _module
