"""Batch jobs on their schedules inside `dicom-ai-node serve` (apscheduler).

A job runs at most once at a time: a run that would start while the previous one still pulls is skipped
(apscheduler's max_instances), and runs missed while the node was down are made up by one run (coalesce).
"""
from __future__ import annotations

import logging
import threading

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from dicom_ai_node.config import BatchJob
from dicom_ai_node.worklist.batch import BatchError, BatchRunner

log = logging.getLogger("dicom_ai_node.worklist")


def trigger_of(job: BatchJob) -> BaseTrigger | None:
    """When `job` runs by itself: its cron line (local time) or interval; None: only on command."""
    if job.cron is not None:
        return CronTrigger.from_crontab(job.cron)
    if job.every_minutes is not None:
        return IntervalTrigger(seconds=job.every_minutes * 60)
    return None


class BatchScheduler:
    def __init__(self, runner: BatchRunner, jobs: list[BatchJob]) -> None:
        self.runner = runner
        self.jobs = [job for job in jobs if trigger_of(job) is not None]
        self._stop = threading.Event()
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        if not self.jobs:
            return
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=min(len(self.jobs), 4))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        for job in self.jobs:
            self._scheduler.add_job(self._run, trigger_of(job), args=[job.name], id=job.name, name=f"batch {job.name}")
        self._scheduler.start()
        for scheduled in self._scheduler.get_jobs():
            log.info("batch job %s: next run at %s", scheduled.id, scheduled.next_run_time)

    def stop(self) -> None:
        """End running pulls (their studies are pulled by the next run) and stop scheduling."""
        self._stop.set()
        self.runner.abort_active()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _run(self, name: str) -> None:
        try:
            self.runner.run(name, trigger="schedule", stop=self._stop)
        except BatchError as exc:
            log.warning("batch job %s not started: %s", name, exc)
