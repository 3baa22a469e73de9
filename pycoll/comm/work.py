"""Handles for asynchronous collectives."""
import logging
import threading

from pycoll.errors import CollectiveTimeout


class Work:
    """The pending result of an ``*_async`` call.

    ``wait()`` blocks until the collective finished and returns its result
    (the output buffer), or raises the exception it failed with.
    """

    def __init__(self, description=""):
        self.description = description
        self._done = threading.Event()
        self._result = None
        self._exc = None
        self._callbacks = []
        self._lock = threading.Lock()

    def complete(self, result=None, exc=None):
        """Mark the work done with its result, or the exception it failed with: called once,
        by whoever ran it (the communicator's worker thread, the torch backend)."""
        with self._lock:
            self._result, self._exc = result, exc
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._run_callback(cb)

    def _run_callback(self, cb):
        # A callback's error must not escape into whoever finished the work (pycoll's
        # worker thread: it would die, and every later async call would hang).
        try:
            cb(self)
        except Exception:  # noqa: BLE001 - logged; the work itself is finished
            logging.getLogger("pycoll").exception("a done callback of %r failed", self)

    def done(self):
        """True once the collective finished, successfully or not."""
        return self._done.is_set()

    def wait(self, timeout=None):
        """Block until done; return the result or raise the failure."""
        if not self._done.wait(timeout):
            raise CollectiveTimeout(f"{self.description or 'collective'} not finished after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self):
        """The failure, or None (only meaningful once done)."""
        return self._exc

    def add_done_callback(self, fn):
        """Call ``fn(work)`` when done (at once if already done)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def __repr__(self):
        state = "done" if self.done() else "pending"
        return f"<Work {self.description} {state}>"
