"""ct_nodule_unet: solid pulmonary nodules on chest CT, by a 3D UNet trained on synthetic phantoms.

The model is a MONAI bundle (bundle/) run through the node's runtime with the bundle's own preprocessing,
sliding-window inferer and postprocessing (inverted back to the series' voxels). Each connected nodule
becomes its own segment, largest first, with its volume and equivalent-sphere diameter.
Trained on synthetic data, not for diagnostic use.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Concept, Measurement, Pipeline, PipelineResult, RunContext, Segment
from dicom_ai_node.runtime.bundle import MonaiBundle

MORPHOLOGICALLY_ALTERED = Concept("49755003", "SCT", "Morphologically Altered Structure")
NODULE = Concept("27925004", "SCT", "Nodule")
LUNG = Concept("39607008", "SCT", "Lung")
VOLUME = Concept("118565006", "SCT", "Volume")
DIAMETER = Concept("81827009", "SCT", "Diameter")
MILLILITER = Concept("mL", "UCUM", "milliliter")
MILLIMETER = Concept("mm", "UCUM", "millimeter")
MIN_NODULE_ML = 0.05  # a 4.6 mm sphere: smaller components are noise; the smallest trained nodule is 8 mm across
LUNG_HU = -400.0  # aerated lung is below this
MIN_LUNG_SHELL = 0.5  # a pulmonary nodule lies in lung: at least half the voxels around it are aerated
MAX_NODULES = 20


class NoduleSegmentation(Pipeline):
    bundle: MonaiBundle

    def load(self, device: str) -> None:
        assert self.manifest.folder is not None and self.manifest.model is not None
        self.bundle = MonaiBundle(self.manifest.folder / self.manifest.model.path, device,
                                  amp=self.manifest.model.amp, compile=self.manifest.model.compile)

    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        if volume.unit != "HU":
            raise ValueError(f"ct_nodule_unet needs CT in Hounsfield units, got unit {volume.unit!r}")
        nodules = self.bundle.run(volume, context.work_dir).labels() == 1
        return nodule_result(volume, nodules)


def in_lung(volume: Volume, mask: np.ndarray) -> bool:
    """False-positive reduction: a pulmonary nodule lies in lung, so most of a ring 2 to 3 voxels around the
    candidate is aerated (the ring starts two voxels out so that an under-segmented nodule's own rim does not
    count). The network was trained on nodules inside the lungs; a candidate in soft tissue is not one."""
    box = ndimage.find_objects(mask.astype(np.int8))[0]
    box = tuple(slice(max(0, s.start - 4), s.stop + 4) for s in box)
    local = mask[box]
    ring = ndimage.binary_dilation(local, iterations=3) & ~ndimage.binary_dilation(local, iterations=1)
    return bool(ring.any()) and float((volume.array[box][ring] < LUNG_HU).mean()) >= MIN_LUNG_SHELL


def nodule_result(volume: Volume, nodules: np.ndarray) -> PipelineResult:
    components, count = ndimage.label(nodules)
    sizes = ndimage.sum_labels(nodules, components, index=np.arange(1, count + 1)) if count else np.array([])
    large = [int(k) + 1 for k in np.argsort(-sizes) if sizes[k] * volume.voxel_volume_ml >= MIN_NODULE_ML]
    keep = [k for k in large if in_lung(volume, components == k)]
    result = PipelineResult()
    for number, component in enumerate(keep[:MAX_NODULES], start=1):
        mask = components == component
        ml = float(mask.sum()) * volume.voxel_volume_ml
        result.segments.append(Segment(number, f"Nodule {number}", MORPHOLOGICALLY_ALTERED, NODULE, mask,
                                       anatomic_region=LUNG, color_rgb=(255, 160, 0)))
        result.measurements += [
            Measurement(VOLUME, round(ml, 3), MILLILITER, segment_number=number),
            Measurement(DIAMETER, round((6000.0 * ml / np.pi) ** (1 / 3), 1), MILLIMETER, segment_number=number),
        ]
    if len(keep) > MAX_NODULES:
        result.notes.append(f"{len(keep)} nodules found; the {MAX_NODULES} largest are reported.")
    if result.segments:
        first = result.segments[0].mask.sum(axis=(1, 2))
        result.key_slice = int(np.argmax(first))
    else:
        result.notes.append("No nodule found.")
    result.notes.append(f"{min(len(keep), MAX_NODULES)} nodule(s) of at least {MIN_NODULE_ML * 1000:.0f} mm3 "
                        "(diameter: of the sphere of equal volume).")
    return result
