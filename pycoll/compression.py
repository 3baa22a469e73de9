"""`pycoll.compression`, the documented name of `pycoll.plan.compression` from before the package had layers:
kept so users' imports go on working; it is the same module object, not a copy."""
import sys

from pycoll.plan import compression as _module

sys.modules[__name__] = _module
