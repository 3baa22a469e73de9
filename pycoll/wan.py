"""`pycoll.wan`, the documented name of `pycoll.net.links` from before the package had layers:
kept so users' imports go on working; it is the same module object, not a copy."""
import sys

from pycoll.net import links as _module

sys.modules[__name__] = _module
