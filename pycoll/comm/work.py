"""Asynchronous collectives: :class:`Work` (the handle a user waits on) over a
:class:`concurrent.futures.Future`, and :class:`CallOrderExecutor`, the one thread that runs a
communicator's queued collectives in call order.

Why not ``ThreadPoolExecutor(max_workers=1)``: its thread is joined when the interpreter exits,
after every queued item ran. A queued collective whose peers are gone waits out its timeout first,
so a script that ends (or is stopped with Ctrl-C) with async work pending would hang for minutes.
Our thread is a daemon, and close() fails what is still queued.
"""
import collections
import concurrent.futures
import logging
import os
import queue
import threading

from pycoll.errors import CollectiveError, CollectiveTimeout

log = logging.getLogger("pycoll")


class Work:
    """The pending result of an ``*_async`` call.

    ``wait()`` blocks until the collective finished and returns its result (the output buffer), or
    raises the exception it failed with. ``future`` is the underlying
    :class:`concurrent.futures.Future` (``asyncio.wrap_future(work.future)`` awaits it).
    """

    def __init__(self, description="", future=None):
        self.description = description
        self.future = future if future is not None else concurrent.futures.Future()

    def complete(self, result=None, exc=None):
        """Mark the work done with its result, or the exception it failed with: called once,
        by whoever ran it (the torch backend, for work it finishes itself)."""
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def done(self):
        """True once the collective finished, successfully or not."""
        return self.future.done()

    def wait(self, timeout=None):
        """Block until done; return the result or raise the failure."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self.future.done():  # the collective itself raised a TimeoutError subclass
                raise
            raise CollectiveTimeout(f"{self.description or 'collective'} not finished after {timeout} s") from None

    def exception(self):
        """The failure, or None (None too while still running)."""
        return self.future.exception(0) if self.future.done() else None

    def add_done_callback(self, fn):
        """Call ``fn(work)`` when done (at once, in this thread, if already done). An exception
        raised by ``fn`` is logged, never passed on to whoever finished the work."""
        def call(_future):
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - logged; the work itself is finished
                log.exception("a done callback of %r failed", self)
        self.future.add_done_callback(call)

    def __repr__(self):
        state = "done" if self.done() else "pending"
        return f"<Work {self.description} {state}>"


class _WakeQueue:
    """queue.SimpleQueue's put/get/get_nowait, waking the getter from outside the GIL.

    SimpleQueue.put wakes a waiting getter while the putter holds the GIL. On a busy host the
    woken getter often takes the putter's core at once, finds the GIL taken and sleeps again,
    and the putter, descheduled while holding it, waits for a time slice: handing DDP's last
    bucket to the worker took 1.6-4.7 ms next to two busy loops (0.1-0.2 ms idle). Here the
    getter sleeps in an eventfd read, and put() rings it with os.eventfd_write, a system call
    made with the GIL released: a getter that takes the core then also gets the GIL and starts
    the collective. (os.eventfd: Linux, Python 3.10, what pycoll runs on anyway.) get() waits
    without a deadline, as the worker's idle wait did on SimpleQueue: shutdown rings it."""

    def __init__(self):
        self._items = collections.deque()
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)
        # put() rings after it appended, and the getter may take the item (shutdown's None)
        # and close the eventfd in between: the lock makes close() wait for that ring, which
        # would otherwise hit a closed fd (EBADF) or whatever file took its number since
        self._ring = threading.Lock()

    def put(self, item):
        with self._ring:
            self._items.append(item)  # deque.append/popleft are atomic
            os.eventfd_write(self._fd, 1)

    def get(self):
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                pass
            # the counter keeps every ring since the last read: an item put after the look
            # above returns at once from here, so no wake-up is lost
            try:
                os.eventfd_read(self._fd)
            except InterruptedError:
                pass

    def get_nowait(self):
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    def close(self):
        """Release the eventfd: called by the getter once it stopped getting (or by the owner
        when no getter ever ran); a put() after it is a bug."""
        with self._ring:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class CallOrderExecutor(concurrent.futures.Executor):
    """Runs submitted functions one at a time, in submission order, on one daemon thread that
    starts with the first submission. ``shutdown()`` fails what is still queued with
    CollectiveError (the closed communicator's word), never leaving a waiter hanging."""

    def __init__(self, name="pycoll-worker", on_done=None):
        self._name = name
        self._on_done = on_done  # called (in the worker) after each item, before its future completes
        self._queue = _WakeQueue()
        self._lock = threading.Lock()
        self._thread = None
        self._closed = False

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                break
            future, fn, args, kwargs = item
            del item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result, exc = fn(*args, **kwargs), None
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                result, exc = None, e
            del fn, args, kwargs  # the caller's memory is theirs again before anyone wakes
            if self._on_done is not None:
                self._on_done()
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, result, exc
        self._fail_queued()
        self._queue.close()

    def _fail_queued(self):
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                if self._on_done is not None:
                    self._on_done()
                if item[0].set_running_or_notify_cancel():
                    item[0].set_exception(CollectiveError("communicator is closed: the call was queued and never ran"))
                del item  # its arguments (pinned buffers) go with it

    @property
    def thread_id(self):
        """The worker thread's ident (None before the first submission)."""
        thread = self._thread
        return thread.ident if thread is not None else None

    def shutdown(self, wait=True, *, cancel_futures=True, timeout=None):
        """Stop after the call now running; calls still queued fail (CollectiveError), never
        hang. ``wait``: join the thread (at most ``timeout`` seconds). ``cancel_futures`` is
        accepted for Executor's signature; queued calls always fail here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._fail_queued()
        if thread is None:  # no worker ever started: nobody else holds the queue
            self._queue.close()
            return
        self._queue.put(None)  # the worker closes the queue when it reads this
        if wait and thread is not threading.current_thread():
            thread.join(timeout)
