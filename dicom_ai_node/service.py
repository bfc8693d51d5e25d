"""The node: wires receive -> assemble -> route -> execute -> dispatch through the job store, and the batch
jobs that pull studies from a PACS into receive (worklist/).

The only module that imports every stage. Each stage runs in its own thread and talks to the next only
through the job store, so a crash anywhere resumes from the last committed state on restart.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_ai_node.assemble import (
    COUNT_HINT_KEYS,
    CompletionPolicy,
    SeriesComplete,
    SeriesProgress,
    StudyReady,
    StudyRequirement,
    StudyRule,
    StudyTimedOut,
    StudyWaiting,
    count_hint_projection,
    decode_ahead_at,
    expected_instance_count,
    series_completion,
    study_completion,
)
from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import OUTBOX, ConfigError, NodeConfig
from dicom_ai_node.dispatch import Dispatcher
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.imaging.volume import VolumeError
from dicom_ai_node.jobs.executor import (
    REFUSALS,
    Executor,
    JobSpec,
    LocalExecutor,
    OutputProfile,
    ResultFile,
    refusal_reasons,
)
from dicom_ai_node.jobs.store import InstanceRow, JobRow, JobStore, PlannedJob, SeriesRow
from dicom_ai_node.pipeline import Manifest, discover
from dicom_ai_node.runtime.device import DeviceBusy
from dicom_ai_node.receive.journal import recover_other_journals
from dicom_ai_node.receive.pool import ReceiverPool
from dicom_ai_node.receive.scp import Receiver
from dicom_ai_node.route import header_values, parse_condition, route
from dicom_ai_node.worklist.batch import BatchRunner
from dicom_ai_node.worklist.schedule import BatchScheduler

log = logging.getLogger("dicom_ai_node.service")

POLL_S = 0.25
DEVICE_BUSY_RETRY_S = 10.0  # a job the device had no memory for is tried again after this
JOB_LEASE_S = 3600.0
RETENTION_EVERY_S = 600.0
JOURNAL_SWEEP_EVERY_S = 60.0  # how often journals abandoned by a pull that died are looked for
JOURNAL_MIN_AGE_S = 10.0  # younger: maybe a pull's that has made its journal and not yet locked it
MAX_WORKER_CRASHES = 3  # a job whose worker process died this often is failed, not retried again


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


def completion_policy(config: NodeConfig) -> CompletionPolicy:
    c = config.completion
    return CompletionPolicy(
        quiet_period_s=c.quiet_period_s,
        modality_quiet_period_s=dict(c.modality_quiet_period_s),
        after_release_s=c.after_release_s,
        settle_s=c.settle_s,
        max_wait_s=c.max_wait_s,
    )


def study_rules(config: NodeConfig) -> dict[str, StudyRule]:
    return {
        study.name: StudyRule(
            study.name, tuple(StudyRequirement(r.name, r.match) for r in study.requires), study.timeout_s,
            study.on_timeout,
        )
        for study in config.completion.studies
    }


def series_progress(series: SeriesRow, headers: Sequence[Mapping[str, Any]], config: NodeConfig) -> SeriesProgress:
    """What the completion decision needs of a series: counts, times, hints and rule overrides. `headers`:
    the instances' headers, or only their distinct count-hint projections (CountHintHeaders)."""
    firing = {d.rule for d in route(config.rules, series.header, series.calling_ae) if d.fires}
    rule_quiet = [r.quiet_period_s for r in config.rules if r.name in firing and r.quiet_period_s is not None]
    return SeriesProgress(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        modality=series.modality,
        instances=series.instances,
        first_received=series.first_received,
        last_received=series.last_received,
        expected_instances=expected_instance_count(headers, series.expected_instances),
        released_at=series.released_at,
        rule_quiet_period_s=max(rule_quiet) if rule_quiet else None,
    )


def study_outcomes(
    config: NodeConfig, store: JobStore, studies: dict[str, StudyRule], series: SeriesRow, now: float,
) -> dict[str, StudyReady | StudyWaiting | StudyTimedOut]:
    """The study-level decision of every study rule that a firing rule of this (complete) series names."""
    firing = {d.rule for d in route(config.rules, series.header, series.calling_ae) if d.fires}
    wanted = {r.study for r in config.rules if r.name in firing and r.study is not None}
    if not wanted:
        return {}
    study_series = store.series_of_study(series.study_uid)
    complete = [(s.header, s.series_uid == series.series_uid or s.state != "receiving") for s in study_series]
    first = min(s.first_received for s in study_series)
    return {name: study_completion(studies[name], complete, first, now) for name in wanted}


def default_destinations(config: NodeConfig, calling_ae: str) -> list[str]:
    """Results go back to the sender when it is a configured peer, else to the outbox folder."""
    return [calling_ae] if config.peer(calling_ae) is not None else [OUTBOX]


def forward_selection(rule, instances: list[InstanceRow]) -> tuple[str, ...]:
    """SOP Instance UIDs of the instances that pass the rule's forward_filter (all when it has none)."""
    conditions = [parse_condition(key, spec) for key, spec in rule.forward_filter.items()]
    return tuple(
        i.sop_uid for i in instances
        if all(c.test(header_values({**i.header, "SOPClassUID": i.sop_class_uid}, c.key)) for c in conditions)
    )


def plan_jobs(
    config: NodeConfig, series: SeriesRow, instances: list[InstanceRow], failed_studies: dict[str, str] | None = None,
) -> tuple[list[PlannedJob], str]:
    """The jobs a complete series gets (each pipeline at most once, from the highest-priority rule naming
    it; one forward job per forwarding rule), and a note saying why. Rules whose study-level wait failed
    (`failed_studies`: study name -> reason) do not run."""
    failed_studies = failed_studies or {}
    decisions = route(config.rules, series.header, series.calling_ae)
    rules = {rule.name: rule for rule in config.rules}
    jobs: list[PlannedJob] = []
    skipped: list[str] = []
    planned_pipelines: set[str] = set()
    for decision in decisions:
        if not decision.fires:
            continue
        rule = rules[decision.rule]
        if rule.study in failed_studies:
            skipped.append(f"{rule.name}: {failed_studies[rule.study]}")
            continue
        if rule.processes:
            destinations = list(rule.destinations) if rule.destinations is not None else default_destinations(
                config, series.calling_ae)
            for name in rule.pipelines:
                if name not in planned_pipelines:
                    planned_pipelines.add(name)
                    jobs.append(PlannedJob("pipeline", name, rule.name, destinations))
        if rule.forwards:
            jobs.append(PlannedJob("forward", f"forward:{rule.name}", rule.name, list(rule.forward_to),
                                   forward_selection(rule, instances)))
    if jobs:
        note = "routed by " + ", ".join(sorted({j.rule for j in jobs}))
    elif skipped:
        note = "not run: " + "; ".join(skipped)
    else:
        note = "no rule fired: " + "; ".join(
            f"{d.rule}: " + ", ".join(f"{o.key} is {o.actual}" for o in d.outcomes if not o.holds)
            for d in decisions
        )
    return jobs, note


def output_profile(config: NodeConfig, destination: str) -> OutputProfile:
    peer = config.peer(destination)
    return OutputProfile() if peer is None else OutputProfile(peer.seg_type, peer.sr_profile)


def result_sends(config: NodeConfig, files: list[ResultFile], destinations: list[str]) -> list[tuple[str, str, str, str]]:
    """(sop_uid, sop_class_uid, path, destination) for each result a destination takes: a kind it accepts,
    written in its profile."""
    sends = []
    for destination in destinations:
        peer = config.peer(destination)
        profile = output_profile(config, destination)
        for f in files:
            if profile in f.profiles and (peer is None or peer.accepts is None or f.kind in peer.accepts):
                sends.append((f.sop_uid, f.sop_class_uid, str(f.path), destination))
    return sends


def content_header(paths: list[Path]) -> dict[str, object]:
    """Content labels computed from the series' pixels, as header keys rules can match (see config)."""
    from dicom_ai_node.imaging.content import classify_ct  # only nodes whose rules use content labels need it

    try:
        volume = load_series(paths)
    except (VolumeError, OSError) as exc:
        log.warning("content labels not computed: %s", exc)
        return {"ContentBodyRegion": "unknown", "ContentBodyRegions": []}
    return classify_ct(volume).as_header()


def make_executor(config: NodeConfig, manifests: dict[str, Manifest]) -> Executor:
    if config.workers.executor == "ray":
        try:
            from dicom_ai_node.jobs.ray_executor import RayExecutor  # ray is an optional extra
        except ImportError as exc:
            raise ConfigError(f"workers.executor: ray: {exc}") from exc
        return RayExecutor(config, manifests, config.workers.ray_address)
    return LocalExecutor(config, manifests)


class CountHintHeaders:
    """Per receiving series, the distinct count-hint projections of its headers, read incrementally: the
    assemble loop looks at every receiving series several times a second, and re-reading all of a
    4000-slice series' headers each time cost ~45 ms a poll (a fifth of a core while it streams in)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._known: dict[str, tuple[int, int, set[str]]] = {}  # series -> (revision, last rowid, projections)

    def of(self, series: SeriesRow) -> list[dict[str, Any]]:
        revision, last, seen = self._known.get(series.series_uid, (series.revision, 0, set()))
        if revision != series.revision:  # re-opened by a late instance: start again
            revision, last, seen = series.revision, 0, set()
        last, found = self.store.count_hints_since(series.series_uid, last, COUNT_HINT_KEYS)
        for values in found:
            seen.add(count_hint_projection({k: v for k, v in zip(COUNT_HINT_KEYS, values) if v is not None}))
        self._known[series.series_uid] = (revision, last, seen)
        return [json.loads(p) for p in sorted(seen)]

    def forget(self, series_uid: str) -> None:
        self._known.pop(series_uid, None)


class NodeService:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        for folder in (config.node.data_dir, config.spool_dir, config.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.manifests = load_pipelines(config)
        self.store = JobStore(config.db_path)
        self.audit = AuditLog(config.audit_path)
        self.receiver: Receiver | ReceiverPool = (
            ReceiverPool(config, self.store, config.node.receive_processes)
            if config.node.receive_processes > 1 else Receiver(config, self.store, self.audit))
        self.dispatcher = Dispatcher(config, self.store, self.audit)
        self.batch = BatchScheduler(BatchRunner(config, self.store, self.audit), config.batch)
        self.completion = completion_policy(config)
        self._count_hints = CountHintHeaders(self.store)
        self._decoded_ahead: dict[str, tuple[int, int, float]] = {}  # series -> (revision, instances, last)
        self.studies = study_rules(config)
        self.executor: Executor | None = None
        self._executor_lock = threading.Lock()
        self._stop = threading.Event()
        # Wake-ups between stages, so that work handed on does not wait for the next poll: routing a series
        # wakes the worker threads, a finished job the dispatcher. Each loop still polls every POLL_S.
        self._work_queued = threading.Event()
        self._sends_queued = threading.Event()
        self._assemble_wake = threading.Event()  # set only by stop(): the assemble loop sleeps to deadlines
        self._assemble_idle_s = POLL_S  # until the earliest completion deadline of a receiving series
        self._threads: list[threading.Thread] = []
        self._next_retention = 0.0
        self._next_journal_sweep = time.time() + JOURNAL_SWEEP_EVERY_S  # the receiver swept them at start

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        removed = remove_partial_writes(self.config.spool_dir)
        if removed:
            log.info("removed %d partial spool file(s) left by the previous process", removed)
        requeued = self.store.requeue_running()
        if requeued:
            log.info("recovered %d job(s) left running by the previous process", requeued)
        self.executor = make_executor(self.config, self.manifests)
        self.receiver.start()
        def poll_s() -> float:
            return POLL_S

        loops = [("assemble", self._assemble_loop, self._assemble_wake, lambda: self._assemble_idle_s),
                 ("dispatch", self._dispatch_loop, self._sends_queued, poll_s)]
        # One thread per worker feeds it jobs and records their outcome in the store.
        loops += [(f"worker-{i}", self._worker_loop, self._work_queued, poll_s) for i in range(self.executor.workers)]
        for name, target, wake, idle_s in loops:
            thread = threading.Thread(target=self._guarded, args=(name, target, wake, idle_s), name=name,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        self.batch.start()  # pulls arrive through the receiver, which is listening by now

    def stop(self) -> None:
        self._stop.set()
        self.batch.stop()
        for wake in (self._work_queued, self._sends_queued, self._assemble_wake):
            wake.set()
        self.receiver.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        self.dispatcher.shutdown()
        if self.executor is not None:
            self.executor.shutdown()
            # Its pool's locks are released when the objects are, not at exit (where the resource tracker
            # would report them as leaked): let go of them now.
            self.executor = None
            gc.collect()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Make serve_forever stop the node (from a signal handler: it only sets an event)."""
        self._stop.set()

    def _guarded(self, name: str, loop, wake: threading.Event, idle_s) -> None:
        # A stage loop must outlive any single bad series, job or destination: log and carry on.
        # An idle loop sleeps idle_s() (POLL_S; the assemble loop: until its next deadline), or until `wake`
        # is set (cleared before each pass, so that no wake-up set after the pass looked for work is lost).
        while not self._stop.is_set():
            try:
                wake.clear()
                if not loop():
                    wake.wait(idle_s())
            except Exception:  # noqa: BLE001
                log.exception("%s loop error; continuing", name)
                self._stop.wait(1.0)

    def _assemble_loop(self) -> bool:
        now = time.time()
        idle_s = POLL_S
        for series in self.store.series_in_state("receiving"):
            progress = series_progress(series, self._count_hints.of(series), self.config)
            decision = series_completion(progress, now, self.completion)
            if not isinstance(decision, SeriesComplete):
                idle_s = min(idle_s, max(decision.remaining_s, 0.0) + 0.001,  # just past the deadline
                             self._decode_ahead(series, progress, now))
            if isinstance(decision, SeriesComplete):
                instances = self.store.instances(series.series_uid)
                if self.config.uses_content_labels:
                    content = content_header([Path(i.path) for i in instances])
                    series = dataclasses.replace(series, header={**series.header, **content})
                waiting_for = self._study_wait(series, now)
                if waiting_for is not None:
                    continue  # complete, but a study-level rule waits for other series of the study
                jobs, note = plan_jobs(self.config, series, instances, self._failed_studies(series, now))
                if self.store.route_series(series, jobs, note):
                    self._count_hints.forget(series.series_uid)
                    self._decoded_ahead.pop(series.series_uid, None)
                    self._work_queued.set()
                    log.info("series %s complete (%s); %s", series.series_uid, decision.reason, note)
                    self.audit.write("series-routed", series_uid=series.series_uid, study_uid=series.study_uid,
                                     instances=series.instances, revision=series.revision,
                                     jobs=[j.pipeline for j in jobs], note=note, completion=decision.reason)
        if now >= self._next_retention:
            self._next_retention = now + RETENTION_EVERY_S
            self.apply_retention(now)
        if now >= self._next_journal_sweep:
            self._next_journal_sweep = now + JOURNAL_SWEEP_EVERY_S
            self.replay_abandoned_journals()
        self._assemble_idle_s = idle_s
        return False

    def _decode_ahead(self, series: SeriesRow, progress: SeriesProgress, now: float) -> float:
        """Once a waiting series looks whole, have an idle worker decode it ahead of its job (once per state
        of the series, and only when a rule would run a pipeline on it). Returns the seconds until that
        moment, for the loop's sleep (POLL_S once it has passed: an idle worker is looked for again)."""
        at = decode_ahead_at(progress, self.completion)
        if at > now:
            return at - now + 0.001
        state = (series.revision, series.instances, series.last_received)
        if self._decoded_ahead.get(series.series_uid) == state:
            return POLL_S
        rules = {rule.name: rule for rule in self.config.rules}
        decisions = route(self.config.rules, series.header, series.calling_ae)
        if not any(d.fires and rules[d.rule].processes for d in decisions):
            self._decoded_ahead[series.series_uid] = state  # no pipeline would read it
        elif self.executor is not None and self.executor.prefetch(
                series.series_uid, tuple(self.store.instance_paths(series.series_uid))):
            self._decoded_ahead[series.series_uid] = state
        return POLL_S

    def _study_outcomes(self, series: SeriesRow, now: float) -> dict[str, StudyReady | StudyWaiting | StudyTimedOut]:
        return study_outcomes(self.config, self.store, self.studies, series, now)

    def _study_wait(self, series: SeriesRow, now: float) -> StudyWaiting | None:
        waits = [o for o in self._study_outcomes(series, now).values() if isinstance(o, StudyWaiting)]
        return waits[0] if waits else None

    def _failed_studies(self, series: SeriesRow, now: float) -> dict[str, str]:
        """Study rules that timed out with on_timeout: fail -> the reason (their rules do not run)."""
        return {name: o.reason for name, o in self._study_outcomes(series, now).items()
                if isinstance(o, StudyTimedOut) and o.action == "fail"}

    def replay_abandoned_journals(self) -> int:
        """Place what a pull that died had acknowledged: a C-GET's journal that no live process owns (the
        node's own receive journals are left to their receivers); returns how many instances."""
        replayed = recover_other_journals(self.config.journal_dir, self.config.spool_dir, self.store,
                                          keep=self.receiver.journal_names, min_age_s=JOURNAL_MIN_AGE_S)
        if replayed:
            log.warning("replayed %d instance(s) acknowledged by a pull that stopped before placing them", replayed)
        return replayed

    def apply_retention(self, now: float) -> int:
        """Remove spool data of finished series older than retention.spool_days, and result files of jobs
        done or failed before retention.results_days; never data of unfinished work. Returns folders removed."""
        removed = 0
        spool_days, results_days = self.config.retention.spool_days, self.config.retention.results_days
        if spool_days > 0:
            for series in self.store.purgeable_series(now - spool_days * 86400):
                shutil.rmtree(self.config.spool_dir / series.study_uid / series.series_uid, ignore_errors=True)
                self.store.mark_purged(series.series_uid)
                self.audit.write("series-purged", series_uid=series.series_uid, study_uid=series.study_uid)
                removed += 1
        if results_days > 0:
            for job in self.store.finished_jobs(now - results_days * 86400):
                folder = self.config.job_results_dir(job.id)
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed

    def _worker_loop(self) -> bool:
        job = self.store.claim_job(JOB_LEASE_S)
        if job is None:
            return False
        assert self.executor is not None
        paths = self.store.instance_paths(job.series_uid)
        log.info("job %d: %s on series %s (%d instances)", job.id, job.pipeline, job.series_uid, len(paths))
        executor = self.executor
        profiles = tuple(dict.fromkeys(output_profile(self.config, d) for d in job.destinations))
        spec = JobSpec(job.id, job.pipeline, tuple(paths), profiles, series_revision=job.series_revision,
                       no_result_sr=self.config.no_result_sr(job.rule), series_uid=job.series_uid)
        try:
            outcome = executor.submit(spec).result()
        except cf.process.BrokenProcessPool as exc:
            self._worker_died(executor, job.id, job.attempts, exc)
            return True
        except DeviceBusy as exc:  # the memory guard: wait in the queue, neither fail nor count the attempt
            log.info("job %d waits for its device: %s", job.id, exc)
            self.store.defer_job(job.id, str(exc), time.time() + DEVICE_BUSY_RETRY_S)
            return True
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; the node carries on
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d failed: %s", job.id, reason)
            self.store.fail_job(job.id, reason)
            if isinstance(exc, REFUSALS):  # input QC refused the series, and no no-result SR answers it
                self._audit_refusal(job, refusal_reasons(exc), [], [])
            else:
                self.audit.write("job-failed", job_id=job.id, series_uid=job.series_uid, pipeline=job.pipeline,
                                 error=reason)
            return True
        if outcome.refusal:
            self._refused(job, outcome.files, outcome.refusal, outcome.reasons, outcome.stages)
            return True
        manifest = self.manifests[job.pipeline]
        files = outcome.files
        self.store.finish_job(job.id, result_sends(self.config, files, job.destinations), outcome.stages)
        self._sends_queued.set()
        log.info("job %d done in %s%s", job.id, ", ".join(f"{k} {v:.2f}s" for k, v in outcome.stages.items()),
                 " (series decoded ahead)" if outcome.decoded_ahead else "")
        self.audit.write("job-done", job_id=job.id, series_uid=job.series_uid, pipeline=manifest.name,
                         pipeline_version=manifest.version, results=[f.sop_uid for f in files],
                         destinations=job.destinations)
        return True

    def _refused(self, job: JobRow, files: list[ResultFile], refusal: str, reasons: tuple[str, ...],
                 stages: dict[str, float]) -> None:
        """Input QC refused the job's series and its no-result SR is written: queue it like any result, and
        keep the refusal as the job's last error, where `status` shows it."""
        sends = result_sends(self.config, files, job.destinations)
        self.store.finish_job(job.id, sends, stages, note=f"refused, no-result SR sent instead: {refusal}")
        self._sends_queued.set()
        log.warning("job %d refused, no-result SR queued for %d destination(s): %s", job.id, len(sends), refusal)
        self._audit_refusal(job, reasons, [f.sop_uid for f in files], list(dict.fromkeys(s[3] for s in sends)))

    def _audit_refusal(self, job: JobRow, reasons: tuple[str, ...], no_result_sr: list[str],
                       destinations: list[str]) -> None:
        """The audit record of a refusal: every reason, and the no-result SR sent (if any) and where."""
        manifest = self.manifests.get(job.pipeline)
        self.audit.write("job-refused", job_id=job.id, series_uid=job.series_uid, pipeline=job.pipeline,
                         pipeline_version=manifest.version if manifest else None, reasons=list(reasons),
                         no_result_sr=no_result_sr, destinations=destinations)

    def _worker_died(self, broken: Executor, job_id: int, attempts: int, exc: Exception) -> None:
        # A worker process that dies (out of memory, a crash in native code) breaks the pool: start a new
        # one (once, whichever worker thread notices first), and retry the job a few times before failing it.
        reason = f"worker process died: {exc}"
        log.error("job %d: %s", job_id, reason)
        with self._executor_lock:
            if self.executor is broken:
                broken.shutdown()
                self.executor = make_executor(self.config, self.manifests)
        if attempts >= MAX_WORKER_CRASHES:
            self.store.fail_job(job_id, reason)
        else:
            self.store.requeue_job(job_id, reason)

    def _dispatch_loop(self) -> bool:
        self.dispatcher.run_once()
        return False


def remove_partial_writes(spool_dir: Path) -> int:
    """Temporary files of writes a killed process never finished (never acknowledged to a sender)."""
    removed = 0
    for tmp in spool_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
