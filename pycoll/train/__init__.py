"""Fault-tolerant training loops for PyTorch built on pycoll's elastic communicator.

The room above the torch backend: wrappers that keep an ordinary training loop going while peers
die and join (fault-tolerant data parallel, the DiLoCo family), and the capture, hashing and healing
of training state (model, optimizer, step counter, RNG) that they share.
"""

# The DiLoCo family (docs/diloco.md).
from pycoll.train.diloco import DiLoCo, Round  # noqa: E402,F401
