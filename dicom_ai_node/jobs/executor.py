"""Executors: where a job (series x pipeline) runs.

A job is: load the series as a Volume -> input QC -> run the pipeline -> write DICOM results -> validation gate.
A series that QC refuses (outside the pipeline's validated range, or not a consistent volume) is not run:
the job fails with every reason, or, when the job asks for it (qc.no_result_sr), its outcome is a validated
"no result" SR stating why (results/no_result.py), sent like any result.
`LocalExecutor` runs whole jobs in worker processes (one per GPU, or `workers.count` on CPU), each keeping
its pipelines warm between jobs, and lets an idle worker decode a series that is about to complete ahead of
its job (jobs/prefetch.py). The Ray executor (jobs/ray_executor.py) loads and writes on the node and
sends only inference to pipeline actors on a Ray cluster. The job store is updated by the caller.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from dicom_ai_node import __version__
from dicom_ai_node.config import NodeConfig
from dicom_ai_node.imaging.qc import InputRejected, input_problems
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.imaging.volume import Volume, VolumeError
from dicom_ai_node.jobs.prefetch import PrefetchedVolumes
from dicom_ai_node.jobs.readback import ReadBackProcess, die_with_parent
from dicom_ai_node.pipeline import Manifest, Pipeline, PipelineResult, RunContext, instantiate
from dicom_ai_node.results.iod_lookup import memoize_iod_lookups
from dicom_ai_node.results.kinds import result_kind_of
from dicom_ai_node.results.no_result import NOT_A_VOLUME, OUTSIDE_RANGE, build_no_result_sr, read_headers
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.validate import ReadBack, gate
from dicom_ai_node.results.writer import build_results, file_name
from dicom_ai_node.runtime.allocator import freeze_long_lived_objects, keep_freed_memory
from dicom_ai_node.runtime.device import admit, gpu_count, select_device

log = logging.getLogger("dicom_ai_node.jobs")


@dataclass(frozen=True)
class OutputProfile:
    """How one destination wants its results encoded (see config.Peer)."""

    seg_type: str | None = None
    sr_profile: str = "full"


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    pipeline: str
    instance_paths: tuple[str, ...]
    profiles: tuple[OutputProfile, ...] = (OutputProfile(),)  # one per distinct profile of its destinations
    series_revision: int = 1  # the version of the series the job runs on (a late instance makes a new one)
    no_result_sr: bool = False  # answer an input QC refusal with a no-result SR instead of failing
    series_uid: str = ""  # finds the series' Volume if a worker decoded it ahead (none given: always loaded)


@dataclass(frozen=True)
class ResultFile:
    sop_uid: str
    sop_class_uid: str
    path: Path
    modality: str
    kind: str  # seg, sr, sc, pmap, heatmap_sc, gsps
    profiles: frozenset[OutputProfile]  # the profiles this object belongs to (all, for profile-free kinds)


@dataclass
class JobOutcome:
    files: list[ResultFile]
    # Seconds per stage: load (DICOM decode into a Volume), qc (input QC and the memory guard), pipeline-load
    # (a worker's first job of a pipeline), infer, write (build and save the objects), validate (the gate).
    stages: dict[str, float] = field(default_factory=dict)
    refusal: str = ""  # set when input QC refused the series and `files` is the no-result SR: why, in full
    reasons: tuple[str, ...] = ()  # each reason of the refusal
    decoded_ahead: bool = False  # the series' Volume was decoded ahead of the job (jobs/prefetch.py)


class Executor(Protocol):
    workers: int  # how many jobs it runs at once

    def submit(self, job: JobSpec) -> "cf.Future[JobOutcome]": ...

    def prefetch(self, series_uid: str, paths: tuple[str, ...]) -> bool:
        """Start decoding a series ahead of its job on an idle worker, if one is; True when started."""
        ...

    def shutdown(self) -> None: ...


def result_context(config: NodeConfig) -> ResultContext:
    return ResultContext(org_root=config.node.org_root, software_version=__version__,
                         institution_name=config.node.institution_name)


def write_validated_results(
    job_id: int, volume: Volume, result: PipelineResult, manifest: Manifest, config: NodeConfig,
    profiles: tuple[OutputProfile, ...] = (OutputProfile(),), stages: dict[str, float] | None = None,
    read_back: ReadBack | None = None,
) -> list[ResultFile]:
    """Turn a PipelineResult into DICOM files under results/job-N, each passing the validation gate, once
    per output profile; an object all profiles share (same UID) is written once. Each object is checked and
    saved as soon as it is built, while the next is built (`read_back`: see validate.gate). With `stages`,
    adds the seconds spent building and saving the objects ("write") and validating them ("validate")."""
    folder = config.job_results_dir(job_id)
    files: dict[str, ResultFile] = {}
    stages = {} if stages is None else stages
    for profile in profiles:
        t = time.perf_counter()
        timings = {"build": 0.0, "save": 0.0}
        objects = build_results(volume, result, manifest, result_context(config), kinds=tuple(manifest.outputs),
                                seg_type=profile.seg_type, sr_profile=profile.sr_profile)
        # Saves each object, then checks it (dciodvfy too, and the viewer layout for a viewer SR).
        datasets = gate(timed(objects, timings), volume.sources, manifest, folder, sr_profile=profile.sr_profile,
                        timings=timings, read_back=read_back)
        written = timings["build"] + timings["save"]
        stages["write"] = stages.get("write", 0.0) + written
        stages["validate"] = stages.get("validate", 0.0) + time.perf_counter() - t - written
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            known = files.get(uid)
            belongs = (known.profiles if known else frozenset()) | {profile}
            files[uid] = ResultFile(uid, str(ds.SOPClassUID), folder / file_name(ds), str(ds.Modality),
                                    result_kind_of(ds), belongs)
    return list(files.values())


def timed(objects: Iterable[Dataset], timings: dict[str, float]) -> Iterator[Dataset]:
    """`objects`, adding the seconds spent making each (when they are built as they are asked for) to
    timings["build"]."""
    source = iter(objects)
    while True:
        t = time.perf_counter()
        try:
            ds = next(source)
        except StopIteration:
            return
        finally:
            timings["build"] += time.perf_counter() - t
        yield ds


def check_input(volume: Volume, manifest: Manifest) -> None:
    """Raise InputRejected when the series is outside the pipeline's validated range (never run silently)."""
    problems = input_problems(volume, manifest.accepts)
    if problems:
        raise InputRejected(f"input outside the validated range of {manifest.name} {manifest.version}: "
                            + "; ".join(problems), problems)


# What input QC refuses with: a series outside the pipeline's validated range, or not a consistent volume
# (missing or unevenly spaced slices, duplicates, mixed kinds). Any other exception is a failure.
REFUSALS = (InputRejected, VolumeError)


def refusal_reasons(refusal: Exception) -> tuple[str, ...]:
    return refusal.reasons if isinstance(refusal, InputRejected) else (str(refusal),)


def write_no_result_sr(job: JobSpec, manifest: Manifest, config: NodeConfig, refusal: Exception) -> list[ResultFile]:
    """The no-result SR of a refused job, from its instances' headers, saved under results/job-N and passed
    through the validation gate; it belongs to every output profile of the job."""
    headers = read_headers(job.instance_paths)
    why = OUTSIDE_RANGE if isinstance(refusal, InputRejected) else NOT_A_VOLUME
    sr = build_no_result_sr(headers, manifest, result_context(config), refusal_reasons(refusal),
                            revision=job.series_revision, why=why)
    folder = config.job_results_dir(job.job_id)
    gate([sr], headers, manifest, folder)
    return [ResultFile(str(sr.SOPInstanceUID), str(sr.SOPClassUID), folder / file_name(sr), str(sr.Modality),
                       result_kind_of(sr), frozenset(job.profiles))]


def refused_outcome(
    job: JobSpec, manifest: Manifest, config: NodeConfig, refusal: Exception, stages: dict[str, float],
) -> JobOutcome:
    """The outcome of a job whose series input QC refused: its no-result SR when the job asks for one; else
    the refusal is raised again, and the job fails with its reason. A no-result SR that cannot be made fails
    the job with the refusal and why the SR could not be made."""
    if not job.no_result_sr:
        raise refusal
    t = time.perf_counter()
    try:
        files = write_no_result_sr(job, manifest, config, refusal)
    except Exception as exc:  # noqa: BLE001 - the refusal stays the job's reason; the SR's failure is added
        log.error("job %d: no-result SR not written: %s", job.job_id, type(exc).__name__)
        message = f"{refusal}; no-result SR not written: {type(exc).__name__}: {exc}"
        raise (InputRejected(message, refusal.reasons) if isinstance(refusal, InputRejected)
               else VolumeError(message)) from exc
    stages["no-result-sr"] = time.perf_counter() - t
    return JobOutcome(files, stages, refusal=f"{type(refusal).__name__}: {refusal}",
                      reasons=refusal_reasons(refusal))


class JobRunner:
    """Runs whole jobs in the current process, keeping one warm instance of each pipeline."""

    def __init__(self, config: NodeConfig, manifests: dict[str, Manifest], device: str,
                 read_back: ReadBackProcess | None = None) -> None:
        self.config = config
        self.manifests = manifests
        self.device = device
        self._warm: dict[str, Pipeline] = {}
        self.prefetched = PrefetchedVolumes()
        self.read_back = read_back  # None: results are read back in this process
        memoize_iod_lookups()  # highdicom's building of SEGs, 1/4 faster

    def pipeline(self, name: str) -> Pipeline:
        if name not in self._warm:
            pipeline = instantiate(self.manifests[name])
            pipeline.load(self.device)
            self._warm[name] = pipeline
        return self._warm[name]

    def run(self, job: JobSpec) -> JobOutcome:
        stages: dict[str, float] = {}
        t = time.perf_counter()
        manifest = self.manifests[job.pipeline]
        try:
            ahead = self.prefetched.take(job.series_uid, job.instance_paths)
            volume = ahead or load_series(job.instance_paths)
            loaded = time.perf_counter()
            check_input(volume, manifest)
        except REFUSALS as refusal:
            stages["load"] = time.perf_counter() - t  # reading and input QC, up to the refusal
            return refused_outcome(job, manifest, self.config, refusal, stages)
        # The memory guard: DeviceBusy puts the job back in the queue (the device is shared with other jobs,
        # models and processes), before the pipeline is loaded or run.
        admit(self.device, manifest.gpu_memory_mb if self.device.startswith("cuda") else manifest.host_memory_mb)
        stages["load"], stages["qc"], t = loaded - t, time.perf_counter() - loaded, time.perf_counter()
        pipeline = self.pipeline(job.pipeline)  # instantiated and loaded on the device by a worker's first job
        stages["pipeline-load"], t = time.perf_counter() - t, time.perf_counter()
        result = pipeline.run(volume, RunContext(device=self.device))
        stages["infer"] = time.perf_counter() - t
        files = write_validated_results(job.job_id, volume, result, pipeline.manifest, self.config, job.profiles,
                                        stages, self.read_back)
        return JobOutcome(files, stages, decoded_ahead=ahead is not None)


# -- worker processes ------------------------------------------------------------------------------------

_RUNNER: JobRunner | None = None
_SETTLED_PIPELINES: set[str] = set()  # pipelines that have run a job in this worker
# Shared with the node: it moves on when a job is handed to the workers while they decode another series
# ahead, so that the decode stops and the job does not wait behind it.
_PREFETCH_GENERATION = None


def _init_worker(
    config_json: str, manifests_json: dict[str, tuple[str, str]], slot_counter, device_preference: str,
    parent_pid: int, prefetch_generation,
) -> None:
    global _RUNNER, _PREFETCH_GENERATION
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    keep_freed_memory()  # before any pipeline allocates (runtime/allocator.py)
    with slot_counter.get_lock():
        slot = slot_counter.value
        slot_counter.value += 1
    config = NodeConfig.model_validate_json(config_json)
    manifests = {}
    for name, (text, folder) in manifests_json.items():
        manifests[name] = Manifest.model_validate_json(text)
        manifests[name].folder = Path(folder)  # excluded from the JSON: it is where the code is, not config
    # The read-back runs beside the worker only where there is a core for it.
    read_back = ReadBackProcess() if (os.cpu_count() or 1) > 1 else None
    _RUNNER = JobRunner(config, manifests, select_device(device_preference, slot), read_back)
    _PREFETCH_GENERATION = prefetch_generation
    log.info("worker %d (pid %d) ready on %s", slot, os.getpid(), _RUNNER.device)


def _run_in_worker(job: JobSpec) -> JobOutcome:
    assert _RUNNER is not None, "worker not initialised"
    try:
        return _RUNNER.run(job)
    finally:
        if job.pipeline not in _SETTLED_PIPELINES:
            # The pipeline is loaded now and the job's own objects are gone: freeze what stays (allocator.py).
            _SETTLED_PIPELINES.add(job.pipeline)
            freeze_long_lived_objects()


def _prefetch_in_worker(series_uid: str, paths: tuple[str, ...], generation: int) -> bool:
    assert _RUNNER is not None and _PREFETCH_GENERATION is not None, "worker not initialised"
    shared = _PREFETCH_GENERATION
    return _RUNNER.prefetched.decode(series_uid, paths, keep_going=lambda: shared.value == generation)


class LocalExecutor:
    """Jobs in worker processes: one per GPU when there are GPUs, else `workers.count` CPU workers."""

    def __init__(self, config: NodeConfig, manifests: dict[str, Manifest]) -> None:
        gpus = gpu_count() if config.workers.device != "cpu" else 0
        self.workers = gpus or config.workers.count
        context = multiprocessing.get_context("spawn")  # no fork of a process holding sockets and threads
        slots = context.Value("i", 0)
        manifests_json = {name: (m.model_dump_json(), str(m.folder)) for name, m in manifests.items()}
        self._prefetch_generation = context.Value("i", 0)
        self._pool = cf.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context, initializer=_init_worker,
            initargs=(config.model_dump_json(), manifests_json, slots, config.workers.device, os.getpid(),
                      self._prefetch_generation),
        )
        # Start the workers now, from the thread that makes the executor (the node's main thread at start):
        # a worker dies with the *thread* that started it (PR_SET_PDEATHSIG, readback.die_with_parent), and a
        # pool starts its processes in the thread of the first submit: a job thread, which ends at stop before
        # the pool does, killing its worker before the worker can clean up.
        for _ in range(self.workers):
            self._pool.submit(os.getpid)
        self._lock = threading.Lock()
        self._jobs = 0  # submitted and not finished
        self._prefetching: dict[cf.Future[bool], str] = {}  # decodes ahead under way -> their series

    def submit(self, job: JobSpec) -> "cf.Future[JobOutcome]":
        with self._lock:
            if any(uid != job.series_uid for uid in self._prefetching.values()):
                # A worker decodes another series ahead: stop that, so that this job does not queue behind it.
                with self._prefetch_generation.get_lock():
                    self._prefetch_generation.value += 1
            self._jobs += 1
        future = self._pool.submit(_run_in_worker, job)
        future.add_done_callback(self._job_done)
        return future

    def prefetch(self, series_uid: str, paths: tuple[str, ...]) -> bool:
        """Decode a series ahead on a worker, only while one is idle (no job is queued behind a decode: a
        job handed over meanwhile stops a decode of another series)."""
        with self._lock:
            if self._jobs + len(self._prefetching) >= self.workers:
                return False
            future = self._pool.submit(_prefetch_in_worker, series_uid, paths, self._prefetch_generation.value)
            self._prefetching[future] = series_uid
        future.add_done_callback(self._prefetch_done)
        return True

    def _job_done(self, _future: "cf.Future[JobOutcome]") -> None:
        with self._lock:
            self._jobs -= 1

    def _prefetch_done(self, future: "cf.Future[bool]") -> None:
        with self._lock:
            series_uid = self._prefetching.pop(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("series %s not decoded ahead: %s", series_uid, type(future.exception()).__name__)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
