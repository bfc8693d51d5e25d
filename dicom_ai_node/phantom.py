"""A synthetic chest CT with known answers, for the demo, the tests and the benchmarks.

Anatomy (LPS, mm, voxel centres): an elliptic body cylinder of soft tissue with a spine, a patient table
below it, two ellipsoid lungs of parenchyma (-850 HU) holding emphysema bubbles (-980 HU) and vessels
(+40 HU, z-aligned cylinders that a lung mask must fill), and a trachea that splits into two main bronchi
that enter the lungs (air, which a lung mask must exclude). Ground truth is kept voxel by voxel, so a test
can check lung volumes and the emphysema index LAA-950 of a segmentation against exact values.

Every instance says in its SeriesDescription and ImageComments that it is a synthetic phantom.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

AIR_HU = -1000.0
PARENCHYMA_HU = -850.0
EMPHYSEMA_HU = -980.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 400.0
TABLE_HU = 100.0
NODULE_HU = 30.0  # a solid pulmonary nodule

PHANTOM_PATIENT = {
    "PatientName": "Phantom^Chest",
    "PatientID": "PHANTOM-0001",
    "IssuerOfPatientID": "DICOM_AI_NODE_DEMO",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "ReferringPhysicianName": "Demo^Referrer",
}


@dataclass(frozen=True)
class ChestPhantom:
    datasets: list[Dataset]  # one CT Image Storage dataset per slice, InstanceNumber 1 = most superior
    hu: np.ndarray  # float32 (slices, rows, columns), slices ordered by ascending z (as load_volume sorts)
    right_lung: np.ndarray  # bool, truth (vessels inside, airways outside), same order as hu
    left_lung: np.ndarray  # bool
    airway: np.ndarray  # bool, trachea and main bronchi lumen inside the body (never lung)
    voxel_volume_ml: float
    nodules: np.ndarray | None = None  # bool, solid nodules inside the lungs (None when none were asked for)

    @property
    def right_lung_ml(self) -> float:
        return float(self.right_lung.sum()) * self.voxel_volume_ml

    @property
    def left_lung_ml(self) -> float:
        return float(self.left_lung.sum()) * self.voxel_volume_ml

    @property
    def laa950_percent(self) -> float:
        """Percentage of voxels of both lungs below -950 HU."""
        lungs = self.right_lung | self.left_lung
        return 100.0 * float((self.hu[lungs] < -950).sum()) / float(lungs.sum())

    def write(self, folder: Path) -> list[Path]:
        return write_series(self.datasets, folder, "CT")


def _segment_mask(points: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` of the line segment start-end (a capsule); points has shape (..., 3)."""
    axis = end - start
    t = np.clip(((points - start) @ axis) / float(axis @ axis), 0.0, 1.0)
    nearest = start + t[..., None] * axis
    return np.linalg.norm(points - nearest, axis=-1) <= radius


def make_chest_phantom(
    slices: int = 120,
    size: int = 256,
    pixel_spacing_mm: float = 1.5,
    slice_thickness_mm: float = 2.5,
    seed: int = 0,
    uid_seed: str = "chest-phantom-0",
    noise_hu: float = 15.0,
    blur_mm: float = 1.0,
    nodules: int = 0,
    nodule_radius_mm: tuple[float, float] = (4.0, 12.0),
) -> ChestPhantom:
    """Generate the phantom. `uid_seed` makes all UIDs reproducible; change it to get a new study.

    `blur_mm` (Gaussian sigma) gives edges the partial-volume blur of a real scanner, so a segmentation
    cannot match the truth masks voxel for voxel by thresholding alone.
    """
    rng = np.random.default_rng(seed)
    scale = size * pixel_spacing_mm / 384.0  # anatomy is sized for a 384 mm field of view
    coords = (np.arange(size) - (size - 1) / 2.0) * pixel_spacing_mm
    z_top = 0.0
    z = z_top - (slices - 1 - np.arange(slices)) * slice_thickness_mm  # ascending z, last slice is z_top
    zc = float(z.mean())
    zz, yy, xx = np.meshgrid(z, coords, coords, indexing="ij")

    body = (xx / (160 * scale)) ** 2 + (yy / (110 * scale)) ** 2 <= 1.0
    spine = (xx / (15 * scale)) ** 2 + ((yy - 80 * scale) / (15 * scale)) ** 2 <= 1.0
    table = (np.abs(xx) <= 170 * scale) & (yy >= 125 * scale) & (yy <= 140 * scale)

    def ellipsoid(cx, cy, cz, ax, ay, az):
        return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2 <= 1.0

    lung_half_height = min(110.0, 0.42 * slices * slice_thickness_mm)
    right_shape = ellipsoid(-70 * scale, -5 * scale, zc, 55 * scale, 75 * scale, lung_half_height)
    left_shape = ellipsoid(70 * scale, -5 * scale, zc, 50 * scale, 70 * scale, 0.9 * lung_half_height)

    carina = np.array([0.0, -30 * scale, zc + 0.55 * lung_half_height])
    points = np.stack([xx, yy, zz], axis=-1)
    trachea = (xx ** 2 + (yy + 30 * scale) ** 2 <= (9 * scale) ** 2) & (zz >= carina[2])
    right_tip = np.array([-35 * scale, -10 * scale, carina[2] - 15])
    left_tip = np.array([35 * scale, -10 * scale, carina[2] - 15])
    airway = trachea | _segment_mask(points, carina, right_tip, 5 * scale) | _segment_mask(
        points, carina, left_tip, 5 * scale
    )
    del points

    hu = np.full(zz.shape, AIR_HU, dtype=np.float32)
    hu[table] = TABLE_HU
    hu[body] = SOFT_TISSUE_HU
    hu[spine & body] = BONE_HU
    lungs = (right_shape | left_shape) & body
    hu[lungs] = PARENCHYMA_HU

    # Emphysema bubbles, kept away from the bronchus tips so airway growing cannot leak into them.
    for shape, cx, ax, ay in ((right_shape, -70, 55, 75), (left_shape, 70, 50, 70)):
        for _ in range(10):
            for _attempt in range(50):
                u = rng.uniform(-0.55, 0.55, size=3)
                centre = np.array([cx * scale + u[0] * ax * scale, -5 * scale + u[1] * ay * scale,
                                   zc + u[2] * 0.8 * lung_half_height])
                radius = rng.uniform(10, 18) * scale
                if min(np.linalg.norm(centre - right_tip), np.linalg.norm(centre - left_tip)) > radius + 12:
                    break
            bubble = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2) <= radius ** 2
            hu[bubble & shape & body] = EMPHYSEMA_HU

    # Vessels: z-aligned cylinders well inside each lung (a slice-wise hole fill must include them).
    for cx, ax, ay in ((-70, 55, 75), (70, 50, 70)):
        for dx, dy in ((-0.35, -0.3), (0.3, 0.35), (0.0, 0.0), (-0.2, 0.45)):
            vx, vy = (cx + dx * ax) * scale, (-5 + dy * ay) * scale
            vessel = ((xx - vx) ** 2 + (yy - vy) ** 2 <= (3 * scale) ** 2) & (np.abs(zz - zc) <= 0.5 * lung_half_height)
            hu[vessel] = SOFT_TISSUE_HU

    nodule_mask = None
    if nodules:
        # Own generator: asking for nodules must not change the rest of the phantom.
        nodule_mask = _nodules(np.random.default_rng([seed, 1]), xx, yy, zz, right_shape, left_shape, body,
                               nodules, nodule_radius_mm, scale, zc, lung_half_height)
        hu[nodule_mask] = NODULE_HU
    hu[airway & body] = AIR_HU
    if blur_mm > 0:
        sigma = (blur_mm / slice_thickness_mm, blur_mm / pixel_spacing_mm, blur_mm / pixel_spacing_mm)
        hu = ndimage.gaussian_filter(hu, sigma=sigma).astype(np.float32)
    hu += rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
    hu = stored.astype(np.float32) - 1024.0  # the truth is what the pixels say

    right_lung = right_shape & body & ~airway
    left_lung = left_shape & body & ~airway
    datasets = _datasets(stored, z, coords, pixel_spacing_mm, slice_thickness_mm, uid_seed)
    voxel_ml = pixel_spacing_mm * pixel_spacing_mm * slice_thickness_mm / 1000.0
    return ChestPhantom(datasets, hu, right_lung, left_lung, airway & body, voxel_ml,
                        None if nodule_mask is None else nodule_mask & ~airway)


def _nodules(rng: np.random.Generator, xx, yy, zz, right_shape, left_shape, body, count: int,
             radius_mm: tuple[float, float], scale: float, zc: float, lung_half_height: float) -> np.ndarray:
    """`count` solid spheres wholly inside a lung, not touching each other (so each is one nodule)."""
    mask = np.zeros(xx.shape, dtype=bool)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        for _attempt in range(100):
            side = rng.integers(2)
            cx, ax, ay, shape = ((-70, 55, 75, right_shape), (70, 50, 70, left_shape))[side]
            u = rng.uniform(-0.6, 0.6, size=3)
            centre = np.array([cx * scale + u[0] * ax * scale, -5 * scale + u[1] * ay * scale,
                               zc + u[2] * 0.7 * lung_half_height])
            radius = float(rng.uniform(*radius_mm))
            sphere = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2) <= radius ** 2
            apart = all(np.linalg.norm(centre - c) > radius + r + 4.0 for c, r in placed)
            if sphere.any() and apart and not (sphere & ~(shape & body)).any():
                placed.append((centre, radius))
                mask |= sphere
                break
    return mask


def write_series(datasets: list[Dataset], folder: Path, prefix: str) -> list[Path]:
    """Save a phantom series as <prefix><InstanceNumber>.dcm files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{prefix}{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def synthetic_instance(sop_class_uid: str, sop_uid: str, patient: dict[str, str] = PHANTOM_PATIENT) -> Dataset:
    """A new instance with its file meta, a phantom patient, and the labels saying it is synthetic."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.Manufacturer = "dicom-ai-node synthetic phantom"
    ds.InstitutionName = "Synthetic"
    ds.ImageComments = "Synthetic phantom generated by dicom-ai-node; not a patient."
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    return ds


def set_grayscale_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    """The Image Pixel module of a 16-bit MONOCHROME2 image (signed when `pixels` is)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()


def _datasets(stored: np.ndarray, z: np.ndarray, coords: np.ndarray, pixel_spacing: float,
              thickness: float, uid_seed: str) -> list[Dataset]:
    study_uid = generate_uid(entropy_srcs=[uid_seed, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[uid_seed, "frame-of-reference"])
    now = dt.datetime(2026, 1, 15, 9, 30, 0)
    slices = stored.shape[0]
    datasets = []
    for k in range(slices):
        instance_number = slices - k  # instance 1 is the most superior slice, as a head-first scan
        sop_uid = generate_uid(entropy_srcs=[uid_seed, "instance", str(instance_number)])
        ds = synthetic_instance(CTImageStorage, sop_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = "DEMO0001"
        ds.Modality = "CT"
        ds.StudyDescription = "CT CHEST (synthetic phantom)"
        ds.SeriesDescription = "Chest 2.5 mm (synthetic phantom)"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        ds.ImagePositionPatient = [f"{coords[0]:.4f}", f"{coords[0]:.4f}", f"{z[k]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z[k]:.4f}"
        set_grayscale_pixels(ds, stored[k], bits_stored=12)
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        datasets.append(ds)
    return datasets
