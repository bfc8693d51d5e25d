"""Decoding a series ahead of its job (jobs/prefetch.py): the job reuses the Volume only when the instance
files are exactly those decoded, and then gets what a fresh load gives."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import free_port, node_config
from dicom_ai_node.assemble import CompletionPolicy, SeriesProgress, decode_ahead_at
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.jobs.executor import JobRunner, JobSpec, LocalExecutor
from dicom_ai_node.jobs.prefetch import PrefetchedVolumes, volume_bytes
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import discover
from dicom_ai_node.results.validate import result_kind

REPO = Path(__file__).resolve().parent.parent


def series(folder: Path, seed: str, slices: int = 24) -> tuple[str, list[str]]:
    phantom = make_chest_phantom(slices=slices, size=48, pixel_spacing_mm=3.0, slice_thickness_mm=5.0, uid_seed=seed)
    paths = [str(p) for p in phantom.write(folder)]
    return str(phantom.datasets[0].SeriesInstanceUID), sorted(paths)


def always() -> bool:
    return True


def assert_same_volume(a, b) -> None:
    assert np.array_equal(a.array, b.array) and a.array.dtype == b.array.dtype
    assert (a.spacing, a.origin, a.row_direction, a.column_direction, a.unit, a.modality, a.frame_numbers) == \
        (b.spacing, b.origin, b.row_direction, b.column_direction, b.unit, b.modality, b.frame_numbers)
    assert [str(s.SOPInstanceUID) for s in a.sources] == [str(s.SOPInstanceUID) for s in b.sources]


def replace_file(path: str, ds: pydicom.Dataset) -> None:
    """Write `ds` over `path` as the spool does: a new file renamed over the old one."""
    tmp = path + ".new"
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def test_the_volume_decoded_ahead_equals_a_fresh_load_and_is_taken_once(tmp_path):
    uid, paths = series(tmp_path, "ahead-equal")
    cache = PrefetchedVolumes()
    assert cache.decode(uid, paths, always)
    assert cache.decode(uid, paths, always) and len(cache) == 1  # already there: not decoded twice
    ahead = cache.take(uid, paths)
    assert ahead is not None
    assert_same_volume(ahead, load_series(paths))
    assert cache.take(uid, paths) is None  # a job may change its Volume: never handed out twice


def test_a_late_instance_gives_a_fresh_load_with_it(tmp_path):
    uid, paths = series(tmp_path, "ahead-late")
    early = paths[:-1]  # the series as it stood when it was decoded ahead; one instance still to come
    cache = PrefetchedVolumes()
    assert cache.decode(uid, early, always)
    assert cache.take(uid, paths) is None
    assert len(cache) == 0  # the stale entry of the series is gone with the job


def test_a_file_sent_again_with_other_content_gives_a_fresh_load(tmp_path):
    uid, paths = series(tmp_path, "ahead-changed")
    cache = PrefetchedVolumes()
    assert cache.decode(uid, paths, always)
    ds = pydicom.dcmread(paths[0])
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 7
    ds.PixelData = pixels.tobytes()
    replace_file(paths[0], ds)
    assert cache.take(uid, paths) is None


def test_a_removed_file_decodes_nothing_and_is_never_taken(tmp_path):
    uid, paths = series(tmp_path, "ahead-removed")
    cache = PrefetchedVolumes()
    assert cache.decode(uid, paths, always)
    os.unlink(paths[3])
    assert cache.take(uid, paths) is None
    assert not cache.decode(uid, paths, always) and len(cache) == 0


def test_a_decode_asked_to_stop_keeps_nothing(tmp_path):
    uid, paths = series(tmp_path, "ahead-stopped")
    answers = iter([True, True, False])
    cache = PrefetchedVolumes()
    assert not cache.decode(uid, paths, lambda: next(answers))
    assert len(cache) == 0


def test_a_series_that_is_not_a_volume_is_not_kept(tmp_path):
    uid, paths = series(tmp_path, "ahead-gap")
    with_gap = paths[:10] + paths[11:]  # sorted by SOP UID, which the phantom gives in slice order
    cache = PrefetchedVolumes()
    assert not cache.decode(uid, with_gap, always)
    assert len(cache) == 0


def test_the_cache_keeps_few_volumes_within_its_byte_budget(tmp_path):
    first, first_paths = series(tmp_path / "a", "ahead-a")
    second, second_paths = series(tmp_path / "b", "ahead-b")
    cache = PrefetchedVolumes(max_volumes=1)
    assert cache.decode(first, first_paths, always) and cache.decode(second, second_paths, always)
    assert len(cache) == 1 and cache.take(first, first_paths) is None
    assert cache.take(second, second_paths) is not None
    small = PrefetchedVolumes(max_bytes=volume_bytes(load_series(first_paths)) - 1)
    assert not small.decode(first, first_paths, always) and len(small) == 0


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> JobRunner:
    return JobRunner(node_config(tmp_path_factory.mktemp("node"), free_port()), discover([REPO / "pipelines"]), "cpu")


def results_by_kind(outcome) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(f.path) for f in outcome.files]
    return {result_kind(ds): ds for ds in datasets}


def test_a_job_on_a_series_decoded_ahead_writes_what_a_fresh_load_writes(runner, tmp_path):
    uid, paths = series(tmp_path, "ahead-job")
    fresh = runner.run(JobSpec(1, "ct_lung", tuple(paths), series_uid=uid))
    assert runner.prefetched.decode(uid, paths, always)
    reused = runner.run(JobSpec(2, "ct_lung", tuple(paths), series_uid=uid))
    assert reused.decoded_ahead and not fresh.decoded_ahead
    a, b = results_by_kind(fresh), results_by_kind(reused)
    assert set(a) == set(b) == {"SEG", "SR", "SC"}
    for kind in a:
        assert a[kind].SOPInstanceUID == b[kind].SOPInstanceUID
        assert a[kind].get("PixelData") == b[kind].get("PixelData")


def test_a_job_after_a_late_instance_runs_on_the_whole_series(runner, tmp_path):
    uid, paths = series(tmp_path, "ahead-job-late")
    assert runner.prefetched.decode(uid, paths[:-1], always)
    outcome = runner.run(JobSpec(3, "ct_lung", tuple(paths), series_uid=uid))
    assert not outcome.decoded_ahead
    sr = results_by_kind(outcome)["SR"]
    [study] = sr.CurrentRequestedProcedureEvidenceSequence
    listed = {str(i.ReferencedSOPInstanceUID) for s in study.ReferencedSeriesSequence
              for i in s.ReferencedSOPSequence}
    assert str(pydicom.dcmread(paths[-1]).SOPInstanceUID) in listed


def test_decode_ahead_starts_at_release_at_the_expected_count_or_half_the_quiet_period():
    policy = CompletionPolicy(quiet_period_s=10.0, after_release_s=5.0)
    quiet = SeriesProgress("s", "st", "CT", instances=5, first_received=0.0, last_received=100.0)
    assert decode_ahead_at(quiet, policy) == 105.0
    released = SeriesProgress("s", "st", "CT", 5, 0.0, 100.0, released_at=101.0)
    assert decode_ahead_at(released, policy) == 101.0
    assert decode_ahead_at(released, CompletionPolicy(quiet_period_s=10.0, after_release_s=None)) == 105.0
    earlier_association = SeriesProgress("s", "st", "CT", 5, 0.0, 100.0, released_at=99.0)
    assert decode_ahead_at(earlier_association, policy) == 105.0
    counted = SeriesProgress("s", "st", "CT", 5, 0.0, 100.0, expected_instances=5)
    assert decode_ahead_at(counted, policy) == 100.0


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_the_local_executor_decodes_ahead_only_on_an_idle_worker_and_its_job_reuses_it(tmp_path):
    config = node_config(tmp_path / "node", free_port())
    executor = LocalExecutor(config, discover([REPO / "pipelines"]))
    try:
        uid, paths = series(tmp_path / "a", "ahead-local")
        other, other_paths = series(tmp_path / "b", "ahead-local-other", slices=300)  # long enough to stop
        assert executor.workers == 1
        assert executor.prefetch(uid, tuple(paths))
        assert not executor.prefetch(other, tuple(other_paths))  # the only worker is taken by the first
        wait_until(lambda: not executor._prefetching)
        outcome = executor.submit(JobSpec(1, "ct_lung", tuple(paths), series_uid=uid)).result()
        assert outcome.decoded_ahead
        # A job handed over while another series is decoded ahead stops that decode.
        generation = executor._prefetch_generation.value
        assert executor.prefetch(other, tuple(other_paths))
        [decode] = executor._prefetching
        job = executor.submit(JobSpec(2, "ct_lung", tuple(paths), series_uid=uid))
        assert executor._prefetch_generation.value == generation + 1
        assert decode.result() is False  # stopped, nothing kept
        assert not job.result().decoded_ahead
    finally:
        executor.shutdown()


def test_local_workers_outlive_the_thread_that_first_uses_them(tmp_path):
    """A worker dies with the thread that started it (PR_SET_PDEATHSIG): the executor starts its workers
    itself, so that a job thread that ends (as they do when the node stops) does not take them along."""
    executor = LocalExecutor(node_config(tmp_path / "node", free_port()), discover([REPO / "pipelines"]))
    try:
        pids = []
        first = threading.Thread(target=lambda: pids.append(executor._pool.submit(os.getpid).result(timeout=120)))
        first.start()
        first.join()
        time.sleep(1.0)  # the parent-death signal would have killed the worker by now
        assert executor._pool.submit(os.getpid).result(timeout=120) == pids[0]
    finally:
        executor.shutdown()
