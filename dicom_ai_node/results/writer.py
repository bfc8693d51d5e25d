"""PipelineResult -> the DICOM result objects a pipeline's manifest asks for, and their durable files."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Manifest, PipelineResult
from dicom_ai_node.results.encoding import dicom_file_bytes
from dicom_ai_node.results.gsps import build_gsps
from dicom_ai_node.results.heatmap_sc import build_heatmap_scs
from dicom_ai_node.results.pmap import build_parametric_maps, has_frame_of_reference
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.sc import build_key_image_sc
from dicom_ai_node.results.seg import SEG_TYPES, build_seg
from dicom_ai_node.results.sr import build_sr, has_report_content
from dicom_ai_node.results.sr_viewer import build_viewer_sr

RESULT_KINDS = ("seg", "sr", "sc", "pmap", "heatmap_sc", "gsps")
DEFAULT_KINDS = ("seg", "sr", "sc")
SR_BUILDERS = {"full": build_sr, "viewer": build_viewer_sr}
SR_PROFILES = tuple(SR_BUILDERS)


def write_results(
    volume: Volume,
    result: PipelineResult,
    manifest: Manifest,
    ctx: ResultContext,
    kinds: Sequence[str] = DEFAULT_KINDS,
    seg_type: str | None = None,
    sr_profile: str = "full",
) -> list[Dataset]:
    """The result objects of `kinds`, SEG before the SR that references it.

    Kinds: "seg" (encoded as `seg_type`: "binary", "fractional" or "labelmap"; None picks fractional for
    probability masks, else binary), "sr" (TID 1500, laid out as `sr_profile`: "full", or "viewer" where every
    measurement group has image coordinates, see sr_viewer.py), "sc" (key image), "pmap" (a Parametric Map per
    heatmap), "heatmap_sc" (an RGB rendering per heatmap), "gsps" (detections drawn on the source).

    Objects with nothing to encode are not made: no SEG without segments, no SR without measurements,
    findings or detections (TID 1500 needs at least one group), no Parametric Map or heatmap SC without
    heatmaps, no GSPS without detections; and no Parametric Map of a source without a frame of reference
    (a radiograph; the IOD requires one), whose heatmaps only the heatmap SC shows.
    Every builder copies the patient/study elements from the source and keeps the file meta in step.
    """
    return list(build_results(volume, result, manifest, ctx, kinds, seg_type, sr_profile))


def build_results(
    volume: Volume,
    result: PipelineResult,
    manifest: Manifest,
    ctx: ResultContext,
    kinds: Sequence[str] = DEFAULT_KINDS,
    seg_type: str | None = None,
    sr_profile: str = "full",
) -> Iterator[Dataset]:
    """The objects of write_results, in the same order, each built only when the next is asked for, so
    that the caller checks and saves one while the rest are still to come (see validate.gate). The
    arguments are checked at once, before any object is built."""
    unknown = sorted(set(kinds) - set(RESULT_KINDS))
    if unknown:
        raise ValueError(f"unknown result kinds {unknown}; known: {', '.join(RESULT_KINDS)}")
    if seg_type is not None and seg_type not in SEG_TYPES:
        raise ValueError(f"unknown seg_type {seg_type!r}; known: {', '.join(SEG_TYPES)}")
    if sr_profile not in SR_BUILDERS:
        raise ValueError(f"unknown sr_profile {sr_profile!r}; known: {', '.join(SR_PROFILES)}")
    if "sr" in kinds and result.segments and "seg" not in kinds:
        raise ValueError("an SR of a result with segments references their SEG: add 'seg' to the kinds")
    return (sync_file_meta(ds) for ds in _built(volume, result, manifest, ctx, kinds, seg_type, sr_profile))


def _built(
    volume: Volume, result: PipelineResult, manifest: Manifest, ctx: ResultContext, kinds: Sequence[str],
    seg_type: str | None, sr_profile: str,
) -> Iterator[Dataset]:
    seg = build_seg(volume, result, manifest, ctx, seg_type) if "seg" in kinds and result.segments else None
    if seg is not None:
        yield seg
    if "sr" in kinds and has_report_content(result):
        yield SR_BUILDERS[sr_profile](volume, result, manifest, ctx, seg)
    if "sc" in kinds:
        yield build_key_image_sc(volume, result, manifest, ctx)
    if "pmap" in kinds and result.heatmaps and has_frame_of_reference(volume):
        yield from build_parametric_maps(volume, result, manifest, ctx)
    if "heatmap_sc" in kinds:
        yield from build_heatmap_scs(volume, result, manifest, ctx)
    if "gsps" in kinds and result.detections:
        yield build_gsps(volume, result, manifest, ctx)


def sync_file_meta(ds: Dataset) -> Dataset:
    """Make the file meta name the dataset's own SOP class and instance (PS3.10); returns `ds`."""
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def file_name(ds: Dataset) -> str:
    """`<SOPInstanceUID>.dcm`; the UID is validated first because it becomes a path."""
    uid = str(ds.get("SOPInstanceUID", ""))
    if not UID(uid).is_valid:
        raise ValueError(f"SOPInstanceUID {uid!r} is not a valid UID; refusing to use it as a file name")
    return f"{uid}.dcm"


def encode(ds: Dataset) -> bytes:
    """`ds` as the bytes of its DICOM file (preamble, file meta, data set), exactly as `save` writes it and as
    pydicom's `save_as` would (encoding.py, ~5x faster)."""
    return dicom_file_bytes(ds)


def save(ds: Dataset, folder: Path, encoded: bytes | None = None) -> Path:
    """Write `ds` into `folder` atomically (tmp file, fsync, rename, fsync of the folder); returns its path.

    `encoded` is `ds` already encoded (`encode(ds)`), written as it is; None encodes it here.
    A re-save of the same object replaces the file, so readers see the old or the new file, never a part.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name(ds)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(encode(ds) if encoded is None else encoded)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)
    return target
