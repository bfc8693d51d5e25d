"""Group commit for received instances: the last two flushes before a C-STORE is answered, shared.

Before an instance is acknowledged its file is fdatasynced (by its own association thread, so several run
at once), then its folder is fsynced (the new name) and its row committed (an fsync of the SQLite WAL).
Those last two are shared: the first association thread that reaches them becomes the leader, fsyncs each
distinct folder of everything pending once, records all pending rows in one transaction, and releases the
others; instances that arrive meanwhile are taken together by the next leader. With one association
nothing waits (no timer, no extra thread); with several, one flush serves many.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
from dicom_ai_node.spool import fsync_dir


@dataclass
class _Pending:
    folder: Path
    instance: ReceivedInstance
    done: bool = False
    outcome: bool | BaseException = False


class GroupCommit:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._leading = False
        self.batches = 0  # for the benchmark: commits done, against instances recorded
        self.recorded = 0

    def commit(self, folder: Path, instance: ReceivedInstance) -> bool:
        """Make `folder`'s entries durable and record `instance`; returns when both are on disk (True when
        the instance re-opened a processed series), raises what prevented it."""
        mine = _Pending(folder, instance)
        batch: list[_Pending] = []
        with self._cond:
            self._pending.append(mine)
            while not mine.done and self._leading:
                self._cond.wait()
            if not mine.done:
                self._leading = True
                batch, self._pending = self._pending, []
        if batch:
            try:
                self._flush(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if isinstance(mine.outcome, BaseException):
            raise mine.outcome
        return mine.outcome

    def _flush(self, batch: list[_Pending]) -> None:
        failed: dict[Path, BaseException] = {}
        for folder in dict.fromkeys(p.folder for p in batch):
            try:
                fsync_dir(folder)
            except OSError as exc:
                failed[folder] = exc
        to_record = [p for p in batch if p.folder not in failed]
        try:
            outcomes: list[bool | BaseException] = list(self.store.record_instances([p.instance for p in to_record]))
        except BaseException as exc:  # noqa: BLE001 - every waiting C-STORE gets the error
            outcomes = [exc] * len(to_record)
        with self._cond:
            for pending in batch:
                if pending.folder in failed:
                    pending.outcome = failed[pending.folder]
            for pending, outcome in zip(to_record, outcomes):
                pending.outcome = outcome
            for pending in batch:
                pending.done = True
            self.batches += 1
            self.recorded += len(batch)
