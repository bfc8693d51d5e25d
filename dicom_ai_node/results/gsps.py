"""PipelineResult detections -> a Grayscale Softcopy Presentation State that draws them on the source images.

Every PACS viewer that shows presentation states (most do; it is the oldest annotation object in DICOM)
then draws each detection's box or key points with its label and probability on the source image,
under the source's own VOI (a CT series without one gets the key image's lung window). The presentation
state applies to the whole source series, so scrolling keeps that window; the graphics sit only on the
slices of their detections. Each graphic carries the TrackingUID of the SR planar group of the same region.
"""
from __future__ import annotations

from collections import defaultdict

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult
from dicom_ai_node.results.detections import Region, detection_regions
from dicom_ai_node.results.identity import (
    copy_body_part,
    copy_laterality,
    copy_patient_study,
    no_person_name_warnings,
)
from dicom_ai_node.results.provenance import (
    ST_MAX,
    ResultContext,
    add_provenance,
    equipment_kwargs,
    series_description,
    with_use_warning,
)
from dicom_ai_node.results.sc import CT_LUNG_WINDOW, carries_voi
from dicom_ai_node.results.segments import frame_number, source_series_uid
from dicom_ai_node.results.uids import derive_result_uid

GSPS_SERIES_NUMBER = 9006
LAYER_NAME = "AI_DETECTIONS"  # CS: upper case, at most 16 characters
LAYER_COLOUR = (255, 200, 0)  # amber: visible on grey and distinct from the key image's segment colours


def graphic_layer() -> hd.pr.GraphicLayer:
    return hd.pr.GraphicLayer(
        layer_name=LAYER_NAME,
        order=1,
        description="AI detections",
        display_color=hd.color.CIELabColor.from_rgb(*LAYER_COLOUR),
    )


def region_graphic(region: Region) -> hd.pr.GraphicObject:
    return hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues(region.graphic_type),
        graphic_data=region.data,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        tracking_id=region.tracking_id,
        tracking_uid=region.tracking_uid,
    )


def region_text(region: Region) -> hd.pr.TextObject:
    """The label and probability, anchored at the box's top-left corner or at the point."""
    probability = region.detection.probability
    text = region.tracking_id if probability is None else f"{region.tracking_id} {probability:.2f}"
    column, row = (float(v) for v in region.data[0])
    return hd.pr.TextObject(
        text_value=text[:ST_MAX],
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=(column, row),
        anchor_point_visible=False,
        tracking_id=region.tracking_id,
        tracking_uid=region.tracking_uid,
    )


def graphic_annotations(
    volume: Volume, regions: list[Region], layer: hd.pr.GraphicLayer
) -> list[hd.pr.GraphicAnnotation]:
    """One annotation per source slice that holds detections, with their graphics and labels; on a multi-frame
    source it names the slice's frame."""
    by_slice: dict[int, list[Region]] = defaultdict(list)
    for region in regions:
        by_slice[region.detection.slice_index].append(region)
    return [
        hd.pr.GraphicAnnotation(
            referenced_images=[volume.sources[index]],
            referenced_frame_number=frame_number(volume, index),
            graphic_layer=layer,
            graphic_objects=[region_graphic(r) for r in slice_regions],
            text_objects=[region_text(r) for r in slice_regions],
        )
        for index, slice_regions in sorted(by_slice.items())
    ]


def voi_transformations(volume: Volume) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The window of the key image for a CT series without one of its own (the lung window); else None, and
    highdicom copies each source's own VOI LUT or window, image by image (none: the identity, as the source)."""
    if volume.modality == "CT" and not any(carries_voi(s) for s in volume.sources):
        centre, width = CT_LUNG_WINDOW
        return [hd.pr.SoftcopyVOILUTTransformation(window_center=centre, window_width=width)]
    return None


def presentation_lut(source: Dataset) -> hd.PresentationLUTTransformation:
    """INVERSE for MONOCHROME1 sources: a presentation state overrides the photometric interpretation, so
    without it a radiograph that shows bone white would show it black."""
    inverse = source.get("PhotometricInterpretation") == "MONOCHROME1"
    return hd.PresentationLUTTransformation(
        presentation_lut_shape=(
            hd.PresentationLUTShapeValues.INVERSE if inverse else hd.PresentationLUTShapeValues.IDENTITY
        )
    )


def build_gsps(volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext) -> Dataset:
    """The presentation state drawing `result`'s detections on the source series."""
    regions = detection_regions(volume, result, manifest, ctx)
    if not regions:
        raise ValueError(f"series {source_series_uid(volume)}: the result has no detections to draw")
    layer = graphic_layer()
    series_uid = source_series_uid(volume)
    source = volume.sources[0]
    with no_person_name_warnings():
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=list(volume.source_instances),  # a multi-frame source once: all its frames
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, "gsps-series"
            ),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=derive_result_uid(ctx.org_root, series_uid, manifest.name, manifest.version, "gsps"),
            instance_number=1,
            content_label=manifest.name.upper()[:16],
            content_description=with_use_warning(f"AI detections {manifest.title}", manifest),
            graphic_annotations=graphic_annotations(volume, regions, layer),
            graphic_layers=[layer],
            voi_lut_transformations=voi_transformations(volume),
            presentation_lut_transformation=presentation_lut(source),
            series_description=series_description(manifest, "detections"),
            **equipment_kwargs(manifest, ctx),
        )
    copy_patient_study(gsps, source)
    copy_body_part(gsps, source)
    copy_laterality(gsps, source)
    add_provenance(gsps, manifest, ctx)
    return gsps
