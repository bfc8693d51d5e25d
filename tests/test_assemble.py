"""Completion is a pure function of what arrived when: table-driven."""
from __future__ import annotations

import pytest

from dicom_ai_node.assemble import SeriesComplete, SeriesProgress, SeriesWaiting, series_completion


@pytest.mark.parametrize("instances, last, now, quiet, complete, remaining", [
    (10, 100.0, 100.0, 60, False, 60.0),
    (10, 100.0, 159.9, 60, False, 0.1),
    (10, 100.0, 160.0, 60, True, None),
    (1, 100.0, 101.5, 1, True, None),
    (0, 100.0, 1000.0, 1, False, 1.0),  # nothing stored yet never completes
])
def test_quiet_period(instances, last, now, quiet, complete, remaining):
    decision = series_completion(SeriesProgress("1.2.3", instances, 50.0, last), now, quiet)
    assert isinstance(decision, SeriesComplete if complete else SeriesWaiting)
    if remaining is not None:
        assert decision.remaining_s == pytest.approx(remaining)
        assert "quiet period" in decision.reason or "no instance" in decision.reason
