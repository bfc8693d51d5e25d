"""RayExecutor against a real Ray head started by the test (skipped where Ray, the cluster extra, is missing)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
import yaml

ray = pytest.importorskip("ray")

from conftest import free_ports  # noqa: E402
from dicom_ai_node.config import NodeConfig, parse_config  # noqa: E402
from dicom_ai_node.imaging.volume import load_volume  # noqa: E402
from dicom_ai_node.jobs.executor import JobOutcome, JobRunner, JobSpec  # noqa: E402
from dicom_ai_node.jobs.ray_executor import (  # noqa: E402
    ActorPool, ActorStatus, RayExecutor, actor_resources, headers_only,
)
from dicom_ai_node.phantom import make_chest_phantom  # noqa: E402
from dicom_ai_node.pipeline import Manifest, discover  # noqa: E402
from dicom_ai_node.results.validate import result_kind  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).with_name("ray")
VOLUME_CODE = "118565006"
JOB_TIMEOUT_S = 120
pytestmark = pytest.mark.timeout(300)

BROKEN_PIPELINE = '''
from dicom_ai_node.pipeline import Pipeline, PipelineResult


class Broken(Pipeline):
    def load(self, device):
        raise RuntimeError("model weights not found: weights.pt")

    def run(self, volume, context):
        return PipelineResult()
'''


@pytest.mark.parametrize(
    ("gpu_memory_mb", "cluster_gpus", "device", "expected"),
    [
        (0, 4, "auto", {"num_cpus": 1}),  # a classical pipeline never holds a GPU
        (8000, 4, "auto", {"num_gpus": 1}),
        (8000, 4, "cuda", {"num_gpus": 1}),
        (8000, 0, "auto", {"num_cpus": 1}),  # a GPU the cluster lacks would leave the actor pending forever
        (8000, 4, "cpu", {"num_cpus": 1}),  # the operator turned GPUs off
    ],
)
def test_actor_resources(gpu_memory_mb, cluster_gpus, device, expected):
    assert actor_resources(gpu_memory_mb, cluster_gpus, device) == expected


def test_pool_gives_a_waiting_job_a_fresh_actor_when_one_dies(monkeypatch):
    killed: list[str] = []
    monkeypatch.setattr(ray, "kill", killed.append)
    pool = ActorPool(lambda number: f"actor-{number}", size=1)
    borrowed: list[str] = []

    def second_job() -> None:
        with pool.borrow() as actor:
            borrowed.append(actor)

    with pytest.raises(ray.exceptions.RayActorError):
        with pool.borrow() as first:
            waiting = threading.Thread(target=second_job)
            waiting.start()  # blocks: the pool is at its size
            time.sleep(0.1)
            assert not borrowed
            raise ray.exceptions.RayActorError()
    waiting.join(timeout=5)
    assert (first, killed, borrowed, pool.actors()) == ("actor-0", ["actor-0"], ["actor-1"], ["actor-1"])


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM lets `ray start --block` stop what it started; SIGKILL to its process group catches stragglers."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the head runs in its own session, so the group is only Ray's
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster on free ports, torn down even when tests fail.

    2 CPUs, a 200 MB object store and one GPU, which Ray takes on trust: it is a logical resource here, enough
    to see a GPU pipeline's actor placed on it (its CUDA_VISIBLE_DEVICES), not to run CUDA.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    flags = ("node-manager-port", "object-manager-port", "dashboard-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    # Every listening port chosen, so a concurrent Ray cannot collide, and all distinct: picked one at a
    # time, the OS may hand the same free port out twice and Ray refuses to start.
    port, *others = free_ports(len(flags) + 1)
    ports = dict(zip(flags, others))
    command = [str(RAY_BIN), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=1",
               "--object-store-memory=200000000", "--disable-usage-stats", "--include-dashboard=false",
               f"--temp-dir={temp_dir}", *(f"--{flag}={value}" for flag, value in ports.items())]
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, process, log_path)
        yield f"127.0.0.1:{port}"
    finally:
        stop_head(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def config_in(data_dir: Path) -> NodeConfig:
    return parse_config(yaml.safe_dump({"node": {"data_dir": str(data_dir)},
                                        "workers": {"count": 1, "device": "auto"}}), "test node.yaml")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Manifest]:
    """The repository's pipelines plus `broken`, which asks for a GPU and whose load() fails."""
    extra = tmp_path_factory.mktemp("pipelines")
    folder = extra / "broken"
    folder.mkdir()
    manifest = yaml.safe_load((REPO / "pipelines" / "ct_lung" / "pipeline.yaml").read_text())
    manifest.update(name="broken", entrypoint="pipeline.py:Broken", gpu_memory_mb=1000)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(manifest))
    (folder / "pipeline.py").write_text(BROKEN_PIPELINE)
    return discover([REPO / "pipelines", extra])


@pytest.fixture(scope="module")
def chest_ct(tmp_path_factory) -> tuple[str, ...]:
    phantom = make_chest_phantom(slices=40, size=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0)
    return tuple(str(p) for p in phantom.write(tmp_path_factory.mktemp("chest-ct")))


@pytest.fixture(scope="module")
def executor(ray_address, manifests, tmp_path_factory) -> Iterator[RayExecutor]:
    executor = RayExecutor(config_in(tmp_path_factory.mktemp("ray-node")), manifests, ray_address)
    try:
        yield executor
    finally:
        if ray.is_initialized():  # test_shutdown may have shut it down already
            executor.shutdown()


def actor_of(executor: RayExecutor, pipeline: str) -> ActorStatus:
    (status,) = [s for s in executor.actor_status() if s.name.startswith(f"{pipeline}-")]
    return status


def run(executor: RayExecutor, job: JobSpec) -> JobOutcome:
    future: Future[JobOutcome] = executor.submit(job)
    return future.result(timeout=JOB_TIMEOUT_S)


def numeric_values(ds: pydicom.Dataset) -> list[tuple[str, float]]:
    """(concept code, value) of every NUM content item in an SR tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM":
            found.append((str(item.ConceptNameCodeSequence[0].CodeValue),
                          float(item.MeasuredValueSequence[0].NumericValue)))
        found += numeric_values(item)
    return found


def objects_by_kind(outcome: JobOutcome) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(f.path) for f in outcome.files]
    return {result_kind(ds): ds for ds in datasets}


def test_headers_only_drops_pixels_and_keeps_headers(chest_ct):
    volume = load_volume(list(chest_ct))
    sent = headers_only(volume)
    assert sent.array is volume.array
    assert all("PixelData" not in ds for ds in sent.sources)
    assert all("PixelData" in ds for ds in volume.sources)  # the node's copy still writes its results from them
    assert [ds.SOPInstanceUID for ds in sent.sources] == [ds.SOPInstanceUID for ds in volume.sources]


def test_jobs_run_on_a_warm_actor_and_match_local(executor, manifests, chest_ct, tmp_path):
    first = run(executor, JobSpec(1, "ct_lung", chest_ct))
    after_first = actor_of(executor, "ct_lung")
    second = run(executor, JobSpec(2, "ct_lung", chest_ct))
    after_second = actor_of(executor, "ct_lung")

    for outcome in (first, second):
        assert set(outcome.stages) == {"load", "infer", "write+validate"}
        assert all(f.path.is_file() for f in outcome.files)
        assert sorted(objects_by_kind(outcome)) == ["SC", "SEG", "SR"]
    assert after_first.pid != os.getpid()  # inference ran in a Ray worker, not on the node
    assert after_second.pid == after_first.pid and after_second.name == after_first.name
    assert (after_first.loads, after_first.runs) == (1, 1)
    assert (after_second.loads, after_second.runs) == (1, 2)  # loaded once, warm for the second job

    local = objects_by_kind(JobRunner(config_in(tmp_path / "local-node"), manifests, "cpu").run(
        JobSpec(1, "ct_lung", chest_ct)))
    remote = objects_by_kind(second)
    volumes = [value for code, value in numeric_values(remote["SR"]) if code == VOLUME_CODE]
    assert len(volumes) == 3 and all(v > 0 for v in volumes)  # right, left, both lungs
    assert numeric_values(remote["SR"]) == numeric_values(local["SR"])
    assert np.array_equal(remote["SEG"].pixel_array, local["SEG"].pixel_array)


def test_pipeline_error_reaches_the_future_and_the_actor_survives(executor, chest_ct, tmp_path):
    run(executor, JobSpec(3, "ct_lung", chest_ct))  # the actor exists before the failing job
    before = actor_of(executor, "ct_lung")
    not_hu = []
    for i, path in enumerate(chest_ct):
        ds = pydicom.dcmread(path)
        ds.RescaleType = "US"  # passes input QC (a chest CT) but is not in Hounsfield units: the pipeline refuses
        ds.save_as(tmp_path / f"US{i:04d}.dcm")
        not_hu.append(str(tmp_path / f"US{i:04d}.dcm"))
    with pytest.raises(ValueError, match="ct_lung needs CT in Hounsfield units"):
        run(executor, JobSpec(4, "ct_lung", tuple(not_hu)))
    run(executor, JobSpec(5, "ct_lung", chest_ct))  # the actor is back in the pool, warm
    after = actor_of(executor, "ct_lung")
    assert (after.pid, after.loads, after.runs) == (before.pid, 1, before.runs + 2)


def test_failed_load_reaches_the_future_and_is_tried_again(executor, chest_ct):
    for job_id in (6, 7):
        with pytest.raises(RuntimeError, match="model weights not found: weights.pt"):
            run(executor, JobSpec(job_id, "broken", chest_ct))
    broken = actor_of(executor, "broken")
    assert (broken.loads, broken.runs) == (0, 2)  # one actor, which tried loading for each job


def test_gpu_pipeline_actor_holds_a_gpu_and_cpu_pipeline_none(executor, chest_ct):
    with pytest.raises(RuntimeError):
        run(executor, JobSpec(8, "broken", chest_ct))  # the actor exists from here on, load or not
    assert actor_of(executor, "broken").gpus == ("0",)
    run(executor, JobSpec(9, "ct_lung", chest_ct))
    assert actor_of(executor, "ct_lung").gpus == ()  # gpu_memory_mb: 0 never takes the cluster's GPU


def test_dead_actor_fails_its_job_and_is_replaced(executor, chest_ct):
    run(executor, JobSpec(10, "ct_lung", chest_ct))
    dead = actor_of(executor, "ct_lung")
    os.kill(dead.pid, signal.SIGKILL)  # as the OOM killer would
    with pytest.raises(ray.exceptions.RayActorError):
        run(executor, JobSpec(11, "ct_lung", chest_ct))
    run(executor, JobSpec(12, "ct_lung", chest_ct))
    fresh = actor_of(executor, "ct_lung")
    assert fresh.pid != dead.pid and fresh.name != dead.name
    assert (fresh.loads, fresh.runs) == (1, 1)


def test_unknown_pipeline_fails_the_job(executor, chest_ct):
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        run(executor, JobSpec(13, "nope", chest_ct))


def test_shutdown_kills_the_actors_and_disconnects(executor):
    pids = [status.pid for status in executor.actor_status()]
    assert pids
    executor.shutdown()
    assert not ray.is_initialized()
    deadline = time.time() + 20
    while any(pid_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in pids)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
