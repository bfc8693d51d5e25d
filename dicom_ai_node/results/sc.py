"""PipelineResult -> an RGB key-image Secondary Capture a radiologist can read on any PACS viewer.

The key slice is windowed, enlarged to at least 512 pixels so that burned-in text stays readable, and each
segment's outline is drawn in its colour with a legend and the "AI result" warning burned in.

`secondary_capture` turns any such rendering of a source slice into the SC object; the heatmap SC uses it too.
"""
from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from dicom_ai_node.imaging.display import display_pixels, has_window, slice_header
from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult, Segment
from dicom_ai_node.results.identity import (
    copy_body_part,
    copy_laterality,
    copy_patient_study,
    no_person_name_warnings,
)
from dicom_ai_node.results.provenance import (
    NOT_FOR_DIAGNOSTIC_USE,
    ResultContext,
    add_provenance,
    equipment_kwargs,
    series_description,
    software_versions,
)
from dicom_ai_node.results.segments import frame_number, key_slice_index, sorted_segments, source_series_uid
from dicom_ai_node.results.uids import derive_result_uid

SC_SERIES_NUMBER = 9003
MIN_OUTPUT_PIXELS = 512
CT_LUNG_WINDOW = (-600.0, 1500.0)  # centre, width in HU: for CT slices without a window of their own
PALETTE = ((255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255), (0, 230, 230))
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def carries_voi(header: Dataset) -> bool:
    """Whether the image (or frame) header has its own VOI LUT or a usable window."""
    return has_window(header) or bool(header.get("VOILUTSequence"))


def windowed(pixels: np.ndarray, centre: float, width: float) -> np.ndarray:
    low = centre - width / 2.0
    return (np.clip((pixels - low) / width, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def segment_colour(segment: Segment) -> tuple[int, int, int]:
    return segment.color_rgb or PALETTE[(segment.number - 1) % len(PALETTE)]


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of `mask` within `thickness` of its border."""
    return mask & ~ndimage.binary_erosion(mask, iterations=thickness, border_value=0)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int) -> int:
    """Draw white text on a black box at xy; returns the box height."""
    face = font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=face)
    pad = max(2, size // 5)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=BLACK)
    draw.text(xy, text, font=face, fill=WHITE)
    return bottom - top + 2 * pad


def fitting_size(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> int:
    """The largest font size <= size at which `text` fits in `width` pixels."""
    while size > 8 and draw.textlength(text, font=font(size)) > width:
        size -= 1
    return size


def warning_text(manifest: Manifest) -> str:
    return f"AI result - {NOT_FOR_DIAGNOSTIC_USE}" if manifest.model_card.not_for_diagnostic_use else "AI result"


def shown_gray(volume: Volume, index: int) -> tuple[np.ndarray, int]:
    """(RGB uint8 image, enlargement factor) of slice `index` as a viewer shows it, enlarged for legible text.

    imaging.display applies the source's VOI LUT or window and shows MONOCHROME1 (many radiographs) as the
    modality does; a CT slice without a window of its own gets the lung window instead of its full range.
    """
    pixels = volume.array[index]
    if volume.modality == "CT" and not carries_voi(slice_header(volume, index)):
        gray = windowed(pixels, *CT_LUNG_WINDOW)
    else:
        gray = display_pixels(volume, index)
    factor = max(1, math.ceil(MIN_OUTPUT_PIXELS / max(pixels.shape)))
    enlarged = Image.fromarray(gray).resize((pixels.shape[1] * factor, pixels.shape[0] * factor),
                                            Image.Resampling.BICUBIC)
    return np.array(enlarged.convert("RGB")), factor


def text_size_for(image: Image.Image) -> int:
    return max(12, image.width // 24)  # about 10 px tall even when a viewer shows it at 256 px


def draw_warning(draw: ImageDraw.ImageDraw, image: Image.Image, manifest: Manifest) -> None:
    """Burn the "AI result" warning into the bottom left, shrunk to fit the width."""
    size = text_size_for(image)
    margin = size // 2
    text = warning_text(manifest)
    text_size = fitting_size(draw, text, size, image.width - 2 * margin)
    draw_label(draw, (margin, image.height - margin - text_size - text_size // 3), text, text_size)


def key_image(volume: Volume, result: PipelineResult, manifest: Manifest, index: int) -> tuple[np.ndarray, int]:
    """(RGB uint8 image, enlargement factor) of slice `index` with outlines, legend and warning burned in."""
    rgb, factor = shown_gray(volume, index)
    segments = sorted_segments(result, volume)
    for segment in segments:
        mask = (segment.mask[index] > 0.5).repeat(factor, axis=0).repeat(factor, axis=1)
        rgb[outline(mask, thickness=max(2, factor))] = segment_colour(segment)  # visible at any zoom
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    size = text_size_for(image)
    margin = size // 2
    y = margin
    for segment in segments:
        swatch = size
        draw.rectangle((margin, y, margin + swatch, y + swatch), fill=segment_colour(segment), outline=WHITE)
        y += max(swatch, draw_label(draw, (margin + swatch + size // 2, y), segment.label, size)) + margin // 2
    draw_warning(draw, image, manifest)
    return np.array(image), factor


def patient_orientation(direction: tuple[float, float, float]) -> str:
    """The DICOM patient-orientation letter of the axis closest to `direction` (LPS)."""
    axis = int(np.argmax(np.abs(direction)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if direction[axis] > 0 else negative


def source_image_item(source: Dataset, frame: int | None = None) -> Dataset:
    """The SourceImageSequence item of `source`; `frame` (1-based) names the frame of a multi-frame source."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def positive_spacing(value: object) -> tuple[float, float] | None:
    """A (row, column) spacing from a PixelSpacing-like value, None when absent or not positive."""
    values = [float(v) for v in value] if isinstance(value, (MultiValue, list, tuple)) else []
    return (values[0], values[1]) if len(values) == 2 and min(values) > 0 else None


def sc_geometry(volume: Volume, source: Dataset, factor: int) -> tuple[tuple[float, float] | None, tuple[str, str]]:
    """(PixelSpacing or None, PatientOrientation) of a rendering of `source` enlarged `factor` times.

    A cross-sectional source gives both from the volume's geometry. A radiograph (no frame of reference) keeps
    its own PatientOrientation where it has one, and its PixelSpacing only where that is a real spacing
    (some CR write 0\\0).
    """
    orientation = (patient_orientation(volume.row_direction), patient_orientation(volume.column_direction))
    if "FrameOfReferenceUID" in source:
        return (volume.spacing[1] / factor, volume.spacing[2] / factor), orientation
    if len(source.get("PatientOrientation", [])) == 2:
        orientation = tuple(str(v) for v in source.PatientOrientation)
    spacing = positive_spacing(source.get("PixelSpacing"))
    return (None if spacing is None else (spacing[0] / factor, spacing[1] / factor)), orientation


def secondary_capture(
    volume: Volume,
    index: int,
    rendering: tuple[np.ndarray, int],
    manifest: Manifest,
    ctx: ResultContext,
    uid_kind: str,
    uid_index: int,
    series_number: int,
    what: str,
    derivation: str,
) -> Dataset:
    """An RGB Secondary Capture of `rendering` (pixels, enlargement factor) drawn over source slice `index`.

    `uid_kind` names the UID kinds (`<kind>-series`, `<kind>`); `uid_index` numbers objects in that series.
    """
    source = volume.sources[index]
    pixels, factor = rendering
    pixel_spacing, orientation = sc_geometry(volume, source, factor)
    series_uid = source_series_uid(volume)
    with no_person_name_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, f"{uid_kind}-series"
            ),
            series_number=series_number,
            sop_instance_uid=derive_result_uid(
                ctx.org_root, series_uid, manifest.name, manifest.version, uid_kind, uid_index
            ),
            instance_number=uid_index + 1,
            pixel_spacing=pixel_spacing,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description(manifest, what),
            **equipment_kwargs(manifest, ctx),
        )
    # highdicom writes ConversionType DI (digitized film) and no annotation flag; this is a workstation
    # rendering with text burned into the pixels.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SecondaryCaptureDeviceManufacturer = ctx.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = manifest.name
    sc.SecondaryCaptureDeviceSoftwareVersions = software_versions(manifest, ctx)
    sc.DerivationDescription = derivation
    sc.SourceImageSequence = [source_image_item(source, frame_number(volume, index))]
    copy_patient_study(sc, source)
    copy_body_part(sc, source)
    copy_laterality(sc, source)
    add_provenance(sc, manifest, ctx)
    return sc


def build_key_image_sc(volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext) -> Dataset:
    """The key-image Secondary Capture of `result` (RGB, burned-in annotation)."""
    index = key_slice_index(volume, result)
    return secondary_capture(
        volume, index, key_image(volume, result, manifest, index), manifest, ctx,
        uid_kind="sc", uid_index=0, series_number=SC_SERIES_NUMBER, what="key image",
        derivation=f"Key image of {manifest.name} {manifest.version} results drawn over the source slice",
    )
