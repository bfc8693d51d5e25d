"""PipelineResult heatmaps -> Parametric Maps (float32 real values) in the source series' geometry.

One Parametric Map per heatmap, all in one series: viewers that support the IOD (OHIF, 3D Slicer) overlay it
on the source with its own colour map and show the value under the cursor in the heatmap's unit. The
values are stored as they are (FloatPixelData, identity Real World Value Mapping), so nothing is lost to
quantisation.

The Parametric Map IOD requires a Frame of Reference, so a source without one (a radiograph) cannot have
one: `has_frame_of_reference` tells the writer, and the heatmap Secondary Capture covers that case.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Heatmap, Manifest, PipelineResult
from dicom_ai_node.results.coding import coded
from dicom_ai_node.results.heatmaps import checked_heatmaps, display_range
from dicom_ai_node.results.identity import (
    copy_body_part,
    copy_laterality,
    copy_patient_study,
    no_person_name_warnings,
)
from dicom_ai_node.results.provenance import (
    LO_MAX,
    SH_MAX,
    ResultContext,
    add_provenance,
    equipment_kwargs,
    series_description,
    with_use_warning,
)
from dicom_ai_node.results.segments import derivation_sources, source_series_uid
from dicom_ai_node.results.uids import derive_result_uid

PMAP_SERIES_NUMBER = 9004


def has_frame_of_reference(volume: Volume) -> bool:
    return "FrameOfReferenceUID" in volume.sources[0]


def value_mapping(heatmap: Heatmap) -> hd.pm.RealWorldValueMapping:
    """Identity mapping of the stored floats to the heatmap's values, labelled with its name and unit."""
    name = heatmap.name.replace("\\", "/")
    return hd.pm.RealWorldValueMapping(
        lut_label=name[:SH_MAX],
        lut_explanation=name[:LO_MAX],
        unit=coded(heatmap.unit),
        value_range=(float(heatmap.array.min()), float(heatmap.array.max())),
        slope=1.0,
        intercept=0.0,
    )


def voi_transformation(heatmap: Heatmap) -> hd.VOILUTTransformation:
    """A window over the map's whole range; LINEAR_EXACT because heatmaps often span less than 1 (the LINEAR
    function needs a width of at least 1)."""
    low, high = display_range(heatmap)
    return hd.VOILUTTransformation(
        window_center=(low + high) / 2,
        window_width=high - low,
        voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
    )


def parametric_map(
    volume: Volume, heatmap: Heatmap, index: int, manifest: Manifest, ctx: ResultContext
) -> Dataset:
    """The Parametric Map of heatmap number `index` (0-based) of the result."""
    series_uid = source_series_uid(volume)
    source_images, order = derivation_sources(volume)  # a multi-frame source: its frames in stored order
    with no_person_name_warnings():
        pmap = hd.pm.ParametricMap(
            source_images=source_images,
            pixel_array=heatmap.array.astype(np.float32)[order],
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "pmap-series"
            ),
            series_number=PMAP_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "pmap", index
            ),
            instance_number=index + 1,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[value_mapping(heatmap)],
            voi_lut_transformations=[voi_transformation(heatmap)],
            content_label=manifest.name.upper()[:16],
            content_description=with_use_warning(heatmap.name, manifest),
            # Type 2 and meant for a person; the algorithm is named by the equipment.
            content_creator_name=None,
            series_description=series_description(manifest, "heatmap"),
            **equipment_kwargs(manifest, ctx),
        )
    source = volume.sources[0]
    copy_patient_study(pmap, source)
    copy_body_part(pmap, source)
    copy_laterality(pmap, source)
    add_provenance(pmap, manifest, ctx)
    return pmap


def build_parametric_maps(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext
) -> list[Dataset]:
    """One Parametric Map per heatmap of `result`; ValueError for a source without a frame of reference."""
    if not has_frame_of_reference(volume):
        raise ValueError(
            f"series {source_series_uid(volume)} has no FrameOfReferenceUID, which a Parametric Map requires; "
            "use the heatmap Secondary Capture"
        )
    return [
        parametric_map(volume, heatmap, index, manifest, ctx)
        for index, heatmap in enumerate(checked_heatmaps(result, volume))
    ]
