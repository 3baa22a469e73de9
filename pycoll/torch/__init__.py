"""``import pycoll.torch`` registers the ``"pycoll"`` torch.distributed backend
(the same as ``import pycoll.torch.backend``, where it is implemented and documented)."""
from pycoll.torch.backend import (BACKEND, ProcessGroupPycoll, communicator, compression_hook,  # noqa: F401
                            create_process_group, register)

__all__ = ["BACKEND", "ProcessGroupPycoll", "register", "compression_hook", "communicator", "create_process_group"]
