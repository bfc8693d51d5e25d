"""Completion is a pure function of what arrived when: table-driven."""
from __future__ import annotations

import dataclasses

import pytest

from dicom_ai_node.assemble import (
    CompletionPolicy, SeriesComplete, SeriesProgress, SeriesWaiting, StudyReady, StudyRequirement, StudyRule,
    StudyTimedOut, StudyWaiting, expected_instance_count, quiet_period, series_completion, study_completion,
)

POLICY = CompletionPolicy(
    quiet_period_s=60, modality_quiet_period_s={"CT": 30, "MR": 90}, after_release_s=5, settle_s=1, max_wait_s=3600,
)
# A CT series of 10 instances, first received at 0 s, last at 100 s, with no hint, release or rule.
BASE = SeriesProgress("1.2.3", "1.2", "CT", 10, 0.0, 100.0)


@pytest.mark.parametrize("rule, modality, seconds, source", [
    (None, "CT", 30, "CT quiet period"),
    (None, "MR", 90, "MR quiet period"),
    (None, " mr", 90, "MR quiet period"),  # a modality is matched case-insensitively
    (None, "US", 60, "default quiet period"),
    (None, "", 60, "default quiet period"),
    (10, "CT", 10, "rule quiet period"),  # a rule overrides the modality, shorter...
    (120, "MR", 120, "rule quiet period"),  # ...or longer
])
def test_quiet_period_by_rule_modality_default(rule, modality, seconds, source):
    progress = dataclasses.replace(BASE, modality=modality, rule_quiet_period_s=rule)
    assert quiet_period(progress, POLICY) == (seconds, source)


@pytest.mark.parametrize("case, changes, policy, now, remaining, fragment", [
    # quiet periods: modality, default, rule
    ("CT waits", {}, POLICY, 129, 1, "waiting: 10 instances; quiet period ends in 1.0 s (CT quiet period, 30 s)"),
    ("CT done", {}, POLICY, 130, None, "10 instances; quiet for 30 s (CT quiet period)"),
    ("MR waits", {"modality": "MR"}, POLICY, 150, 40, "(MR quiet period, 90 s)"),
    ("MR done", {"modality": "MR"}, POLICY, 190, None, "quiet for 90 s (MR quiet period)"),
    ("default waits", {"modality": "US"}, POLICY, 159, 1, "(default quiet period, 60 s)"),
    ("default done", {"modality": "US"}, POLICY, 160, None, "quiet for 60 s (default quiet period)"),
    ("rule shorter", {"rule_quiet_period_s": 10}, POLICY, 110, None, "quiet for 10 s (rule quiet period)"),
    ("rule longer", {"rule_quiet_period_s": 120}, POLICY, 130, 90, "(rule quiet period, 120 s)"),
    ("one instance", {"instances": 1}, POLICY, 130, None, "1 instance; quiet for 30 s"),
    # an association release shortens the wait
    ("released waits", {"released_at": 101}, POLICY, 103, 3,
     "waiting: 10 instances; association released 2.0 s ago; wait for another ends in 3.0 s"),
    ("released done", {"released_at": 101}, POLICY, 106, None, "10 instances; association released 5.0 s ago"),
    ("released with last", {"released_at": 100}, POLICY, 105, None, "association released 5.0 s ago"),
    ("released before last", {"released_at": 99}, POLICY, 110, 20, "quiet period ends in 20 s"),
    ("release off", {"released_at": 101}, dataclasses.replace(POLICY, after_release_s=None), 110, 20,
     "quiet period ends in 20 s"),
    ("quiet before release", {"released_at": 101, "rule_quiet_period_s": 3}, POLICY, 103, None,
     "quiet for 3.0 s (rule quiet period)"),
    # expected counts
    ("count not reached", {"instances": 80, "expected_instances": 120}, POLICY, 118, 12,
     "waiting: 80 of 120 expected instances; quiet period ends in 12 s"),
    ("count settling", {"instances": 120, "expected_instances": 120}, POLICY, 100.5, 0.5,
     "waiting: 120 of 120 expected instances; settle time ends in 0.5 s"),
    ("count reached", {"instances": 120, "expected_instances": 120}, POLICY, 101, None,
     "120 of 120 expected instances; none new for 1.0 s"),
    ("count exceeded", {"instances": 135, "expected_instances": 120}, POLICY, 101, 29,
     "135 instances, more than the 120 expected (count ignored); quiet period ends in 29 s"),
    ("count exceeded done", {"instances": 135, "expected_instances": 120}, POLICY, 130, None, "quiet for 30 s"),
    ("longer settle", {"instances": 120, "expected_instances": 120}, dataclasses.replace(POLICY, settle_s=3), 102,
     1, "settle time ends in 1.0 s"),
    # the hard maximum wait, for a sender that trickles
    ("max wait near", {"last_received": 3590}, POLICY, 3595, 5, "maximum wait ends in 5.0 s"),
    ("max wait forces", {"last_received": 3590}, POLICY, 3600, None,
     "10 instances; forced: still receiving after 3600 s (maximum wait)"),
    # nothing stored never completes, whatever the time or the hint
    ("no instance", {"instances": 0}, POLICY, 10_000, 30, "no instance stored yet"),
    ("no instance expected 0", {"instances": 0, "expected_instances": 0}, POLICY, 10_000, 30,
     "no instance stored yet"),
])
def test_series_completion(case, changes, policy, now, remaining, fragment):
    decision = series_completion(dataclasses.replace(BASE, **changes), now, policy)
    assert decision.series_uid == "1.2.3"
    assert fragment in decision.reason, decision.reason
    if remaining is None:
        assert isinstance(decision, SeriesComplete)
        assert decision.forced == ("forced" in fragment)
    else:
        assert isinstance(decision, SeriesWaiting)
        assert decision.remaining_s == pytest.approx(remaining)


ACQ = {"AcquisitionNumber": "1", "ImagesInAcquisition": "120"}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.mark.parametrize("case, headers, announced, expected", [
    ("consistent", [ACQ, ACQ, ACQ], None, 120),
    ("numbers, not strings", [{"AcquisitionNumber": 1, "ImagesInAcquisition": 120}], None, 120),
    ("padded", [{"AcquisitionNumber": " 1", "ImagesInAcquisition": "120 "}], None, 120),
    ("inconsistent", [ACQ, {**ACQ, "ImagesInAcquisition": "121"}], None, None),
    ("one lacks it", [ACQ, {"AcquisitionNumber": "1"}], None, None),
    ("multi-acquisition", [ACQ, {**ACQ, "AcquisitionNumber": "2"}], None, None),
    ("no acquisition number", [{"ImagesInAcquisition": "120"}], None, None),
    ("zero", [{**ACQ, "ImagesInAcquisition": "0"}], None, None),
    ("not a number", [{**ACQ, "ImagesInAcquisition": "many"}], None, None),
    ("multi-valued", [{**ACQ, "ImagesInAcquisition": ["120", "60"]}], None, None),
    ("missing", [{"Modality": "CT"}], None, None),
    ("nothing stored", [], None, None),
    # multi-frame: ImagesInAcquisition counts frames
    ("multi-frame alone", [{"SOPClassUID": ENHANCED_CT, "NumberOfFrames": "200", "AcquisitionNumber": "1"}], None,
     None),
    ("multi-frame holds the acquisition", [{"NumberOfFrames": "200", "AcquisitionNumber": "1",
                                            "ImagesInAcquisition": "200"}], None, 1),
    ("two stacks", [{**ACQ, "ImagesInAcquisition": "200", "NumberOfFrames": "100"}] * 2, None, 2),
    ("frames differ", [{**ACQ, "NumberOfFrames": "60"}, {**ACQ, "NumberOfFrames": "40"}], None, None),
    ("frames do not divide", [{**ACQ, "NumberOfFrames": "50"}], None, None),
    ("frames on some", [ACQ, {**ACQ, "NumberOfFrames": "1"}], None, None),
    # a concatenation says how many instances carry it
    ("concatenation", [{"ConcatenationUID": "1.9", "InConcatenationTotalNumber": "3", "NumberOfFrames": "500"}] * 2,
     None, 3),
    ("concatenation and another", [{"ConcatenationUID": "1.9", "InConcatenationTotalNumber": "3"}, ACQ], None, None),
    ("concatenation without total", [{"ConcatenationUID": "1.9", **ACQ}], None, None),
    # a count announced by the source wins
    ("announced", [ACQ], 50, 50),
    ("announced, no header", [], 50, 50),
    ("announced zero", [ACQ], 0, 120),
    ("announced, inconsistent headers", [ACQ, {**ACQ, "AcquisitionNumber": "2"}], 7, 7),
])
def test_expected_instance_count(case, headers, announced, expected):
    assert expected_instance_count(headers, announced) == expected


PET_CT = StudyRule("pet-ct", (StudyRequirement("PET", {"Modality": "PT"}),
                              StudyRequirement("CT", {"Modality": "CT", "SliceThickness": "<=5"})), timeout_s=900)
PT, CT, THICK_CT, SR = ({"Modality": "PT"}, {"Modality": "CT", "SliceThickness": "3"},
                        {"Modality": "CT", "SliceThickness": "7"}, {"Modality": "SR"})


@pytest.mark.parametrize("case, series, now, on_timeout, kind, missing, remaining, fragment", [
    ("both complete", [(PT, True), (CT, True)], 100, "run", StudyReady, (), None,
     "all required series complete: PET, CT"),
    ("one of two CT complete", [(PT, True), (CT, False), (CT, True), (SR, False)], 100, "run", StudyReady, (), None,
     "complete"),
    ("CT receiving", [(PT, True), (CT, False)], 100, "run", StudyWaiting, ("CT",), 800,
     "waiting for CT (1 matching series still receiving); timeout in 800 s"),
    ("no CT yet", [(PT, True), (SR, True)], 100, "run", StudyWaiting, ("CT",), 800, "CT (no matching series yet)"),
    ("CT too thick", [(PT, True), (THICK_CT, True)], 100, "run", StudyWaiting, ("CT",), 800, "CT (no matching"),
    ("nothing", [], 0, "run", StudyWaiting, ("PET", "CT"), 900, "PET (no matching series yet); CT (no matching"),
    ("timeout runs", [(CT, True)], 900, "run", StudyTimedOut, ("PET",), None,
     "timed out after 900 s waiting for PET (no matching series yet): running with the complete series"),
    ("timeout fails", [(CT, True), (PT, False)], 1000, "fail", StudyTimedOut, ("PET",), None,
     "PET (1 matching series still receiving): the study fails"),
])
def test_study_completion(case, series, now, on_timeout, kind, missing, remaining, fragment):
    rule = dataclasses.replace(PET_CT, on_timeout=on_timeout)
    decision = study_completion(rule, series, study_first_received=0.0, now=now)
    assert isinstance(decision, kind)
    assert decision.rule == "pet-ct"
    assert fragment in decision.reason, decision.reason
    if not isinstance(decision, StudyReady):
        assert decision.missing == missing
    if isinstance(decision, StudyWaiting):
        assert decision.remaining_s == pytest.approx(remaining)
    if isinstance(decision, StudyTimedOut):
        assert decision.action == on_timeout


def test_requirement_without_conditions_is_met_by_any_complete_series():
    rule = StudyRule("any", (StudyRequirement("anything", {}),), timeout_s=10)
    assert isinstance(study_completion(rule, [(SR, True)], 0.0, 1.0), StudyReady)
    assert isinstance(study_completion(rule, [(SR, False)], 0.0, 1.0), StudyWaiting)


def test_count_hints_read_incrementally_match_all_headers(tmp_path):
    """The assemble loop's incremental view (distinct count-hint projections of the rows added since the
    last poll) gives the same expected count as all headers, and starts again when a series re-opens."""
    from dicom_ai_node.jobs.store import JobStore, ReceivedInstance
    from dicom_ai_node.service import CountHintHeaders

    store = JobStore(tmp_path / "db.sqlite")

    def add(numbers, header):
        store.record_instances([ReceivedInstance(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                                 "1.2.9", "1.2.8", "A", f"/x/{n}", 1, header) for n in numbers])

    acquisition = {"Modality": "CT", "AcquisitionNumber": "1", "ImagesInAcquisition": "6", "SliceLocation": "0"}
    hints = CountHintHeaders(store)
    add(range(3), acquisition)
    assert expected_instance_count(hints.of(store.series("1.2.9"))) == 6
    add(range(3, 5), {**acquisition, "SliceLocation": "5"})  # other values, same projection
    headers = hints.of(store.series("1.2.9"))
    assert len(headers) == 1 and expected_instance_count(headers) == 6
    add([5], {**acquisition, "AcquisitionNumber": "2"})  # a second acquisition: no trustworthy count
    everything = [i.header for i in store.instances("1.2.9")]
    assert expected_instance_count(everything) is None
    assert expected_instance_count(hints.of(store.series("1.2.9"))) is None
    series = store.series("1.2.9")
    reopened = dataclasses.replace(series, revision=series.revision + 1)
    assert len(hints.of(reopened)) == 2  # read again from the first row
