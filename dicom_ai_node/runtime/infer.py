"""Running a network fast on its device: memory format, mixed precision, compilation.

`prepare_network` puts a network on its device once, when the worker starts (a warm model): eval mode,
weights in channels-last layout (what oneDNN on CPU and cuDNN tensor cores run fastest; the numbers are the
same), cuDNN autotuning on GPU; `CompiledNetwork` is its torch.compile'd form. `run_inferer` runs an inferer (the bundle's own
SlidingWindowInferer, or any MONAI inferer) under inference mode with AMP where it applies, and turns a CUDA
out-of-memory error into DeviceBusy so the job waits instead of failing.
"""
from __future__ import annotations

from dicom_ai_node.runtime.device import inference_context, out_of_memory_as_busy


def channels_last_format(spatial_dims: int):
    import torch

    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def prepare_network(network, device: str, spatial_dims: int):
    import torch

    network = network.to(device).eval()
    if isinstance(network, torch.nn.Module) and not isinstance(network, torch.jit.ScriptModule):
        network = network.to(memory_format=channels_last_format(spatial_dims))
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed window size: the autotuned kernels are reused
    return network


class CompiledNetwork:
    """A torch.compile'd network called with plain tensors: MONAI's MetaTensor (what bundle transforms and
    inferers pass) does not go through compiled graphs."""

    def __init__(self, network) -> None:
        import torch

        self.compiled = torch.compile(network)

    def __call__(self, x):
        return self.compiled(x.as_tensor() if hasattr(x, "as_tensor") else x)


def run_inferer(inferer, network, batch, device: str, amp: bool = True, cpu_amp: bool = False):
    """The inferer's output for `batch`, as float32. The batch stays where the caller put it: on the device,
    or on the CPU for a sliding-window inferer that moves only its windows (sw_device)."""
    with out_of_memory_as_busy(device), inference_context(device, amp, cpu_amp):
        return inferer(batch, network).float()
