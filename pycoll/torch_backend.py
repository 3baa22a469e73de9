"""`pycoll.torch_backend`, the documented name of `pycoll.torch.backend` from before the package had layers:
kept so users' imports go on working; it is the same module object, not a copy."""
import sys

from pycoll.torch import backend as _module

sys.modules[__name__] = _module
