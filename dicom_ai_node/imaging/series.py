"""load_series: any series the node takes (slices, multi-frame stacks, a projection image) -> Volume."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_ai_node.imaging.instances import PROJECTION, image_series_uid, instance_kind, read_instances
from dicom_ai_node.imaging.projection import projection_volume
from dicom_ai_node.imaging.volume import Volume, cross_sectional_volume


def load_series(paths: Sequence[Path | str], spacing_tolerance_mm: float = 0.05) -> Volume:
    """Read the instances of one series into a Volume, with the loader their SOP class and frames need.

    - single-frame CT/MR/PET slices, or any single-frame image with ImagePositionPatient: stacked along the
      normal (volume.load_volume);
    - multi-frame instances with functional groups (Enhanced / Legacy Converted Enhanced CT/MR/PET): their
      frames stacked the same way, Volume.frame_numbers naming each slice's frame;
    - one projection image (CR, DX, MG, IO, secondary capture): a Volume of one slice (imaging.projection).

    Raises VolumeError, naming the series, instance (and frame) UIDs and the tag, for non-image instances,
    colour images, mixed series or kinds, and every geometry problem load_volume detects.
    """
    return series_volume(read_instances(paths), spacing_tolerance_mm)


def series_volume(datasets: Sequence[Dataset], spacing_tolerance_mm: float = 0.05) -> Volume:
    """The Volume of the instances of one series already read (load_series once the files are read)."""
    series_uid = image_series_uid(datasets)
    if all(instance_kind(ds) == PROJECTION for ds in datasets):
        return projection_volume(datasets, series_uid)
    return cross_sectional_volume(datasets, series_uid, spacing_tolerance_mm)
