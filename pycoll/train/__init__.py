"""Fault-tolerant training loops for PyTorch built on pycoll's elastic communicator.

The room above the torch backend: wrappers that keep an ordinary training loop going while peers
die and join (fault-tolerant data parallel, the DiLoCo family), and the capture, hashing and healing
of training state (model, optimizer, step counter, RNG) that they share.
"""
from pycoll.train.ddp import FaultTolerantDDP, StepReport
from pycoll.train.diloco import DiLoCo, Round
from pycoll.train.state import TrainingState, heal

__all__ = ["FaultTolerantDDP", "StepReport", "TrainingState", "heal", "DiLoCo", "Round"]
