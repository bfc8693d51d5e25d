"""A worker's helper process for highdicom's read-back of its result objects (part of the validation gate).

The read-back parses an object's file bytes and has highdicom construct it again: pure Python, ~55 ms for
a 168-frame SEG. In the worker it would take turns on the GIL with building and encoding the next object;
in a helper process it runs beside them on another core (validate.gate waits for its answer before the job
ends, so nothing is sent that it has not read back). Once the helper fails (it died, or could not start),
that object and every later one are read back in the worker itself, as without a helper: the check is
always made.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading

from dicom_ai_node.results.validate import DeferredCheck, encoded_readback_problems
from dicom_ai_node.runtime.allocator import freeze_long_lived_objects

log = logging.getLogger("dicom_ai_node.jobs.readback")


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when its parent does (a worker must not outlive the node, nor a helper its
    worker: it would keep working for nobody)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died while this process was still starting
        os._exit(1)


def _init_helper(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when its helper stops


def _warm_up() -> None:
    encoded_readback_problems("SC", "", b"")  # imports highdicom and pydicom's readers
    freeze_long_lived_objects()  # what the imports made stays: later collections need not walk it


class ReadBackProcess:
    """validate.ReadBack in one helper process, started at once so that its imports are done by the first job."""

    def __init__(self) -> None:
        self._pool: cf.ProcessPoolExecutor | None = cf.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_helper,
            initargs=(os.getpid(),))
        self._pool.submit(_warm_up)  # start it, and import highdicom there
        # A worker process joins its children when it exits, before its thread shutdown would stop this pool:
        # stop it first, in an exit finalizer that runs before the pool's queues close theirs (priority 10).
        multiprocessing.util.Finalize(self, self._pool.shutdown, kwargs={"cancel_futures": True}, exitpriority=100)
        self._lock = threading.Lock()
        self._pending = 0  # objects handed to the helper and not answered yet

    def __call__(self, kind: str, sop_class_uid: str, encoded: bytes) -> "cf.Future[list[str]]":
        with self._lock:
            busy = self._pending > 0
            if not busy:
                self._pending += 1
        if busy:
            # The helper still reads back an earlier object (a SEG takes it ~0.1 s): this one is read back
            # here instead of waiting behind it (an SR or an SC takes the worker a few ms), when the gate
            # first asks for its answer: by then the worker has built the objects after it, and would
            # otherwise only wait for the helper.
            return DeferredCheck(lambda: encoded_readback_problems(kind, sop_class_uid, encoded))
        answer: cf.Future[list[str]] = cf.Future()
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("no read-back helper")
            remote = pool.submit(encoded_readback_problems, kind, sop_class_uid, encoded)
        except RuntimeError:  # no helper, or its pool is broken
            self._settled()
            answer.set_result(self._here(kind, sop_class_uid, encoded))
            return answer

        def settle(done: "cf.Future[list[str]]") -> None:
            self._settled()
            try:
                answer.set_result(done.result())
            except Exception:  # noqa: BLE001 - the helper failed, not the check: make it here
                answer.set_result(self._here(kind, sop_class_uid, encoded))

        remote.add_done_callback(settle)
        return answer

    def _settled(self) -> None:
        with self._lock:
            self._pending -= 1

    def _here(self, kind: str, sop_class_uid: str, encoded: bytes) -> list[str]:
        """Read back in this process, from now on (a helper that failed once is not trusted again)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            log.warning("read-back helper failed: reading results back in the worker from now on")
            pool.shutdown(wait=False, cancel_futures=True)
        return encoded_readback_problems(kind, sop_class_uid, encoded)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
