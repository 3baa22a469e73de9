"""`pycoll.coordinator`, the documented name of `pycoll.control.coordinator` from before the package had layers:
kept so users' imports go on working; it is the same module object, not a copy."""
import sys

from pycoll.control import coordinator as _module

sys.modules[__name__] = _module
