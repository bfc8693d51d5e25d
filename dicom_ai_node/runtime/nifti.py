"""The hand-over between a Volume and a MONAI bundle: a NIfTI file the bundle's own LoadImaged reads, and
its prediction brought back to the Volume's (slices, rows, columns) order.

SimpleITK writes the Volume's LPS geometry into the NIfTI header (as RAS, the NIfTI convention); MONAI
reads it with nibabel as an array indexed (x=column, y=row, z=slice). So the file is the bundle's usual
input and every spatial transform of its preprocessing (Orientationd, Spacingd, ...) sees real geometry.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_ai_node.imaging.volume import Volume


def write_nifti(volume: Volume, path: Path, spatial_dims: int = 3) -> Path:
    """Save the volume for a bundle: 3D, or 2D (one slice, x=column, y=row) for a 2D network."""
    if spatial_dims == 2:
        if volume.array.shape[0] != 1:
            raise ValueError(f"a 2D model needs a single image, the series has {volume.array.shape[0]} slices")
        image = sitk.GetImageFromArray(volume.array[0])
        image.SetSpacing((volume.spacing[2], volume.spacing[1]))
    else:
        image = volume.to_sitk()
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


def to_volume_order(array: np.ndarray, spatial_dims: int = 3) -> np.ndarray:
    """(channels, x, y[, z]) as read from the NIfTI -> (channels, slices, rows, columns)."""
    if spatial_dims == 2:
        return np.transpose(array, (0, 2, 1))[:, None]
    return np.transpose(array, (0, 3, 2, 1))
