"""A synthetic frontal chest radiograph (DX, for presentation) with an optional solid nodule, with truth.

Drawn as a projection (brighter = more attenuation, MONOCHROME2): a body of rounded thickness, two lung
fields of lower attenuation, the mediastinum and heart, curved ribs and clavicles over the lungs, Gaussian
blur and noise; a nodule is a soft-edged disc of extra attenuation wholly inside one lung field. Used to
train and test the 2D classifier pipeline (cr_nodule_classifier) and its Grad-CAM. Every instance says it
is a synthetic phantom.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
from scipy import ndimage

from dicom_ai_node.phantom import set_grayscale_pixels, synthetic_instance, write_series


@dataclass(frozen=True)
class ChestRadiograph:
    dataset: Dataset
    pixels: np.ndarray  # uint16 (rows, columns), stored values, MONOCHROME2
    nodule: np.ndarray | None  # bool (rows, columns): the nodule's disc, None when there is none
    lungs: np.ndarray  # bool (rows, columns): both lung fields

    def write(self, folder: Path) -> list[Path]:
        return write_series([self.dataset], folder, "DX")


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def radiograph_pixels(rng: np.random.Generator, size: int, nodule: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(uint16 image, nodule truth or None, lung fields) on a size x size grid; anatomy varies with `rng`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # unit square, rows down, columns right
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731
    body_r = _ellipse(yy, xx, 0.55 + jitter(0.03), 0.5 + jitter(0.02), 0.62, 0.44 + jitter(0.03))
    image = np.where(body_r < 1, 900.0 * np.sqrt(np.clip(1 - body_r, 0, 1)) + 300.0, 150.0)
    lungs = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        cx = 0.5 + side * (0.19 + jitter(0.02))
        lung_r = _ellipse(yy, xx, 0.47 + jitter(0.03), cx, 0.27 + jitter(0.03), 0.13 + jitter(0.015))
        field = lung_r < 1
        image -= np.where(field, 520.0 * np.sqrt(np.clip(1 - lung_r, 0, 1)) + 60.0, 0.0)
        lungs |= field
    heart_r = _ellipse(yy, xx, 0.62 + jitter(0.02), 0.53 + jitter(0.02), 0.14, 0.12 + jitter(0.02))
    image += np.where(heart_r < 1, 350.0 * np.sqrt(np.clip(1 - heart_r, 0, 1)), 0.0)
    image += np.where(np.abs(xx - 0.5) < 0.045, 180.0, 0.0) * (body_r < 1)  # mediastinum and spine
    for k in range(9):  # ribs: arcs that curve down from the spine
        y0 = 0.22 + k * (0.065 + jitter(0.004))
        curve = y0 + 1.1 * (xx - 0.5) ** 2
        image += np.where((np.abs(yy - curve) < 0.012) & (body_r < 1), 110.0, 0.0)
    for side in (-1, 1):  # clavicles
        line = 0.2 + 0.05 * np.abs(xx - 0.5)
        image += np.where((np.abs(yy - line) < 0.014) & (np.abs(xx - 0.5) > 0.06) & (np.abs(xx - 0.5) < 0.33)
                          & ((xx - 0.5) * side > 0), 160.0, 0.0)
    truth = None
    if nodule:
        field_points = np.argwhere(ndimage.binary_erosion(lungs, iterations=max(2, size // 16)))
        cy, cx = field_points[rng.integers(len(field_points))]
        radius = rng.uniform(0.025, 0.05) * size
        r = np.hypot(np.arange(size)[:, None] - cy, np.arange(size)[None, :] - cx)
        truth = r <= radius
        image += rng.uniform(160.0, 260.0) * np.clip((radius + 1.5 - r) / 3.0, 0.0, 1.0)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0.0, 15.0, image.shape)
    return np.clip(np.rint(image), 0, 4095).astype(np.uint16), truth, lungs


def make_chest_radiograph(seed: int = 0, nodule: bool = True, size: int = 256, pixel_spacing_mm: float = 1.4,
                          uid_seed: str | None = None) -> ChestRadiograph:
    rng = np.random.default_rng([seed, 11])
    pixels, truth, lungs = radiograph_pixels(rng, size, nodule)
    uid_seed = uid_seed or f"chest-radiograph-{seed}"
    ds = synthetic_instance(DigitalXRayImageStorageForPresentation,
                            generate_uid(entropy_srcs=[uid_seed, "instance"]))
    now = dt.datetime(2026, 1, 15, 10, 0, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "DEMO0002"
    ds.Modality = "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDescription = "XR CHEST PA (synthetic phantom)"
    ds.SeriesDescription = "Chest PA (synthetic phantom)"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.StudyID = "2"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    set_grayscale_pixels(ds, pixels, bits_stored=12)
    ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "700"
    ds.WindowWidth = "1400"
    return ChestRadiograph(ds, pixels, truth, lungs)
