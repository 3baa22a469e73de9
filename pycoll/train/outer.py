"""The DiLoCo family's pure parts (no communication): which parameter fragment synchronizes at
which inner step, how parameters are cut into fragments, and the outer Nesterov SGD step.

Streaming DiLoCo (Douillard et al., 2025; torchft's ``StreamingDiLoCo``) staggers fragments: with
``H`` inner steps per round and ``F`` fragments, fragment ``f`` has offset ``f * H / F`` and syncs
after every inner step ``s`` with ``(s + offset_f) % H == 0``. Each fragment then syncs once every
``H`` steps, one fragment every ``H / F`` steps, never two at once: the peak traffic of a sync is
``1 / F`` of the model's. ``F = 1`` is plain DiLoCo (a sync every ``H`` steps).
"""
import torch

from pycoll.errors import InvalidArgument

__all__ = ["Schedule", "split_fragments", "nesterov_"]


class Schedule:
    """When fragment ``f`` of ``fragments`` syncs, for ``sync_every`` (H) inner steps per round."""

    def __init__(self, sync_every: int, fragments: int = 1):
        if not isinstance(sync_every, int) or sync_every < 1:
            raise InvalidArgument(f"sync_every must be a positive int, not {sync_every!r}")
        if not isinstance(fragments, int) or not 1 <= fragments <= sync_every or sync_every % fragments:
            raise InvalidArgument(f"fragments must divide sync_every ({sync_every}) and be >= 1, "
                                  f"not {fragments!r}: one fragment syncs every sync_every / fragments steps")
        self.sync_every, self.fragments = sync_every, fragments
        self.offsets = [f * (sync_every // fragments) for f in range(fragments)]

    def due(self, step: int):
        """The fragment that syncs after inner step ``step`` (counted from 1), or None."""
        if step < 1:
            return None
        for f, offset in enumerate(self.offsets):
            if (step + offset) % self.sync_every == 0:
                return f
        return None


def split_fragments(sizes, fragments: int):
    """Cut parameters (their element counts ``sizes``, in model order) into ``fragments``
    contiguous groups of about equal size; returns a list of index lists, none empty."""
    if fragments > len(sizes):
        raise InvalidArgument(f"{fragments} fragments of {len(sizes)} parameter tensors: a fragment holds whole "
                              "tensors, so ask for at most as many fragments as tensors")
    total, groups, current, done = sum(sizes), [], [], 0
    for i, n in enumerate(sizes):
        current.append(i)
        done += n
        left_tensors, left_groups = len(sizes) - i - 1, fragments - len(groups) - 1
        # close the group at its share of the elements, or when the rest is one tensor per group
        if left_groups > 0 and (done * fragments >= total * (len(groups) + 1) or left_tensors == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


def nesterov_(param: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr: float, momentum: float) -> None:
    """One step of SGD with Nesterov momentum (no dampening, no weight decay), in place, with the
    operations of ``torch.optim.SGD(nesterov=True, foreach=False)`` so the bits are the same; a
    zero ``buf`` is its first step (torch clones the gradient: momentum * 0 + g is g exactly)."""
    buf.mul_(momentum).add_(grad)
    param.add_(grad.add(buf, alpha=momentum), alpha=-lr)
