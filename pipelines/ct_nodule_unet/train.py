"""Train the ct_nodule_unet bundle's 3D UNet on generated chest CT phantoms, and measure it on a held-out set.

    .venv/bin/python pipelines/ct_nodule_unet/train.py            # writes bundle/models/model.pt and
                                                                   # bundle/docs/metrics.json
Training phantoms and held-out phantoms come from different seeds. Images go through the bundle's own
preprocessing (read from bundle/configs/inference.json), so the network sees at training what the node's
runtime gives it at inference; the held-out Dice is measured through the node's runtime (MonaiBundle.run)
in the original voxel grid against the phantom's truth. Trained on synthetic data, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dicom_ai_node.imaging.volume import cross_sectional_volume
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.pipeline import RunContext, instantiate, load_manifest
from dicom_ai_node.runtime.nifti import write_nifti

BUNDLE = Path(__file__).resolve().parent / "bundle"


def phantom_case(seed: int):
    """A chest phantom of random size, spacing, noise and blur with 1 to 5 nodules; (volume, nodule truth)."""
    rng = np.random.default_rng([seed, 7])
    phantom = make_chest_phantom(
        slices=int(rng.integers(64, 100)), size=int(rng.choice([160, 192, 224])),
        pixel_spacing_mm=float(rng.uniform(1.5, 2.4)), slice_thickness_mm=float(rng.uniform(2.0, 3.0)),
        seed=seed, uid_seed=f"nodule-train-{seed}", noise_hu=float(rng.uniform(8, 25)),
        blur_mm=float(rng.uniform(0.6, 1.4)), nodules=int(rng.integers(1, 6)),
    )
    volume = cross_sectional_volume(phantom.datasets, str(phantom.datasets[0].SeriesInstanceUID), 0.05)
    return volume, phantom.nodules


def preprocessing_keys(keys: list[str]):
    """The bundle's preprocessing for image and label (labels resampled with nearest neighbour)."""
    from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    steps = {t["_target_"]: t for t in config["preprocessing"]["transforms"]}
    scale = {k: steps["ScaleIntensityRanged"][k] for k in ("a_min", "a_max", "b_min", "b_max", "clip")}
    return Compose([
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=steps["Orientationd"]["axcodes"]),
        Spacingd(keys=keys, pixdim=steps["Spacingd"]["pixdim"], mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", **scale), EnsureTyped(keys=keys),
    ])


def prepared(seeds: list[int], work: Path) -> list[dict]:
    transform = preprocessing_keys(["image", "label"])
    items = []
    for seed in seeds:
        volume, truth = phantom_case(seed)
        image = write_nifti(volume, work / f"image-{seed}.nii")
        label = write_nifti(dataclasses.replace(volume, array=truth.astype(np.float32)), work / f"label-{seed}.nii")
        items.append(transform({"image": str(image), "label": str(label)}))
    return items


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def held_out_metrics(seeds: list[int]) -> dict:
    """Dice and per-nodule detection of what the pipeline reports (its segments, after its size filter),
    run through the node's runtime on the series' own voxel grid."""
    pipeline = instantiate(load_manifest(BUNDLE.parent))
    pipeline.load("cpu")
    dices, found, missed, false_positive = [], 0, 0, 0
    for seed in seeds:
        volume, truth = phantom_case(seed)
        segments = pipeline.run(volume, RunContext()).segments
        predicted = np.zeros(truth.shape, dtype=bool)
        for segment in segments:
            predicted |= segment.mask
        dices.append(dice(predicted, truth))
        truth_labels, n_truth = ndimage.label(truth)
        hit = {int(v) for v in np.unique(truth_labels[predicted]) if v}
        found += len(hit)
        missed += n_truth - len(hit)
        false_positive += sum(1 for s in segments if not truth[s.mask].any())
    return {"cases": len(seeds), "dice_mean": round(float(np.mean(dices)), 4),
            "dice_min": round(float(np.min(dices)), 4), "nodules_found": found, "nodules_missed": missed,
            "false_positive_nodules": false_positive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=24, help="training phantoms")
    parser.add_argument("--held-out", type=int, default=16, help="held-out phantoms (other seeds)")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, SpatialPadd

    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "inference.json"))
    network = config.get_parsed_content("network_def")
    patch = [64, 64, 40]
    augment = Compose([
        SpatialPadd(keys=["image", "label"], spatial_size=patch),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=1,
                               num_samples=4),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
    ])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        train = prepared(list(range(1000, 1000 + args.train)), Path(tmp))
    print(f"{len(train)} training phantoms prepared in {time.time() - t0:.0f} s", flush=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.iterations)
    rng = np.random.default_rng(0)
    network.train()
    for step in range(1, args.iterations + 1):
        crops = augment(train[int(rng.integers(len(train)))])
        image = torch.stack([c["image"] for c in crops]).as_tensor()
        label = torch.stack([c["label"] for c in crops]).as_tensor()
        optimiser.zero_grad()
        loss = loss_fn(network(image), label)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    network.eval()
    torch.save(network.state_dict(), BUNDLE / "models" / "model.pt")
    metrics = held_out_metrics(list(range(5000, 5000 + args.held_out)))
    metrics.update({"training_phantoms": args.train, "iterations": args.iterations, "patch": patch,
                    "train_seconds": round(time.time() - t0)})
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
