"""Ray executor (`executor: ray`): inference on pipeline actors in an existing Ray cluster.

The node keeps receiving, the job store, loading the series, writing and validating DICOM and dispatching;
only `Pipeline.run` goes to the cluster. Each pipeline gets up to `workers.count` actors, created on its
first job and kept warm: an actor instantiates its pipeline once and calls `load(device)` once.

Requirements on the cluster (`pip install 'dicom-ai-node[cluster]'` on the node):
- every Ray node runs the node's Python environment (dicom-ai-node of the same version, its dependencies,
  and the pipelines' own, e.g. torch): actors import this module, and results come back as the node's classes,
  so a pipeline's result must be made of dicom_ai_node.pipeline types (as the contract says) and numpy;
- pipeline folders are on a shared path, or at the same path on every Ray node: an actor imports its
  pipeline from `manifest.folder` as the node sees it.

Actors are named `<pipeline>-<version>-<n>` in the namespace `dicom-ai-node.<AE title>`, where they can be
found again (`ray list actors`, the dashboard, ray.get_actor). They are not detached: their lifetime is the
node's connection, so a node that stops or dies frees its GPUs on a shared cluster, and a node that starts
with new pipeline code never finds an actor running the old one; the price is one model load per actor
when the node restarts. An actor whose process or node dies is replaced by a new one (next n) on the next
job; the job that was running on it fails. Two nodes on one cluster need distinct AE titles: a second node
with the same one fails its jobs with Ray's "name already taken".
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.config import NodeConfig
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.jobs.executor import (
    REFUSALS,
    JobOutcome,
    JobSpec,
    check_input,
    refused_outcome,
    write_validated_results,
)
from dicom_ai_node.pipeline import Manifest, Pipeline, PipelineResult, RunContext, instantiate
from dicom_ai_node.results.iod_lookup import memoize_iod_lookups
from dicom_ai_node.runtime.device import select_device

try:
    import ray
    from ray.actor import ActorHandle
    from ray.exceptions import RayActorError, RayTaskError
except ImportError as exc:  # the node runs without the extra unless it is configured to use Ray
    raise ImportError("the ray executor needs Ray: pip install 'dicom-ai-node[cluster]'") from exc

log = logging.getLogger("dicom_ai_node.jobs.ray")

_LOADS = itertools.count(1)  # pipeline loads in this worker process: shows that an actor was reused


def actor_resources(gpu_memory_mb: int, cluster_gpus: float, device: str) -> dict[str, float]:
    """Ray resources of one pipeline actor.

    A whole GPU for a pipeline that declares GPU memory, when the cluster has GPUs and the node does not
    turn them off (workers.device: cpu); else one CPU. A whole GPU rather than a fraction sized from
    gpu_memory_mb, because Ray does not enforce GPU memory: two actors on one GPU can still run it out.
    Asking for a GPU the cluster does not have would leave the actor pending forever.
    """
    if gpu_memory_mb > 0 and cluster_gpus >= 1 and device != "cpu":
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def namespace(config: NodeConfig) -> str:
    return f"dicom-ai-node.{config.node.ae_title.strip()}"


def actor_name(manifest: Manifest, number: int) -> str:
    return f"{manifest.name}-{manifest.version}-{number}"


def headers_only(volume: Volume) -> Volume:
    """The volume with its source instances stripped of pixel data, for sending to an actor.

    The pixels travel once, as Volume.array; each source would otherwise carry them twice more (the
    encoded PixelData and pydicom's cached pixel_array), tripling what crosses the network.
    """
    sources = []
    for ds in volume.sources:
        header = Dataset({elem.tag: elem for elem in ds if elem.keyword != "PixelData"})
        header.file_meta = ds.file_meta
        sources.append(header)
    return dataclasses.replace(volume, sources=tuple(sources))


@dataclasses.dataclass(frozen=True)
class ActorStatus:
    name: str
    pid: int
    node_ip: str
    device: str
    gpus: tuple[str, ...]  # GPU ids Ray gave the actor (its CUDA_VISIBLE_DEVICES); empty on CPU
    loads: int  # pipeline loads in the actor's process so far: 1 once loaded, while the actor stays warm
    runs: int


class PipelineActor:
    """One warm pipeline in a Ray worker process (wrapped with ray.remote when created, with its resources).

    The pipeline is loaded on the first run rather than in __init__: a failed load then reaches the node as
    the pipeline's own exception (Ray reduces a failed __init__ to "actor died" and its traceback text), and
    the next job tries loading again, as on the node.
    """

    def __init__(self, manifest: Manifest, name: str, device_preference: str) -> None:
        self.manifest = manifest
        self.name = name
        self.device = select_device(device_preference)  # Ray's CUDA_VISIBLE_DEVICES leaves the actor its own GPU
        self.pipeline: Pipeline | None = None
        self.loads = 0
        self.runs = 0

    def run(self, volume: Volume) -> PipelineResult:
        self.runs += 1
        if self.pipeline is None:
            pipeline = instantiate(self.manifest)
            pipeline.load(self.device)
            self.pipeline, self.loads = pipeline, next(_LOADS)
        # Arrays arrive as read-only views of Ray's object store; pipelines get a writable copy, as they do
        # when they run on the node.
        volume = dataclasses.replace(volume, array=np.array(volume.array))
        return self.pipeline.run(volume, RunContext(device=self.device))

    def status(self) -> ActorStatus:
        gpus = tuple(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        return ActorStatus(self.name, os.getpid(), ray.util.get_node_ip_address(), self.device, gpus, self.loads,
                           self.runs)


class ActorPool:
    """Up to `size` actors of one pipeline: a job borrows an idle actor, or a new one while fewer exist."""

    def __init__(self, create: Callable[[int], ActorHandle], size: int) -> None:
        self._create = create  # called with a number unique in this pool, for the actor's name
        self._size = size
        self._numbers = itertools.count()
        self._idle: list[ActorHandle] = []
        self._actors: list[ActorHandle] = []
        self._changed = threading.Condition()

    @contextmanager
    def borrow(self) -> Iterator[ActorHandle]:
        actor = self._take()
        dead = False
        try:
            yield actor
        except RayActorError:
            dead = True  # its process or node is gone: the next job gets a fresh actor (and loads again)
            raise
        finally:
            self._give_back(actor, dead)

    def _take(self) -> ActorHandle:
        with self._changed:
            while not self._idle and len(self._actors) >= self._size:
                self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self._actors.append(self._create(next(self._numbers)))
            return self._actors[-1]

    def _give_back(self, actor: ActorHandle, dead: bool) -> None:
        with self._changed:
            if dead:
                self._actors = [a for a in self._actors if a is not actor]
            else:
                self._idle.append(actor)  # also after a pipeline error: the actor itself is fine
            self._changed.notify()
        if dead:
            ray.kill(actor)

    def actors(self) -> list[ActorHandle]:
        with self._changed:
            return list(self._actors)


class RayExecutor:
    """Jobs whose inference runs on pipeline actors in a Ray cluster; see the module docstring.

    `address` is a running cluster's GCS address ("host:port", or "auto" on a cluster node). Only
    "local" starts a Ray instance, private to the node's process: for development and tests.
    """

    def __init__(self, config: NodeConfig, manifests: dict[str, Manifest], address: str) -> None:
        if not address:
            raise ValueError("ray executor: no cluster address (use 'local' for a private development instance)")
        self.config = config
        self.manifests = manifests
        memoize_iod_lookups()  # the node builds the SEGs: highdicom's building of them, 1/4 faster
        # The node's log stays the node's: actor output remains in the cluster's log files.
        ray.init(address=address, namespace=namespace(config), log_to_driver=False)
        self._cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        replicas = config.workers.count
        self._pools = {
            name: ActorPool(lambda number, m=manifest: self._create_actor(m, number), replicas)
            for name, manifest in manifests.items()
        }
        # One thread per actor that can exist, so loading and writing on the node overlap other jobs' inference.
        # Threads, not processes: that work is light next to inference, which is what the cluster is for.
        self.workers = max(1, replicas * len(manifests))
        self._threads = cf.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ray-job")
        log.info("ray executor connected to %s (namespace %s, %g GPU(s))", address, namespace(config),
                 self._cluster_gpus)

    def _create_actor(self, manifest: Manifest, number: int) -> ActorHandle:
        resources = actor_resources(manifest.gpu_memory_mb, self._cluster_gpus, self.config.workers.device)
        if manifest.gpu_memory_mb > 0 and "num_gpus" not in resources:
            log.warning("pipeline %s asks for a GPU but gets none (no GPU in the cluster, or workers.device "
                        "is cpu): its actor runs on CPU", manifest.name)
        name = actor_name(manifest, number)
        device_preference = "cuda" if "num_gpus" in resources else "cpu"
        actor = ray.remote(PipelineActor).options(
            name=name, max_restarts=0, **resources,  # the pool replaces a dead actor itself
        ).remote(manifest, name, device_preference)
        log.info("pipeline actor %s requested with %s", name, resources)
        return actor

    def submit(self, job: JobSpec) -> "cf.Future[JobOutcome]":
        return self._threads.submit(self._run, job)

    def prefetch(self, series_uid: str, paths: tuple[str, ...]) -> bool:
        """Never: jobs load their series on the node in a thread per job, and no thread is kept idle for it."""
        return False

    def _run(self, job: JobSpec) -> JobOutcome:
        if job.pipeline not in self._pools:  # a job stored before its pipeline left the configuration
            raise KeyError(f"pipeline {job.pipeline!r} is not loaded (known: {sorted(self._pools)})")
        stages: dict[str, float] = {}
        t = time.perf_counter()
        try:
            volume = load_series([Path(p) for p in job.instance_paths])
            check_input(volume, self.manifests[job.pipeline])
        except REFUSALS as refusal:  # as on the local executor: a no-result SR, or the job fails with the reason
            stages["load"] = time.perf_counter() - t
            return refused_outcome(job, self.manifests[job.pipeline], self.config, refusal, stages)
        stages["load"] = time.perf_counter() - t
        try:
            with self._pools[job.pipeline].borrow() as actor:
                t = time.perf_counter()  # after borrowing: waiting for a busy actor is not inference
                result = ray.get(actor.run.remote(headers_only(volume)))
                stages["infer"] = time.perf_counter() - t  # includes the transfer both ways
        except RayTaskError as error:
            # The pipeline's own exception, so a failed job's reason is the pipeline's message; Ray's
            # wrapper, chained, keeps the remote traceback.
            if not isinstance(error.cause, Exception):
                raise
            raise error.cause from error
        t = time.perf_counter()
        files = write_validated_results(job.job_id, volume, result, self.manifests[job.pipeline], self.config,
                                        job.profiles)
        stages["write+validate"] = time.perf_counter() - t
        return JobOutcome(files, stages)

    def actor_status(self) -> list[ActorStatus]:
        """Status of every live pipeline actor, for operators and tests."""
        actors = [actor for pool in self._pools.values() for actor in pool.actors()]
        return ray.get([actor.status.remote() for actor in actors])

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for pool in self._pools.values():
            for actor in pool.actors():
                ray.kill(actor)  # they would die with the connection anyway; this frees their GPUs now
        ray.shutdown()
