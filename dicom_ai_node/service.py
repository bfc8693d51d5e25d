"""The node: wires receive -> assemble -> route -> execute -> dispatch through the job store.

The only module that imports every stage. Each stage runs in its own thread and talks to the next only
through the job store, so a crash anywhere resumes from the last committed state on restart.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from dicom_ai_node.assemble import SeriesComplete, SeriesProgress, series_completion
from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import OUTBOX, ConfigError, NodeConfig
from dicom_ai_node.dispatch import Dispatcher
from dicom_ai_node.jobs.executor import JobSpec, LocalExecutor
from dicom_ai_node.jobs.store import JobStore, SeriesRow
from dicom_ai_node.pipeline import Manifest, discover
from dicom_ai_node.receive.scp import Receiver
from dicom_ai_node.route import assignments, route

log = logging.getLogger("dicom_ai_node.service")

POLL_S = 0.25
JOB_LEASE_S = 3600.0


def load_pipelines(config: NodeConfig) -> dict[str, Manifest]:
    """Every pipeline manifest in the configured folders; every pipeline a rule names must exist."""
    manifests = discover([Path(f) for f in config.pipeline_folders])
    for i, rule in enumerate(config.rules):
        for name in rule.pipelines:
            if name not in manifests:
                raise ConfigError(
                    f"rules[{i}] ({rule.name}): pipeline {name!r} not found in "
                    f"{', '.join(str(f) for f in config.pipeline_folders)} (known: {sorted(manifests)})"
                )
    return manifests


def default_destinations(config: NodeConfig, calling_ae: str) -> list[str]:
    """Results go back to the sender when it is a configured peer, else to the outbox folder."""
    return [calling_ae] if config.peer(calling_ae) is not None else [OUTBOX]


def plan_jobs(config: NodeConfig, series: SeriesRow) -> tuple[list[tuple[str, str, list[str]]], str]:
    """The jobs (pipeline, rule, destinations) a complete series gets, and a note saying why."""
    decisions = route(config.rules, series.header, series.calling_ae)
    chosen = assignments(decisions)
    jobs = [
        (a.pipeline, a.rule, list(a.destinations) if a.destinations is not None
         else default_destinations(config, series.calling_ae))
        for a in chosen
    ]
    if jobs:
        note = "routed by " + ", ".join(sorted({a.rule for a in chosen}))
    else:
        note = "no rule fired: " + "; ".join(
            f"{d.rule}: " + ", ".join(f"{o.key} is {o.actual}" for o in d.outcomes if not o.holds)
            for d in decisions
        )
    return jobs, note


class NodeService:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        for folder in (config.node.data_dir, config.spool_dir, config.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.manifests = load_pipelines(config)
        self.store = JobStore(config.db_path)
        self.audit = AuditLog(config.audit_path)
        self.receiver = Receiver(config, self.store, self.audit)
        self.dispatcher = Dispatcher(config, self.store, self.audit)
        self.executor: LocalExecutor | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        requeued = self.store.requeue_running()
        if requeued:
            log.info("recovered %d job(s) left running by the previous process", requeued)
        self.receiver.start()
        self.executor = LocalExecutor(self.config, self.manifests)
        loops = [("assemble", self._assemble_loop), ("dispatch", self._dispatch_loop)]
        # One thread per worker process feeds it jobs and records their outcome in the store.
        loops += [(f"worker-{i}", self._worker_loop) for i in range(self.executor.workers)]
        for name, target in loops:
            thread = threading.Thread(target=self._guarded, args=(name, target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.receiver.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.executor is not None:
            self.executor.shutdown()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self.stop()

    def _guarded(self, name: str, loop) -> None:
        # A stage loop must outlive any single bad series, job or destination: log and carry on.
        while not self._stop.is_set():
            try:
                if not loop():
                    self._stop.wait(POLL_S)
            except Exception:  # noqa: BLE001
                log.exception("%s loop error; continuing", name)
                self._stop.wait(1.0)

    def _assemble_loop(self) -> bool:
        now = time.time()
        for series in self.store.series_in_state("receiving"):
            progress = SeriesProgress(series.series_uid, series.instances, series.first_received, series.last_received)
            decision = series_completion(progress, now, self.config.completion.quiet_period_s)
            if isinstance(decision, SeriesComplete):
                jobs, note = plan_jobs(self.config, series)
                if self.store.route_series(series, jobs, note):
                    log.info("series %s complete (%s); %s", series.series_uid, decision.reason, note)
                    self.audit.write("series-routed", series_uid=series.series_uid, study_uid=series.study_uid,
                                     instances=series.instances, jobs=[j[0] for j in jobs], note=note)
        return False

    def _worker_loop(self) -> bool:
        job = self.store.claim_job(JOB_LEASE_S)
        if job is None:
            return False
        assert self.executor is not None
        paths = self.store.instance_paths(job.series_uid)
        log.info("job %d: %s on series %s (%d instances)", job.id, job.pipeline, job.series_uid, len(paths))
        try:
            outcome = self.executor.submit(JobSpec(job.id, job.pipeline, tuple(paths))).result()
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; the node carries on
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d failed: %s", job.id, reason)
            self.store.fail_job(job.id, reason)
            self.audit.write("job-failed", job_id=job.id, series_uid=job.series_uid, pipeline=job.pipeline,
                             error=reason)
            return True
        manifest = self.manifests[job.pipeline]
        files = outcome.files
        self.store.finish_job(job.id, [(f.sop_uid, f.sop_class_uid, str(f.path)) for f in files], job.destinations)
        log.info("job %d done in %s", job.id, ", ".join(f"{k} {v:.2f}s" for k, v in outcome.stages.items()))
        self.audit.write("job-done", job_id=job.id, series_uid=job.series_uid, pipeline=manifest.name,
                         pipeline_version=manifest.version, results=[f.sop_uid for f in files],
                         destinations=job.destinations)
        return True

    def _dispatch_loop(self) -> bool:
        return self.dispatcher.run_once() > 0
