"""A compressor's exchanges run one at a time on a thread of their own, so a comm hook returns at once.

A DDP comm hook must return a future; DDP overlaps whatever that future waits for with the rest of
backward. A compressed exchange is several *dependent* collectives (PowerSGD: all-reduce ``P``,
orthogonalize, all-reduce ``Q``), with compression work between them. torch's own PowerSGD hook chains
them with ``Future.then``; we do not, because of how gloo completes work:

- on NCCL a ``then`` callback runs in the thread that enqueued the collective, so every rank issues the
  next collective in program order;
- gloo completes work on its own worker threads and numbers each collective when it is *issued*. With
  ``then``, bucket *k*'s second collective is issued from a gloo thread while the autograd thread issues
  bucket *k+1*'s first one; the two race, the order differs between ranks, and unrelated buffers get
  paired (a size-mismatch error, or silently wrong sums when the sizes agree).

So each compressor owns one FIFO thread (:class:`ExchangeQueue`) that runs whole exchanges in the order
the hooks submitted them. DDP calls hooks in bucket order on every rank, so every rank issues every
collective in the same order, and the hook's future completes when the exchange's last collective has.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["ExchangeQueue"]

T = TypeVar("T")

_STOP = object()


class ExchangeQueue:
    """Runs submitted functions one at a time, in submission order, on one daemon thread.

    The thread starts with the first :meth:`submit`. A function's exception is set on its future (and
    raised where the future is waited on); the thread keeps serving the next functions.

    Args:
        name: the thread's name (shown in stack dumps, e.g. by a hang detector).

    Example::

        exchanges = ExchangeQueue("powersgd-exchange")
        future = exchanges.submit(lambda: compressor.reduce_("bucket0", grads, group))
        ...                                    # backward goes on
        future.wait()
    """

    def __init__(self, name: str = "lit-parallel-exchange") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T], device: torch.device | None = None) -> torch.futures.Future[T]:
        """Queue ``fn``; the returned future completes with its result once it has run.

        Args:
            fn: the exchange (issues its collectives synchronously).
            device: the device of the tensors ``fn`` works on. For CUDA the thread selects that device and
                waits for the work queued so far on the caller's current stream (the gradients ``fn``
                reads), and the future completes only once ``fn``'s kernels have finished.
        """
        future: torch.futures.Future[T] = torch.futures.Future()
        ready = None
        if device is not None and device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put((fn, future, device, ready))
        return future

    def drain(self) -> None:
        """Wait until every function submitted so far has run (their exceptions are not raised here)."""
        if self._thread is not None and self._thread.is_alive():
            self.submit(lambda: None).wait()

    def close(self) -> None:
        """Run what is queued, then stop the thread (a later :meth:`submit` starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive():
                self._jobs.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, future, device, ready = job
            try:
                if ready is not None:
                    torch.cuda.set_device(device)  # the current device is per thread
                    torch.cuda.current_stream(device).wait_event(ready)
                result = fn()
                if ready is not None:
                    torch.cuda.current_stream(device).synchronize()
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(result)
