"""Series and study completion: pure decisions from what has arrived and when.

A PACS gives no "end of series" signal, so the node completes a series on the first of these deadlines,
each of which holds only while no new instance arrives:

- the expected instance count is reached (from the headers, or announced by a query), plus a settle time;
- the association that delivered the last instance was released (most PACS send a study in one
  association), plus a short wait for a next association;
- a quiet period with no new instance: a matching rule's, else the modality's, else the default;
- a hard maximum wait since the first instance, so that a trickling sender cannot hold a series forever.

A deadline that fires too early costs a re-run, never an instance: an instance that arrives after
completion re-opens the series (jobs/store.py), which is assembled and run again, and the new results
replace the earlier ones at the PACS because their UIDs derive from the series and the pipeline.

Every decision carries a reason and, while waiting, the seconds left, so that `dicom-ai-node status` can
show an operator why a series waits. Nothing here reads a clock or a file: `now` is a parameter.
"""
from __future__ import annotations

import json

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from dicom_ai_node.route import header_values, parse_condition

# The header keywords expected_instance_count reads: the store needs these of every instance.
HINT_KEYWORDS = (
    "AcquisitionNumber", "ImagesInAcquisition", "NumberOfFrames", "ConcatenationUID", "InConcatenationTotalNumber",
)


@dataclass(frozen=True)
class CompletionPolicy:
    quiet_period_s: float = 60.0
    modality_quiet_period_s: Mapping[str, float] = field(default_factory=dict)  # e.g. {"CT": 30, "MR": 90}
    after_release_s: float | None = 5.0  # None: an association release does not shorten the wait
    settle_s: float = 1.0
    max_wait_s: float = 3600.0


@dataclass(frozen=True)
class SeriesProgress:
    series_uid: str
    study_uid: str
    modality: str
    instances: int  # distinct SOP instances stored
    first_received: float  # epoch seconds
    last_received: float
    expected_instances: int | None = None  # from expected_instance_count
    released_at: float | None = None  # release of the association that delivered the latest instance
    rule_quiet_period_s: float | None = None  # the largest quiet_period_s of the rules that match


@dataclass(frozen=True)
class SeriesComplete:
    series_uid: str
    reason: str
    forced: bool = False  # completed by the maximum wait, not by any sign that the series is whole


@dataclass(frozen=True)
class SeriesWaiting:
    series_uid: str
    reason: str
    remaining_s: float


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if abs(value) < 10 else f"{value:.0f} s"


def _shared_value(headers: Sequence[Mapping[str, Any]], key: str) -> str | None:
    """The one value every header gives for `key`: "" when none has it, None when they differ or it is multi-valued."""
    values = {tuple(v.strip() for v in header_values(h, key)) for h in headers}
    if len(values) != 1:
        return None
    (only,) = values
    if len(only) > 1:
        return None
    return only[0] if only else ""


def _positive_int(text: str | None) -> int | None:
    try:
        number = int(text or "")
    except ValueError:
        return None
    return number if number > 0 else None


# What expected_instance_count reads of a header. Headers equal on these count alike, so the distinct
# projections of a series' headers stand for all of them (the assemble loop keeps only those).
COUNT_HINT_KEYS = ("ConcatenationUID", "InConcatenationTotalNumber", "AcquisitionNumber", "ImagesInAcquisition",
                   "NumberOfFrames")


def count_hint_projection(header: Mapping[str, Any]) -> str:
    """The part of one header that expected_instance_count reads, as a hashable key (JSON)."""
    return json.dumps({k: header[k] for k in COUNT_HINT_KEYS if k in header}, sort_keys=True)


def expected_instance_count(headers: Sequence[Mapping[str, Any]], announced: int | None = None) -> int | None:
    """How many instances the series should hold, or None when nothing trustworthy says so.

    `headers` are the flat headers of the instances stored so far. A count `announced` by the source (the
    NumberOfSeriesRelatedInstances of a C-FIND before a retrieve) counts exactly this series' instances,
    so it wins over the headers; zero or less means the source did not say. Otherwise every header must
    agree, because a count that is too small completes the series early, while one too large only falls
    back to the quiet period:
    - one concatenation (a multi-frame object split over instances): its InConcatenationTotalNumber;
    - one acquisition (one AcquisitionNumber, present): ImagesInAcquisition, which counts images, i.e.
      frames, divided by the NumberOfFrames every instance shares (a single enhanced CT/MR object that
      holds the whole acquisition gives 1).
    A lone multi-frame instance says nothing more: NumberOfFrames counts the frames of one instance, and
    series of several multi-frame instances are common (enhanced MR stacks, XA and US runs).
    A series with a second acquisition still to come looks whole after the first; the settle time and
    re-opening by a late instance cover that.
    """
    if announced is not None and announced > 0:
        return announced
    if not headers:
        return None
    concatenation = _shared_value(headers, "ConcatenationUID")
    if concatenation is None:
        return None
    if concatenation:
        return _positive_int(_shared_value(headers, "InConcatenationTotalNumber"))
    if not _shared_value(headers, "AcquisitionNumber"):
        return None
    images = _positive_int(_shared_value(headers, "ImagesInAcquisition"))
    frames_text = _shared_value(headers, "NumberOfFrames")
    frames = 1 if frames_text == "" else _positive_int(frames_text)
    if images is None or frames is None or images % frames:
        return None
    return images // frames


def quiet_period(progress: SeriesProgress, policy: CompletionPolicy) -> tuple[float, str]:
    """The quiet period that applies, and where it comes from: a matching rule, the modality, the default."""
    if progress.rule_quiet_period_s is not None:
        return progress.rule_quiet_period_s, "rule quiet period"
    modality = progress.modality.strip().upper()
    for key, seconds in policy.modality_quiet_period_s.items():
        if key.strip().upper() == modality:
            return seconds, f"{modality} quiet period"
    return policy.quiet_period_s, "default quiet period"


def _count(progress: SeriesProgress) -> str:
    n, expected = progress.instances, progress.expected_instances
    if expected is None:
        return f"{n} instance" + ("" if n == 1 else "s")
    if n > expected:
        return f"{n} instances, more than the {expected} expected (count ignored)"
    return f"{n} of {expected} expected instances"


@dataclass(frozen=True)
class _Deadline:
    at: float  # the series completes then, unless a new instance arrives first
    done: str  # the reason once it has passed
    pending: str  # the reason before
    forced: bool = False


def _deadlines(progress: SeriesProgress, now: float, policy: CompletionPolicy) -> list[_Deadline]:
    last = progress.last_received
    quiet_s, source = quiet_period(progress, policy)
    deadlines = [
        _Deadline(last + quiet_s, f"quiet for {_seconds(now - last)} ({source})",
                  f"quiet period ends in {_seconds(last + quiet_s - now)} ({source}, {quiet_s:g} s)"),
        _Deadline(progress.first_received + policy.max_wait_s,
                  f"forced: still receiving after {policy.max_wait_s:g} s (maximum wait)",
                  f"maximum wait ends in {_seconds(progress.first_received + policy.max_wait_s - now)}", forced=True),
    ]
    if progress.instances == progress.expected_instances:
        deadlines.append(_Deadline(last + policy.settle_s, f"none new for {_seconds(now - last)}",
                                   f"settle time ends in {_seconds(last + policy.settle_s - now)}"))
    released = progress.released_at
    # A release before the last instance was that of an earlier association: a later one is delivering.
    if policy.after_release_s is not None and released is not None and released >= last:
        end = released + policy.after_release_s
        deadlines.append(_Deadline(end, f"association released {_seconds(now - released)} ago",
                                   f"association released {_seconds(now - released)} ago; "
                                   f"wait for another ends in {_seconds(end - now)}"))
    return deadlines


def series_completion(progress: SeriesProgress, now: float, policy: CompletionPolicy) -> SeriesComplete | SeriesWaiting:
    """Complete on the earliest deadline that has passed; else wait for the earliest one to come."""
    if progress.instances <= 0:
        return SeriesWaiting(progress.series_uid, "no instance stored yet", quiet_period(progress, policy)[0])
    first = min(_deadlines(progress, now, policy), key=lambda d: d.at)
    if first.at <= now:
        return SeriesComplete(progress.series_uid, f"{_count(progress)}; {first.done}", first.forced)
    return SeriesWaiting(progress.series_uid, f"waiting: {_count(progress)}; {first.pending}", first.at - now)


# A series quiet for this part of its quiet period is decoded ahead (jobs/prefetch.py) if nothing else
# says it is whole earlier: most series that pause this long are complete.
DECODE_AHEAD_QUIET_FRACTION = 0.5


def decode_ahead_at(progress: SeriesProgress, policy: CompletionPolicy) -> float:
    """When a waiting series looks whole enough to decode its instances ahead of its job (epoch seconds): the
    release of the association that delivered its last instance (where releases count, see _deadlines), the
    expected count reached, or part of its quiet period without a new instance, whichever comes first.
    Decoding ahead only saves time; a series that then changes is decoded again by its job."""
    last = progress.last_received
    moments = [last + DECODE_AHEAD_QUIET_FRACTION * quiet_period(progress, policy)[0]]
    if progress.instances == progress.expected_instances:
        moments.append(last)
    released = progress.released_at
    if policy.after_release_s is not None and released is not None and released >= last:
        moments.append(released)
    return min(moments)


@dataclass(frozen=True)
class StudyRequirement:
    name: str
    match: Mapping[str, Any]  # conditions in the grammar of route.py; no condition: any series


@dataclass(frozen=True)
class StudyRule:
    name: str
    requirements: tuple[StudyRequirement, ...]
    timeout_s: float
    on_timeout: Literal["run", "fail"] = "run"  # run: forced-complete with the series that are complete


@dataclass(frozen=True)
class StudyReady:
    rule: str
    reason: str


@dataclass(frozen=True)
class StudyWaiting:
    rule: str
    missing: tuple[str, ...]
    reason: str
    remaining_s: float


@dataclass(frozen=True)
class StudyTimedOut:
    rule: str
    missing: tuple[str, ...]
    action: Literal["run", "fail"]
    reason: str


def requirement_matches(requirement: StudyRequirement, header: Mapping[str, Any]) -> bool:
    return all(parse_condition(key, spec).test(header_values(header, key)) for key, spec in requirement.match.items())


def study_completion(
    rule: StudyRule, series: Sequence[tuple[Mapping[str, Any], bool]], study_first_received: float, now: float,
) -> StudyReady | StudyWaiting | StudyTimedOut:
    """Ready when every requirement is met by at least one complete series; else wait until the timeout."""
    missing: list[str] = []
    notes: list[str] = []
    for requirement in rule.requirements:
        matching = [complete for header, complete in series if requirement_matches(requirement, header)]
        if not any(matching):
            missing.append(requirement.name)
            notes.append(f"{requirement.name} ({len(matching)} matching series still receiving)" if matching
                         else f"{requirement.name} (no matching series yet)")
    if not missing:
        return StudyReady(rule.name, "all required series complete: " + ", ".join(r.name for r in rule.requirements))
    waited = now - study_first_received
    if waited >= rule.timeout_s:
        action = "running with the complete series" if rule.on_timeout == "run" else "the study fails"
        reason = f"timed out after {_seconds(waited)} waiting for {'; '.join(notes)}: {action}"
        return StudyTimedOut(rule.name, tuple(missing), rule.on_timeout, reason)
    remaining = rule.timeout_s - waited
    return StudyWaiting(rule.name, tuple(missing), f"waiting for {'; '.join(notes)}; timeout in {_seconds(remaining)}",
                        remaining)
