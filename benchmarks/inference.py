"""Inference benchmark: a MONAI 3D segmentation network of realistic size on a 512 x 512 x 300 CT, through
the node's runtime against plain MONAI sliding_window_inference in fp32 with default settings.

    .venv/bin/python benchmarks/inference.py                      # CPU
    .venv/bin/python benchmarks/inference.py --device cuda        # on a GPU

The network is the architecture of the MONAI Model Zoo spleen_ct_segmentation bundle (3D UNet, channels
16-256, two residual units, batch norm; 4.8 M parameters) with seeded random weights: this measures speed,
not a model, and the label agreement column shows both paths compute the same answer. The CT is a synthetic
body (soft tissue, lungs, bone, noise) in HU scaled like the spleen bundle's preprocessing.

Reference: monai.inferers.sliding_window_inference(x, (96, 96, 96), sw_batch_size=1, network), fp32,
torch.no_grad, defaults otherwise (overlap 0.25, constant blending), the volume on the device.
Node: dicom_ai_node.runtime.infer (prepare_network: eval, channels-last weights, cuDNN autotune; run_inferer:
inference mode, float16 autocast on GPU, bfloat16 autocast on CPU with --cpu-amp) with a
SlidingWindowInferer as a bundle declares it (overlap 0.25, sw_batch_size 4).
Each is warmed up on one window first, then timed over --repeats volumes (best reported).
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch


def synthetic_ct(slices: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.3) ** 2 <= 1
    lungs = (((np.abs(xx) - 0.17) / 0.12) ** 2 + (yy / 0.2) ** 2 <= 1) & body
    bone = (xx ** 2 + (yy - 0.22) ** 2 <= 0.03 ** 2)
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    plane[bone] = 400.0
    volume = np.repeat(plane[None].astype(np.float32), slices, axis=0)
    volume += rng.normal(0, 20, volume.shape).astype(np.float32)
    return volume


def spleen_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm="batch")


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(run, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    best, output = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, output


def plain_monai(x: torch.Tensor, window: torch.Tensor, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """The reference: MONAI's sliding_window_inference with its defaults, fp32, on an eager network."""
    from monai.inferers import sliding_window_inference

    network = spleen_unet().to(device).eval()
    with torch.no_grad():
        network(window.to(device))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return timed(lambda: sliding_window_inference(x.to(device), (96, 96, 96), 1, network).cpu(), device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cpu-amp", action="store_true", help="also time bfloat16 autocast on CPU")
    args = parser.parse_args()
    from monai.inferers import SlidingWindowInferer

    from dicom_ai_node.runtime.infer import prepare_network, run_inferer

    device = args.device
    ct = synthetic_ct(args.slices, args.size)
    x = torch.from_numpy(np.clip((ct + 57.0) / 221.0, 0, 1))[None, None]  # the spleen bundle's HU window
    window = torch.zeros(1, 1, 96, 96, 96)
    rows = []

    seconds, reference = plain_monai(x, window, device, args.repeats)
    reference_labels = reference.argmax(1)
    rows.append(("plain MONAI fp32 (reference)", seconds, peak_memory_mb(device), 1.0))

    variants = [("node runtime", False)] + ([("node runtime, CPU bf16", True)] if args.cpu_amp and device == "cpu" else [])
    for name, cpu_amp in variants:
        network = prepare_network(spleen_unet(), device, spatial_dims=3)
        inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.25)
        run_inferer(inferer, network, window.to(device), device, amp=True, cpu_amp=cpu_amp)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds, output = timed(lambda: run_inferer(inferer, network, x.to(device), device, amp=True,
                                                    cpu_amp=cpu_amp).cpu(), device, args.repeats)
        agreement = float((output.argmax(1) == reference_labels).float().mean())
        rows.append((name, seconds, peak_memory_mb(device), agreement))

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"{args.slices} x {args.size} x {args.size} CT, spleen-bundle UNet (4.8 M parameters), {device} ({gpu}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'path':34} {'s/volume':>9} {'series/h':>9} {'ratio':>6} {'peak MB':>8} {'labels = ref':>12}")
    base = rows[0][1]
    for name, seconds, memory, agreement in rows:
        print(f"{name:34} {seconds:9.2f} {3600 / seconds:9.0f} {base / seconds:6.2f} {memory:8.0f} {agreement:12.4%}")


if __name__ == "__main__":
    main()
