"""cr_nodule_classifier: is there a solid nodule on this frontal chest radiograph? With a Grad-CAM heatmap.

The model is a MONAI bundle (bundle/) run through the node's runtime: the bundle's own preprocessing,
inferer and postprocessing; Grad-CAM at the layer the bundle names (`gradcam_layer`) is brought back to the
radiograph's pixels by inverting the bundle's preprocessing. Trained on synthetic data, not for diagnostic use.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.pipeline import Concept, Finding, Heatmap, Pipeline, PipelineResult, RunContext
from dicom_ai_node.runtime.bundle import MonaiBundle
from dicom_ai_node.runtime.explain import grad_cam

FINDING = Concept("121071", "DCM", "Finding")
PULMONARY_NODULE = Concept("786838002", "SCT", "Pulmonary nodule")
NODULE_CLASS = 1


class NoduleClassifier(Pipeline):
    bundle: MonaiBundle

    def load(self, device: str) -> None:
        assert self.manifest.folder is not None
        model = self.manifest.model
        self.bundle = MonaiBundle(self.manifest.folder / "bundle", device, amp=model.amp if model else True,
                                  compile=model.compile if model else False)
        self.layer = str(self.bundle.parser["gradcam_layer"])

    def classify(self, volume: Volume, work_dir: Path | None = None) -> tuple[float, np.ndarray]:
        """(probability of a nodule, Grad-CAM of the nodule class in the radiograph's pixels, (1, rows, cols))."""
        import torch

        with tempfile.TemporaryDirectory(dir=work_dir, prefix="classify-") as tmp:
            data = self.bundle.preprocess(volume, Path(tmp))
        data["pred"] = self.bundle.infer(data).cpu()
        probability = float(self.bundle.postprocessing(data)["pred"][NODULE_CLASS])
        batch = data[self.bundle.meta.input_key].unsqueeze(0).to(self.bundle.device)
        cam = grad_cam(self.bundle.module, batch, self.layer, NODULE_CLASS)[0]
        heat = self.bundle.to_original(data, "cam", torch.from_numpy(cam))[0]
        return probability, np.clip(heat, 0.0, 1.0).astype(np.float32)

    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        probability, heat = self.classify(volume, context.work_dir)
        return PipelineResult(
            findings=[Finding(FINDING, PULMONARY_NODULE, probability=round(probability, 4))],
            heatmaps=[Heatmap("Grad-CAM pulmonary nodule", heat)],
            key_slice=0,
            notes=[f"Probability of a pulmonary nodule {probability:.2f}; the heatmap is Grad-CAM of the nodule "
                   f"class at {self.layer}, scaled to [0, 1] per image (not a probability)."],
        )
