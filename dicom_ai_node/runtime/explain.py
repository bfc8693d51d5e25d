"""Grad-CAM heatmaps (MONAI's GradCAM) for classifiers: where in the image the predicted class came from."""
from __future__ import annotations

import numpy as np


def grad_cam(network, batch, target_layer: str, class_index: int) -> np.ndarray:
    """Grad-CAM of `class_index` at `target_layer` (a module name of `network`, e.g. "net.layer_3"),
    upsampled to the input's spatial size and scaled to [0, 1]; shape (batch, 1, *spatial).

    Needs gradients, so it runs outside inference mode and in full precision; the network's weights are
    not changed (no optimiser step) and its eval mode is kept.
    """
    import torch
    from monai.visualize import GradCAM

    names = dict(network.named_modules())
    if target_layer not in names:
        raise ValueError(f"Grad-CAM layer {target_layer!r} is not a module of the network; "
                         f"modules: {', '.join(n for n in names if n)}")
    # MONAI's default normalizer maps (min, max) to (1, 0), for its own colour maps; a heatmap result wants
    # the evidence as the high value, so the raw map is scaled here, min to 0 and max to 1.
    cam = GradCAM(nn_module=network, target_layers=target_layer, postprocessing=_zero_to_one)
    with torch.enable_grad():
        heat = cam(batch.float().clone().requires_grad_(True), class_idx=class_index)
    return np.asarray(heat.detach().cpu(), dtype=np.float32)


def _zero_to_one(x):
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1).values.reshape(-1, *([1] * (x.ndim - 1)))
    high = flat.max(dim=1).values.reshape(-1, *([1] * (x.ndim - 1)))
    return (x - low) / (high - low).clamp_min(1e-12)
