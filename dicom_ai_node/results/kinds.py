"""Which kind of result a written object is (seg, sr, sc, pmap, heatmap_sc, gsps, no_result_sr), for destination
profiles."""
from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_ai_node.results.gsps import GSPS_SERIES_NUMBER
from dicom_ai_node.results.heatmap_sc import HEATMAP_SC_SERIES_NUMBER
from dicom_ai_node.results.no_result import NO_RESULT_SR_SERIES_NUMBER
from dicom_ai_node.results.pmap import PMAP_SERIES_NUMBER
from dicom_ai_node.results.sc import SC_SERIES_NUMBER
from dicom_ai_node.results.seg import SEG_SERIES_NUMBER
from dicom_ai_node.results.sr import SR_SERIES_NUMBER

# Each builder writes its kind into its own series number; that is what tells two SCs apart.
KIND_BY_SERIES_NUMBER = {
    SEG_SERIES_NUMBER: "seg",
    SR_SERIES_NUMBER: "sr",
    SC_SERIES_NUMBER: "sc",
    PMAP_SERIES_NUMBER: "pmap",
    HEATMAP_SC_SERIES_NUMBER: "heatmap_sc",
    GSPS_SERIES_NUMBER: "gsps",
    NO_RESULT_SR_SERIES_NUMBER: "no_result_sr",  # sent instead of results when input QC refused the series
}


def result_kind_of(ds: Dataset) -> str:
    try:
        return KIND_BY_SERIES_NUMBER[int(ds.SeriesNumber)]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"result {ds.get('SOPInstanceUID', '?')}: SeriesNumber does not name a result kind") from exc
