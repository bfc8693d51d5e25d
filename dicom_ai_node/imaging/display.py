"""Display values: a slice of a Volume through its source's VOI LUT or window, as a viewer shows it.

Volume.array keeps modality values; only a pipeline (or a result builder) that needs what a radiologist
sees asks for these. Order as in PS3.4 N.2: Modality LUT (already in the array) -> VOI LUT or window ->
presentation (MONOCHROME1 inverted), giving uint8 where higher is brighter.
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut

from dicom_ai_node.imaging.frames import frame_header, is_monochrome1, monochrome1_mirror
from dicom_ai_node.imaging.volume import Volume

VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")
DISPLAY_BITS = 8  # pydicom windows into 0 .. 2**BitsStored - 1 of the dataset it is given


def slice_header(volume: Volume, index: int) -> Dataset:
    """The attributes that apply to slice `index` (a frame's flattened functional groups for multi-frame)."""
    ds, number = volume.source_frames[index]
    return frame_header(ds, number) if volume.is_multiframe else ds


def has_window(header: Dataset) -> bool:
    """A window pydicom can apply: LINEAR needs width >= 1, the other functions a positive width."""
    if header.get("WindowCenter") in (None, "") or header.get("WindowWidth") in (None, ""):
        return False
    element = header["WindowWidth"]
    width = float(element.value[0] if element.VM > 1 else element.value)
    linear = str(header.get("VOILUTFunction", "LINEAR")).strip().upper() in ("LINEAR", "")
    return width >= 1 if linear else width > 0


def voi_view(header: Dataset) -> Dataset:
    """The header's VOI attributes alone, over an 8-bit unsigned image so that a window maps to 0..255."""
    view = Dataset()
    for keyword in VOI_KEYWORDS:
        if keyword in header:
            view[keyword] = header[keyword]
    if getattr(header, "file_meta", None) is not None:
        view.file_meta = header.file_meta  # the byte order of an OW LUTData
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = DISPLAY_BITS
    view.PixelRepresentation = 0
    return view


def voi_grey(values: np.ndarray, header: Dataset) -> np.ndarray:
    """Modality values -> [0, 1] through the VOI LUT, else the first window, else the slice's full range."""
    view = voi_view(header)
    if view.get("VOILUTSequence"):
        entries, first_mapped, _ = (int(v) for v in view.VOILUTSequence[0].LUTDescriptor)
        lut = apply_voi_lut(np.arange(first_mapped, first_mapped + (entries or 2**16)), view).astype(np.float64)
        # Scaled by the LUT's own range: many LUTs declare 16 bits per entry and fill only 12.
        low, high = float(lut.min()), float(lut.max())
        return (apply_voi_lut(np.rint(values).astype(np.int64), view) - low) / max(high - low, 1.0)
    if has_window(header):
        return apply_voi_lut(values, view) / float(2**DISPLAY_BITS - 1)
    low, high = float(values.min()), float(values.max())
    return (values - low) / max(high - low, np.finfo(np.float64).tiny)


def display_pixels(volume: Volume, index: int) -> np.ndarray:
    """Slice `index` as uint8 display values (rows, columns), higher brighter, with the source's VOI."""
    header = slice_header(volume, index)
    values = volume.array[index].astype(np.float64)
    monochrome1 = is_monochrome1(header)
    if monochrome1:
        values = monochrome1_mirror(header) - values  # the source's window is in its MONOCHROME1 values
    grey = np.clip(voi_grey(values, header), 0.0, 1.0)
    if monochrome1:
        grey = 1.0 - grey
    return np.rint(grey * 255.0).astype(np.uint8)
