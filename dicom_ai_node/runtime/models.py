"""Bare models: a TorchScript or ONNX file that the node feeds itself, by sliding window.

A bare model gets the volume as a (1, 1, slices, rows, columns) float32 tensor, its `intensity_window`
scaled to [0, 1] and clipped, and returns (1, channels, slices, rows, columns) logits (several channels:
softmax then argmax; one channel: sigmoid above 0.5). MONAI's sliding_window_inference tiles the volume with
Gaussian blending; on GPU the windows run in float16 autocast (TorchScript) and the stitched output is
kept on the CPU so a large volume never needs GPU memory for more than the windows in flight.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_ai_node.pipeline import ModelSpec
from dicom_ai_node.runtime.infer import run_inferer


class OnnxPredictor:
    """An ONNX Runtime session as a torch callable (tensor in, tensor out)."""

    def __init__(self, path: Path, device: str) -> None:
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        import torch

        output = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(output).to(x.device)


class BareModel:
    def __init__(self, path: Path, spec: ModelSpec, device: str) -> None:
        import torch

        self.spec = spec
        self.device = device
        if spec.format == "onnx":
            self.predictor = OnnxPredictor(path, device)
            self.amp = False  # the graph's own precision decides
        else:
            module = torch.jit.load(str(path), map_location=device).eval()
            if spec.compile:  # TorchScript's own ahead-of-time optimisation (torch.compile does not take it)
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
            self.predictor = module
            self.amp = spec.amp

    def logits(self, array: np.ndarray):
        """Stitched network output (1, channels, slices, rows, columns) on the CPU."""
        import torch
        from monai.inferers import SlidingWindowInferer

        low, high = self.spec.intensity_window or (float(array.min()), float(array.max()) or 1.0)
        x = torch.from_numpy(np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32))[None, None]
        inferer = SlidingWindowInferer(roi_size=self.spec.roi_size, sw_batch_size=self.spec.sw_batch_size,
                                       overlap=self.spec.overlap, mode="gaussian", sw_device=self.device,
                                       device="cpu")
        # The volume stays on the CPU: only the windows in flight go to the device (sw_device).
        return run_inferer(inferer, self.predictor, x, self.device, self.amp, self.spec.cpu_amp)

    def labels(self, array: np.ndarray) -> np.ndarray:
        output = self.logits(array)[0]
        if output.shape[0] > 1:
            return output.argmax(0).numpy().astype(np.int16)
        return (output[0] > 0).numpy().astype(np.int16)  # sigmoid(x) > 0.5
