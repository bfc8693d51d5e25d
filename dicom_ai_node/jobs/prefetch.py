"""Decoding a series ahead of its job, while the node still waits for the series to complete.

A series is complete only some time after its last instance (the completion wait, assemble.py), and then
its job decodes every instance into a Volume first. Once the series looks whole (the sender released its
association, or it has been quiet for part of its quiet period), the node asks an idle worker to decode it
ahead of time; the worker keeps the Volume in a small cache, and the job takes it from there instead of
decoding again.

The cache never changes a result: an entry is keyed by the series and the exact list of its instance files,
each with its size, modification time and inode, taken *before* the files are read. The job takes an entry
only when its own instance list, statted at that moment, gives the same key: a late instance, a file
sent again (the spool replaces it with a new inode) or a removed file gives a fresh load. An entry is
taken once (a pipeline may change the Volume it gets), and at most a few are kept, within a byte budget.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom

from dicom_ai_node.imaging.series import series_volume
from dicom_ai_node.imaging.volume import Volume, VolumeError

log = logging.getLogger("dicom_ai_node.jobs.prefetch")

MAX_VOLUMES = 2  # enough for the series being run and the next one; each entry is a whole decoded series
MAX_BYTES = 2 << 30  # a larger series is not decoded ahead (its job decodes it as before)


@dataclass(frozen=True)
class SeriesFiles:
    """What a decoded Volume was made of: the series and, per instance file in order, its identity."""

    series_uid: str
    files: tuple[tuple[str, int, int, int], ...]  # (path, size, mtime_ns, inode)


def series_files(series_uid: str, paths: Sequence[str]) -> SeriesFiles | None:
    """The key of `paths` as they are now; None when one cannot be statted (then nothing is cached)."""
    files = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        files.append((str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return SeriesFiles(series_uid, tuple(files))


def volume_bytes(volume: Volume) -> int:
    """What a kept Volume holds in memory, roughly: its array, and each source's pixel data as read and as
    decoded (pydicom keeps the decoded array of `pixel_array` on the data set)."""
    sources = volume.source_instances
    encoded = sum(len(ds.PixelData) for ds in sources if "PixelData" in ds)
    decoded = sum(getattr(ds, "_pixel_array", None).nbytes for ds in sources
                  if getattr(ds, "_pixel_array", None) is not None)
    return volume.array.nbytes + encoded + decoded


class PrefetchedVolumes:
    """The worker's few decoded-ahead Volumes, by SeriesFiles; least recently decoded evicted first."""

    def __init__(self, max_volumes: int = MAX_VOLUMES, max_bytes: int = MAX_BYTES) -> None:
        self.max_volumes = max_volumes
        self.max_bytes = max_bytes
        self._volumes: OrderedDict[SeriesFiles, tuple[Volume, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._volumes)

    def decode(self, series_uid: str, paths: Sequence[str], keep_going: Callable[[], bool]) -> bool:
        """Decode the series into the cache, unless it is there already; True when it is there afterwards.

        `keep_going` is asked before each file: once it says no (a job is waiting for this worker), the
        decode is abandoned. A series that is not a valid volume is not kept: its job finds out itself.
        """
        key = series_files(series_uid, paths)  # before reading: a file replaced later changes the key
        if key is None:
            return False
        if key in self._volumes:
            return True
        self._forget(series_uid)  # an earlier state of the same series: never taken now
        datasets = []
        for path in paths:
            if not keep_going():
                return False
            datasets.append(pydicom.dcmread(path))
        try:
            volume = series_volume(datasets)
        except VolumeError:
            return False
        size = volume_bytes(volume)
        if size > self.max_bytes:
            return False
        self._volumes[key] = (volume, size)
        self._evict()
        return True

    def take(self, series_uid: str, paths: Sequence[str]) -> Volume | None:
        """The Volume decoded ahead from exactly these files as they are now, or None. Whatever the cache
        holds of the series goes: the job is its last reader, and an entry that does not match is stale."""
        if not self._volumes:
            return None
        key = series_files(series_uid, paths)
        entry = self._volumes.pop(key, None) if key is not None else None
        self._forget(series_uid)
        return entry[0] if entry is not None else None

    def _forget(self, series_uid: str) -> None:
        for stale in [k for k in self._volumes if k.series_uid == series_uid]:
            del self._volumes[stale]

    def _evict(self) -> None:
        while len(self._volumes) > self.max_volumes or sum(s for _, s in self._volumes.values()) > self.max_bytes:
            self._volumes.popitem(last=False)
