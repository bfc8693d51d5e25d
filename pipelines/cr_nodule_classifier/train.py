"""Train the cr_nodule_classifier bundle on generated chest radiographs and measure it on a held-out set.

    .venv/bin/python pipelines/cr_nodule_classifier/train.py      # writes bundle/models/model.pt and
                                                                   # bundle/docs/metrics.json
Radiographs come from dicom_ai_node.phantom_xray (half with a nodule); they go through the node's own
projection loader and the bundle's own preprocessing, so training sees what inference sees. The held-out
set (other seeds) is measured through the pipeline itself: accuracy, sensitivity, specificity, ROC AUC, and
how often the Grad-CAM maximum falls on the nodule (within 3 pixels). Trained on synthetic data, not for
diagnostic use.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dicom_ai_node.imaging.projection import projection_volume
from dicom_ai_node.phantom_xray import make_chest_radiograph
from dicom_ai_node.pipeline import instantiate, load_manifest
from dicom_ai_node.runtime.nifti import write_nifti

FOLDER = Path(__file__).resolve().parent
BUNDLE = FOLDER / "bundle"


def case(seed: int):
    radiograph = make_chest_radiograph(seed, nodule=seed % 2 == 1, size=int(np.random.default_rng(seed).choice([224, 256, 320])))
    volume = projection_volume([radiograph.dataset], str(radiograph.dataset.SeriesInstanceUID))
    return volume, radiograph


def prepared(seeds: list[int], preprocessing, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for seed in seeds:
        volume, radiograph = case(seed)
        path = write_nifti(volume, work / f"image-{seed}.nii", spatial_dims=2)
        images.append(preprocessing({"image": str(path)})["image"].as_tensor())
        labels.append(int(radiograph.nodule is not None))
    return torch.stack(images), torch.tensor(labels)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def held_out_metrics(seeds: list[int]) -> dict:
    pipeline = instantiate(load_manifest(FOLDER))
    pipeline.load("cpu")
    scores, labels, on_nodule = [], [], []
    for seed in seeds:
        volume, radiograph = case(seed)
        probability, heat = pipeline.classify(volume)
        scores.append(probability)
        labels.append(int(radiograph.nodule is not None))
        if radiograph.nodule is not None:
            peak = np.unravel_index(np.argmax(heat[0]), heat[0].shape)
            on_nodule.append(bool(ndimage.binary_dilation(radiograph.nodule, iterations=3)[peak]))
    s, y = np.array(scores), np.array(labels)
    predicted = s >= 0.5
    return {"cases": len(seeds), "positives": int(y.sum()), "accuracy": float((predicted == y).mean()),
            "sensitivity": float(predicted[y == 1].mean()), "specificity": float((~predicted[y == 0]).mean()),
            "roc_auc": roc_auc(s, y), "gradcam_peak_on_nodule": float(np.mean(on_nodule))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "inference.json"))
    network = config.get_parsed_content("network_def")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = prepared(list(range(args.train)), config.get_parsed_content("preprocessing"), Path(tmp))
    print(f"{len(labels)} training radiographs prepared in {time.time() - t0:.0f} s", flush=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        network.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            x = images[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # left/right: nodules occur on either side
            x[flip] = torch.flip(x[flip], dims=[2])  # (batch, channel, x, y): x is columns
            optimiser.zero_grad()
            loss = loss_fn(network(x), labels[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        schedule.step()
        print(f"epoch {epoch}: loss {total / len(labels):.4f} ({time.time() - t0:.0f} s)", flush=True)
    network.eval()
    torch.save(network.state_dict(), BUNDLE / "models" / "model.pt")
    metrics = held_out_metrics(list(range(100000, 100000 + args.held_out)))
    metrics.update({"training_radiographs": args.train, "epochs": args.epochs, "train_seconds": round(time.time() - t0)})
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    json.dump(metrics, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
