"""Staging for the torch backend: tensors the C core cannot read in place go through host copies.

Two kinds, both decided per tensor argument of a collective:

- a **device tensor** (CUDA, or whatever a :class:`DeviceCopier` claims) is copied into a pinned host
  buffer from a pool (reused across calls), on the copier's side stream; results are copied back
  on that stream, and the stream is synchronized before the torch Work completes, so whoever waits
  on the Work (any stream) reads finished data. A large contiguous tensor of an element-wise
  collective (all_reduce, broadcast) is cut into segments: segment k+1 is copied to the host while
  segment k is on the wire, and segment k is copied back while k+1 is on the wire.
- a **non-contiguous CPU tensor** gets one temporary contiguous copy, as Gloo makes, copied back
  into the caller's tensor when the collective finished.

The device is an interface (:class:`DeviceCopier`), so the staging logic runs in CI without a GPU:
tests install a copier whose "device" tensors are CPU tensors (see :func:`install_copier`).
"""
import threading

import torch

__all__ = ["DeviceCopier", "CudaCopier", "HostPool", "Staged", "install_copier", "copier_for", "any_needs_staging",
           "SEGMENT_BYTES"]

#: Segment size of the pipelined device <-> host copies (large enough that a copy costs far less
#: than the wire time of the same bytes, small enough to overlap most of both).
SEGMENT_BYTES = 4 << 20


class DeviceCopier:
    """What staging needs from a device: which tensors it owns, host buffers, asynchronous copies
    on a side stream with events, and a way to wait for them. :class:`CudaCopier` is the real one."""

    name = "device"

    def claims(self, tensor):
        raise NotImplementedError

    def host_buffer(self, nbytes):
        """A new host buffer (uint8, pinned where the device has pinned memory)."""
        raise NotImplementedError

    def to_host(self, src, dst):
        """Start copying device ``src`` into host ``dst`` (same shape) on the side stream, after
        the work already queued on the caller's stream; returns an event to :meth:`wait` for."""
        raise NotImplementedError

    def to_device(self, src, dst):
        """Start copying host ``src`` into device ``dst`` on the side stream."""
        raise NotImplementedError

    def wait(self, event):
        """Block the calling thread until ``event`` happened."""
        raise NotImplementedError

    def synchronize(self):
        """Block until every copy started so far finished."""
        raise NotImplementedError


class CudaCopier(DeviceCopier):
    """CUDA: pinned host memory, copies on one side stream per device."""

    name = "cuda"

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def claims(self, tensor):
        return tensor.device == self.device

    def host_buffer(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_host(self, src, dst):
        # The side stream first waits for what the caller queued (src may still be being written).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            src.record_stream(self.stream)  # the caching allocator keeps src until the copy ran
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def to_device(self, src, dst):
        with torch.cuda.stream(self.stream):
            dst.record_stream(self.stream)
            dst.copy_(src, non_blocking=True)

    def wait(self, event):
        event.synchronize()

    def synchronize(self):
        self.stream.synchronize()


_installed = []  # copiers tests install (checked first)
_cuda = {}       # device -> CudaCopier, made on first use
_lock = threading.Lock()


def install_copier(copier):
    """Make staging use ``copier`` for the tensors it claims (the CPU tests' fake device);
    ``install_copier(None)`` removes them all."""
    with _lock:
        if copier is None:
            _installed.clear()
        else:
            _installed.append(copier)


def copier_for(tensor):
    """The copier that owns ``tensor``, or None for a host tensor."""
    for c in _installed:
        if c.claims(tensor):
            return c
    if tensor.device.type != "cuda":
        return None
    with _lock:
        c = _cuda.get(tensor.device)
        if c is None:
            c = _cuda[tensor.device] = CudaCopier(tensor.device)
        return c


class HostPool:
    """Host buffers for one copier, reused across calls: a call takes one at least as large as it
    needs (or makes one) and gives it back when its collective finished."""

    def __init__(self, copier):
        self.copier = copier
        self.made = 0  # buffers ever allocated: stays flat in a steady training loop
        self._free = []
        self._lock = threading.Lock()

    def take(self, nbytes):
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # the smallest that fits (by index: tensors compare element-wise)
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            self.made += 1
        return self.copier.host_buffer(max(nbytes, 1))

    def give(self, buf):
        with self._lock:
            self._free.append(buf)


_pools = {}


def pool_for(copier):
    with _lock:
        pool = _pools.get(id(copier))
        if pool is None or pool.copier is not copier:
            pool = _pools[id(copier)] = HostPool(copier)
        return pool


def _host_view(buf, like):
    """``like``'s shape and dtype over the start of a uint8 host buffer (contiguous)."""
    nbytes = like.numel() * like.element_size()
    return buf[:nbytes].view(like.dtype).view(like.shape)


def needs_staging(t):
    return t.layout == torch.strided and (copier_for(t) is not None or not t.is_contiguous())


def any_needs_staging(args):
    """Whether any tensor in ``args`` (or in a list among them) needs staging: checked before a
    :class:`Staged` is built, so that a call on plain contiguous host tensors costs one pass."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if needs_staging(a):
                return True
        elif isinstance(a, list) and any_needs_staging(a):
            return True
    return False


class Staged:
    """One collective's staged arguments.

    ``role``: ``"inout"`` (in place: arg 0 is read and written), ``"out"`` (arg 0 is written, the
    rest read), ``"in"`` (every argument is read). ``segmented``: the method reduces or broadcasts
    each tensor of its arg-0 list on its own, so a large device tensor may be passed as a list of
    segments (the method's list form). :meth:`before_call` / :meth:`after_call` are called around
    each pycoll call the method starts (k-th call: k-th tensor of the list)."""

    def __init__(self, args, role, segmented=False, segment_bytes=None):
        self.role = role
        self._back = []      # (original, host): host copied into original when done
        self._held = []      # (pool, buffer) to give back
        self._events = []    # per segment, waited for in before_call
        self._segments = []  # (copier, host view, device view) per segment, for after_call
        self._copiers = set()
        self._pending = []   # (copier, event) of whole-tensor copies to the host
        self._orig_of = {}   # id(host stand-in) -> the caller's tensor
        self._seg_ids = set()
        self._copier_of = {}  # id(device segment view) -> its copier (views are not marked like their base)
        seg = segment_bytes or SEGMENT_BYTES
        self.args = list(args)
        first = self.args[0] if self.args else None
        if (segmented and isinstance(first, list) and len(first) == 1 and isinstance(first[0], torch.Tensor)
                and copier_for(first[0]) is not None and first[0].is_contiguous()
                and first[0].numel() * first[0].element_size() > seg):
            self.args[0] = self._segment(first[0], seg)
        for i, arg in enumerate(self.args):
            reads = role != "out" or i > 0
            writes = role != "in" and i == 0
            self.args[i] = self._replace(arg, reads, writes)
        for copier, event in self._pending:
            copier.wait(event)

    def __bool__(self):
        return bool(self._orig_of)

    def _stage(self, t, reads, writes):
        copier = copier_for(t)
        if copier is None:  # non-contiguous host tensor: one temporary contiguous copy
            host = t.contiguous() if reads else torch.empty_like(t, memory_format=torch.contiguous_format)
        else:
            pool = pool_for(copier)
            buf = pool.take(t.numel() * t.element_size())
            self._held.append((pool, buf))
            self._copiers.add(copier)
            host = _host_view(buf, t)
            if reads:
                self._pending.append((copier, copier.to_host(t, host)))
        if writes:
            self._back.append((t, host))
        self._orig_of[id(host)] = t
        return host

    def _replace(self, arg, reads, writes):
        if isinstance(arg, torch.Tensor):
            return self._stage(arg, reads, writes) if needs_staging(arg) else arg
        if isinstance(arg, list):
            return [self._replace(a, reads, writes) for a in arg]
        return arg

    def _segment(self, dev, seg):
        """Split a contiguous device tensor into segments over one pooled host buffer and start
        all their device-to-host copies (waited for one by one in before_call)."""
        copier = copier_for(dev)
        pool = pool_for(copier)
        nbytes = dev.numel() * dev.element_size()
        buf = pool.take(nbytes)
        self._held.append((pool, buf))
        self._copiers.add(copier)
        flat_host = buf[:nbytes].view(dev.dtype)
        flat_dev = dev.view(-1)
        step = max(1, seg // dev.element_size())
        hosts = []
        for start in range(0, dev.numel(), step):
            h, d = flat_host[start:start + step], flat_dev[start:start + step]
            self._events.append(copier.to_host(d, h) if self.role != "out" else None)
            self._segments.append((copier, h, d))
            self._copier_of[id(d)] = copier
            self._orig_of[id(h)] = dev
            self._seg_ids.add(id(h))
            hosts.append(h)
        return hosts

    def outputs(self, outputs):
        """``outputs`` (a Work's result) with each host stand-in replaced by the caller's tensor
        (the segments of one tensor by that tensor, once)."""
        out, segmented = [], set()
        for t in outputs:
            if isinstance(t, list):  # all_gather's outputs: a list per input
                out.append(self.outputs(t))
                continue
            orig = self._orig_of.get(id(t), t)
            if id(t) in self._seg_ids:
                if id(orig) in segmented:
                    continue
                segmented.add(id(orig))
            out.append(orig)
        return out

    def calls(self, n):
        """The method starts ``n`` pycoll calls. Segments pair with calls one to one; should a
        method ever start another number (one fused call over its list, say), every segment is
        waited for now and copied back whole at the end: slower, never wrong."""
        if self._segments and n != len(self._segments):
            for (copier, h, d), event in zip(self._segments, self._events):
                if event is not None:
                    copier.wait(event)
                self._back.append((d, h))
            self._segments, self._events = [], []

    def before_call(self, k):
        if k < len(self._events) and self._events[k] is not None:
            copier = self._segments[k][0]
            copier.wait(self._events[k])

    def after_call(self, k, pwork):
        """Copy segment k back to the device as soon as its collective finished, while the next
        segment is on the wire."""
        if k < len(self._segments) and self.role != "in":
            copier, h, d = self._segments[k]
            pwork.add_done_callback(lambda w: w.exception() is None and copier.to_device(h, d))

    def finish(self):
        """Copy results back into the caller's tensors and wait for every copy (called once the
        collective succeeded, before its Work completes)."""
        try:
            for orig, host in self._back:
                copier = self._copier_of.get(id(orig)) or copier_for(orig)
                if copier is None:
                    orig.copy_(host)
                else:
                    copier.to_device(host, orig)
            for copier in self._copiers:
                copier.synchronize()
        finally:
            self.release()

    def release(self):
        held, self._held = self._held, []
        for pool, buf in held:
            pool.give(buf)
