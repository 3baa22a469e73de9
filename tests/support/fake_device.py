"""A fake device for the torch backend's staging (pycoll/torch/staging.py), so CI runs the CUDA
path without a GPU: "device" tensors are CPU tensors marked with :func:`on_device`, and the side
stream is a thread that runs the copies in order, each a little late, as a real stream would. A
staging bug that reads a host buffer before its copy landed (or completes a Work before the copy
back did) then shows as a wrong result, not only as a wrong log."""
import queue
import threading
import time

import torch

from pycoll.torch.staging import DeviceCopier


def on_device(t):
    """Mark ``t`` as living on the fake device; returns it."""
    t.fake_device = True
    return t


class FakeCopier(DeviceCopier):
    name = "fake"

    def __init__(self, delay=0.002):
        self.delay = delay
        self.log = []  # ("to_host" | "to_device", numel), in the order the stream ran them
        self.buffers = 0
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._stream, daemon=True, name="fake-side-stream")
        self._thread.start()

    def claims(self, tensor):
        return getattr(tensor, "fake_device", False)

    def host_buffer(self, nbytes):
        self.buffers += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def _enqueue(self, kind, src, dst):
        done = threading.Event()
        self._queue.put((kind, src, dst, done))
        return done

    def _stream(self):
        while True:
            kind, src, dst, done = self._queue.get()
            time.sleep(self.delay)
            dst.copy_(src)
            self.log.append((kind, src.numel()))
            done.set()

    def to_host(self, src, dst):
        return self._enqueue("to_host", src, dst)

    def to_device(self, src, dst):
        self._enqueue("to_device", src, dst)

    def wait(self, event):
        if not event.wait(30):
            raise TimeoutError("fake device copy did not run")

    def synchronize(self):
        self.wait(self._enqueue("sync", torch.empty(0), torch.empty(0)))
