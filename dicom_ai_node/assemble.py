"""Series completion: a pure decision from what has arrived and when, to complete or still waiting.

A PACS gives no "end of series" signal, so the node waits for a quiet period after the last instance.
The decision says why it waits and for how long, so `dicom-ai-node status` can show it to an operator.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesProgress:
    series_uid: str
    instances: int
    first_received: float  # epoch seconds
    last_received: float


@dataclass(frozen=True)
class SeriesComplete:
    series_uid: str
    reason: str


@dataclass(frozen=True)
class SeriesWaiting:
    series_uid: str
    reason: str
    remaining_s: float


def series_completion(progress: SeriesProgress, now: float, quiet_period_s: float) -> SeriesComplete | SeriesWaiting:
    quiet_for = now - progress.last_received
    if progress.instances <= 0:
        return SeriesWaiting(progress.series_uid, "no instance stored yet", quiet_period_s)
    if quiet_for >= quiet_period_s:
        return SeriesComplete(
            progress.series_uid, f"{progress.instances} instances, no new instance for {quiet_for:.1f} s"
        )
    remaining = quiet_period_s - quiet_for
    return SeriesWaiting(
        progress.series_uid,
        f"{progress.instances} instances so far; quiet period of {quiet_period_s:g} s not yet over",
        remaining,
    )
