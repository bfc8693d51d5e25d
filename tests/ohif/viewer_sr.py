"""A TID 1500 layout that OHIF 3.13 draws, derived from the node's own SR + SEG: the target of a "viewer"
SR profile.

OHIF 3.13's SR viewport shows only measurement groups with image coordinates. The node's SR has TID 1411
volumetric groups that reference SEG segments and a TID 1501 series-level group, none with an SCOORD, and
OHIF's SR viewport crashes on it. This builds the layout OHIF does show, and tests/test_ohif.py checks that
it is drawn:

  - one TID 1410 planar ROI group per segment, on the key slice (the source image the node's series-level
    group names as its Source of Measurement), whose ROI is an SCOORD POLYLINE (closed: last point = first)
    tracing the segment's outline on that slice, in image pixel coordinates (column, row; centre of the
    top-left pixel at 0.5, 0.5), with SELECTED FROM the CT key slice;
  - the same Tracking Identifier / Tracking UID, Finding, Finding Category and measurements (with units)
    as the node's volumetric group of that segment, so the numbers match the SEG-based report;
  - no group without image coordinates: the series-level values (e.g. LAA-950 of both lungs) have no ROI
    that OHIF can draw and are left out here (they stay in the node's full SR).

The outline is a star-shaped trace (boundary pixels ordered by angle around the centroid), which is exact
for the phantom's convex lungs; a real profile should trace contours properly (e.g. marching squares).
"""
from __future__ import annotations

import numpy as np
import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_ai_node.results.sr import procedure_reported


def outline(mask: np.ndarray) -> np.ndarray:
    """A closed polyline (N x 2, column/row in SCOORD pixel coordinates) around a 2D star-shaped mask."""
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("empty mask on the key slice: no outline to draw")
    border = mask & ~ndimage.binary_erosion(mask)
    rows, cols = np.nonzero(border)
    cy, cx = ndimage.center_of_mass(mask)
    order = np.argsort(np.arctan2(rows - cy, cols - cx))
    points = np.stack([cols[order] + 0.5, rows[order] + 0.5], axis=1).astype(float)
    return np.vstack([points, points[:1]])


def key_slice_uid(report: hd.sr.Comprehensive3DSR) -> str:
    """The SOP Instance UID the node's series-level group names as Source of Measurement (the key slice)."""
    for group in report.content.get_image_measurement_groups():
        for image in group.source_images:
            return str(image.referenced_sop_instance_uid)
    raise ValueError("the SR names no key slice (no series-level group with a source image)")


def planar_viewer_sr(sr: Dataset, seg: Dataset, sources: list[Dataset]) -> Dataset:
    """The node's SR re-laid out for OHIF: planar groups with POLYLINE outlines on the key slice."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    key_uid = key_slice_uid(report)
    key = next(ds for ds in sources if str(ds.SOPInstanceUID) == key_uid)
    groups = []
    for volumetric in report.content.get_volumetric_roi_measurement_groups():
        number = int(volumetric.referenced_segment.referenced_segment_numbers[0])
        mask = segmentation.get_pixels_by_source_instance([key_uid], segment_numbers=[number])[0, :, :, 0]
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline(mask),
            source_image=hd.sr.SourceImageForRegion(key.SOPClassUID, key.SOPInstanceUID),
        )
        measurements = [
            hd.sr.Measurement(name=m.name, value=float(m.value), unit=m.unit)
            for m in volumetric.get_measurements()
        ]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=volumetric.tracking_uid,
                                                         identifier=volumetric.tracking_identifier),
            referenced_region=region,
            finding_type=volumetric.finding_type,
            finding_category=volumetric.finding_category,
            measurements=measurements,
        ))
    if not groups:
        raise ValueError("the SR has no volumetric groups to re-lay out")
    observers = report.content.get_observer_contexts()
    device = next((o for o in observers if o.observer_type == codes.cid270.Device), None)
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure_reported(key),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    viewer = hd.sr.Comprehensive3DSR(
        evidence=[key],
        content=content[0],
        series_instance_uid=generate_uid(),
        series_number=int(sr.SeriesNumber) + 100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=str(sr.get("Manufacturer", "")),
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description="AI SR planar (viewer layout) - not for diagnostic use",
    )
    return viewer
