"""The generic segmentation pipeline: a pipeline.yaml with a `model` and no entrypoint.

It runs the model (a MONAI bundle with its own transforms, or a bare TorchScript/ONNX file), and reports
every labelled segment the manifest codes, present or not (an empty segment says "looked, found none"),
with its volume. This is what lets an operator drop in a zoo bundle with a pipeline.yaml and no code.
"""
from __future__ import annotations

import numpy as np

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import (Concept, Manifest, Measurement, Pipeline, PipelineResult, RunContext, Segment,
                                    SegmentLabel)

VOLUME = Concept("118565006", "SCT", "Volume")
MILLILITER = Concept("mL", "UCUM", "milliliter")


class ModelSegmentation(Pipeline):
    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        assert manifest.model is not None and manifest.folder is not None
        self.spec = manifest.model
        self.path = manifest.folder / manifest.model.path

    def load(self, device: str) -> None:
        if self.spec.format == "monai_bundle":
            from dicom_ai_node.runtime.bundle import BundleError, MonaiBundle

            self.bundle = MonaiBundle(self.path, device, amp=self.spec.amp, compile=self.spec.compile,
                                      cpu_amp=self.spec.cpu_amp)
            uncoded = {k: v for k, v in self.bundle.meta.channels.items() if k and k not in self.spec.labels}
            if uncoded:
                raise BundleError(f"{self.manifest.folder}/pipeline.yaml: model.labels lacks "
                                  + ", ".join(f"{k} ({v!r})" for k, v in uncoded.items())
                                  + " of the bundle's channel_def")
        else:
            from dicom_ai_node.runtime.models import BareModel

            self.bare = BareModel(self.path, self.spec, device)

    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        if self.spec.format == "monai_bundle":
            labels = self.bundle.run(volume, context.work_dir).labels()
        else:
            labels = self.bare.labels(volume.array)
        if labels.shape != volume.array.shape:
            raise ValueError(f"model output shape {labels.shape} differs from the series {volume.array.shape}")
        return segmentation_result(volume, labels, self.spec.labels)


def segmentation_result(volume: Volume, labels: np.ndarray, coded: dict[int, SegmentLabel]) -> PipelineResult:
    result = PipelineResult()
    for number, (value, code) in enumerate(sorted(coded.items()), start=1):
        mask = labels == value
        result.segments.append(Segment(
            number=number, label=code.label, category=code.category.concept(), type=code.type.concept(), mask=mask,
            anatomic_region=code.anatomic_region.concept() if code.anatomic_region else None,
            color_rgb=code.color_rgb,
        ))
        result.measurements.append(Measurement(VOLUME, round(float(mask.sum()) * volume.voxel_volume_ml, 2),
                                               MILLILITER, segment_number=number))
    areas = np.isin(labels, list(coded)).sum(axis=(1, 2))
    result.key_slice = int(np.argmax(areas)) if areas.any() else labels.shape[0] // 2
    if not areas.any():
        result.notes.append("The model found none of its labels in this series.")
    return result
