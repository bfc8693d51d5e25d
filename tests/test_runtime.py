"""The model runtime on real models: the shipped MONAI bundles (trained here on synthetic phantoms), a
zoo-layout bundle, bare TorchScript and ONNX exports, AMP and torch.compile paths, the memory guard."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicom_ai_node.imaging.projection import projection_volume
from dicom_ai_node.imaging.volume import cross_sectional_volume
from dicom_ai_node.phantom import make_chest_phantom
from dicom_ai_node.phantom_xray import make_chest_radiograph
from dicom_ai_node.pipeline import ManifestError, ModelSpec, RunContext, instantiate, load_manifest
from dicom_ai_node.runtime.bundle import BundleError, MonaiBundle
from dicom_ai_node.runtime.device import DeviceBusy, admit, inference_context, out_of_memory_as_busy
from dicom_ai_node.runtime.models import BareModel

REPO = Path(__file__).resolve().parent.parent
# The same tests check the GPU paths (float16 autocast, cuDNN, CUDA memory) on a GPU machine:
#   DICOM_AI_NODE_TEST_DEVICE=cuda .venv/bin/python -m pytest tests/test_runtime.py
DEVICE = os.environ.get("DICOM_AI_NODE_TEST_DEVICE", "cpu")
NODULE_PIPELINE = REPO / "pipelines" / "ct_nodule_unet"
NODULE_BUNDLE = NODULE_PIPELINE / "bundle"
CLASSIFIER_PIPELINE = REPO / "pipelines" / "cr_nodule_classifier"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def nodule_case():
    """A held-out phantom (a seed the training never used) with three nodules, and its truth."""
    phantom = make_chest_phantom(slices=80, size=192, pixel_spacing_mm=2.0, slice_thickness_mm=2.5, seed=424242,
                                 uid_seed="runtime-nodules", nodules=3)
    volume = cross_sectional_volume(phantom.datasets, str(phantom.datasets[0].SeriesInstanceUID), 0.05)
    return volume, phantom.nodules


@pytest.fixture(scope="module")
def shipped_labels(nodule_case):
    volume, _ = nodule_case
    return MonaiBundle(NODULE_BUNDLE, DEVICE).run(volume).labels()


def test_shipped_bundle_finds_the_held_out_nodules(nodule_case, shipped_labels):
    volume, truth = nodule_case
    assert shipped_labels.shape == volume.array.shape
    found = shipped_labels == 1
    truth_labels, count = ndimage.label(truth)
    assert count == 3
    assert {int(v) for v in np.unique(truth_labels[found]) if v} == {1, 2, 3}, "a nodule was missed"
    assert dice(found, truth) >= 0.7
    assert not (NODULE_BUNDLE / "eval").exists(), "SaveImaged must be dropped from the postprocessing"


def zoo_style_copy(tmp_path: Path) -> Path:
    """The shipped bundle laid out as a Model Zoo bundle is: the sections the node never uses (dataset,
    dataloader, evaluator, checkpoint loader, run) referencing paths that do not exist here and packages that
    are not installed (ignite), and the checkpoint saved as {"model": state dict} by CheckpointSaver."""
    bundle = tmp_path / "zoo_bundle"
    shutil.copytree(NODULE_BUNDLE, bundle, ignore=shutil.ignore_patterns("model.pt", "eval"))
    config = json.loads((NODULE_BUNDLE / "configs" / "inference.json").read_text())
    config.update({
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 4},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    })
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    state = torch.load(NODULE_BUNDLE / "models" / "model.pt", weights_only=True)
    torch.save({"model": state}, bundle / "models" / "model.pt")
    return bundle


def test_zoo_layout_bundle_copied_in_runs_unchanged(nodule_case, shipped_labels, tmp_path):
    volume, _ = nodule_case
    bundle = MonaiBundle(zoo_style_copy(tmp_path), DEVICE)
    assert np.array_equal(bundle.run(volume, tmp_path).labels(), shipped_labels)
    assert bundle.meta.channels == {0: "background", 1: "nodule"} and bundle.meta.spatial_dims == 3


def test_bundle_with_torchscript_weights(nodule_case, shipped_labels, tmp_path):
    volume, _ = nodule_case
    folder = tmp_path / "ts_bundle"
    shutil.copytree(NODULE_BUNDLE, folder, ignore=shutil.ignore_patterns("model.pt", "eval"))
    network = MonaiBundle(NODULE_BUNDLE, DEVICE).module
    torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    labels = MonaiBundle(folder, DEVICE).run(volume).labels()
    assert (labels == shipped_labels).mean() > 0.9999


def test_bundle_errors_name_the_file_and_key(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(NODULE_BUNDLE, broken, ignore=shutil.ignore_patterns("eval"))
    config = json.loads((broken / "configs" / "inference.json").read_text())
    del config["inferer"]
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"inference\.json.*inferer"):
        MonaiBundle(broken, "cpu")
    shutil.copy(NODULE_BUNDLE / "configs" / "inference.json", broken / "configs" / "inference.json")
    torch.save({"not": torch.zeros(1)}, broken / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"model\.pt: weights do not fit network_def"):
        MonaiBundle(broken, "cpu")
    (broken / "configs" / "metadata.json").write_text("{}")
    with pytest.raises(BundleError, match=r"metadata\.json: network_data_format"):
        MonaiBundle(broken, "cpu")


GENERIC_MANIFEST = """
name: nodule_bundle_no_code
version: "1"
title: the nodule bundle through the generic pipeline
intended_use: test
model:
  format: monai_bundle
  path: bundle
  labels:
{labels}
accepts: {{modality: [CT]}}
outputs: [seg, sr]
model_card: {{description: d, training_data: synthetic, performance: p, limitations: l}}
"""
NODULE_LABEL = """    1:
      label: Nodule
      category: {value: "49755003", scheme: SCT, meaning: Morphologically Altered Structure}
      type: {value: "27925004", scheme: SCT, meaning: Nodule}"""


def generic_pipeline_folder(tmp_path: Path, labels: str) -> Path:
    folder = tmp_path / "generic"
    folder.mkdir()
    shutil.copytree(NODULE_BUNDLE, folder / "bundle", ignore=shutil.ignore_patterns("eval"))
    (folder / "pipeline.yaml").write_text(GENERIC_MANIFEST.format(labels=labels))
    return folder


def test_generic_pipeline_runs_a_bundle_with_only_a_manifest(nodule_case, shipped_labels, tmp_path):
    volume, _ = nodule_case
    pipeline = instantiate(load_manifest(generic_pipeline_folder(tmp_path, NODULE_LABEL)))
    pipeline.load(DEVICE)
    result = pipeline.run(volume, RunContext(work_dir=tmp_path))
    [segment] = result.segments
    assert segment.label == "Nodule" and segment.type.value == "27925004"
    assert np.array_equal(segment.mask, shipped_labels == 1)
    [volume_ml] = result.measurements
    assert volume_ml.value == pytest.approx(segment.mask.sum() * volume.voxel_volume_ml, abs=0.01)
    assert segment.mask[result.key_slice].any()


def test_generic_pipeline_refuses_uncoded_labels(tmp_path):
    with pytest.raises(ManifestError, match="model.labels"):
        load_manifest(generic_pipeline_folder(tmp_path, "    {}"))
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(GENERIC_MANIFEST.format(labels=NODULE_LABEL.replace("1:", "2:")))
    shutil.copytree(NODULE_BUNDLE, folder / "bundle", ignore=shutil.ignore_patterns("eval"))
    pipeline = instantiate(load_manifest(folder))
    with pytest.raises(BundleError, match=r"model\.labels lacks 1 \('nodule'\)"):
        pipeline.load(DEVICE)


def test_bare_torchscript_and_onnx_match_plain_monai(nodule_case, tmp_path):
    """The node's bare-model runtime against MONAI's sliding_window_inference on the eager network."""
    from monai.inferers import sliding_window_inference

    volume, _ = nodule_case
    network = MonaiBundle(NODULE_BUNDLE, DEVICE).module
    array = volume.array[:48, :96, :96]
    spec = dict(roi_size=(32, 64, 64), intensity_window=(-1000.0, 400.0), overlap=0.25, sw_batch_size=2)
    x = torch.from_numpy(np.clip((array + 1000.0) / 1400.0, 0, 1).astype(np.float32))[None, None].to(DEVICE)
    with torch.inference_mode():  # fp32 reference; on GPU the runtime's float16 is compared more loosely
        reference = sliding_window_inference(x, (32, 64, 64), 2, network, overlap=0.25, mode="gaussian").cpu()
    window = torch.zeros(1, 1, 32, 64, 64, device=DEVICE)
    torch.jit.trace(network, window).save(str(tmp_path / "model.ts"))
    torch.onnx.export(network, window, str(tmp_path / "model.onnx"), dynamo=False,
                      input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    fp16 = DEVICE.startswith("cuda")
    for fmt, path, tolerance in (("torchscript", "model.ts", 5e-2 if fp16 else 1e-4), ("onnx", "model.onnx", 1e-3)):
        model = BareModel(tmp_path / path, ModelSpec(format=fmt, path=path, **spec), DEVICE)
        logits = model.logits(array)
        assert logits.shape == reference.shape
        assert torch.allclose(logits, reference, atol=tolerance), f"{fmt} differs from eager MONAI"
        agreement = (model.labels(array) == reference[0].argmax(0).numpy()).mean()
        assert agreement == 1.0 or (fp16 and fmt == "torchscript" and agreement > 0.999)


def test_bare_model_manifest_needs_a_window():
    with pytest.raises(ValueError, match="roi_size"):
        ModelSpec(format="onnx", path="model.onnx")


def test_cpu_autocast_path_runs_in_bfloat16():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8, 8)
    with inference_context("cpu", amp=True, cpu_amp=True):
        assert torch.is_autocast_enabled("cpu")
        low = conv(x)
    with inference_context("cpu", amp=True):
        assert not torch.is_autocast_enabled("cpu")  # no AMP on CPU unless asked for
        full = conv(x)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert torch.allclose(low.float(), full, atol=0.05)


def test_memory_guard_queues_instead_of_crashing():
    admit("cpu", 0)  # nothing declared, nothing checked
    admit("cpu", 1)
    with pytest.raises(DeviceBusy, match=r"needs 200 MB on cpu, 100 MB free"):
        admit("cpu", 200, limit_mb=100)
    with pytest.raises(DeviceBusy, match="needs .* MB on cpu"):
        admit("cpu", 10**12)
    with pytest.raises(DeviceBusy, match=f"needs .* MB on {DEVICE}"):  # GPU memory when run on a GPU
        admit(DEVICE, 10**12)
    with pytest.raises(DeviceBusy, match="out of memory on cuda:0"):
        with out_of_memory_as_busy("cuda:0"):  # the CUDA branch: cache freed (a no-op without CUDA), job requeued
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def radiograph_volume(seed: int, nodule: bool):
    radiograph = make_chest_radiograph(seed, nodule=nodule)
    return projection_volume([radiograph.dataset], str(radiograph.dataset.SeriesInstanceUID)), radiograph


@pytest.fixture(scope="module")
def classifier():
    pipeline = instantiate(load_manifest(CLASSIFIER_PIPELINE))
    pipeline.load(DEVICE)
    return pipeline


def test_classifier_and_grad_cam_on_held_out_radiographs(classifier):
    """Held-out seeds: nodules score above clear radiographs, and Grad-CAM points at the nodule."""
    positives, negatives, on_nodule = [], [], 0
    for seed in range(200000, 200012):
        volume, radiograph = radiograph_volume(seed, nodule=True)
        probability, heat = classifier.classify(volume)
        positives.append(probability)
        assert heat.shape == volume.array.shape and 0.0 <= heat.min() and heat.max() <= 1.0
        peak = np.unravel_index(np.argmax(heat[0]), heat[0].shape)
        on_nodule += bool(ndimage.binary_dilation(radiograph.nodule, iterations=4)[peak])
        volume, _ = radiograph_volume(seed, nodule=False)
        negatives.append(classifier.classify(volume)[0])
    auc = np.mean([[p > n for n in negatives] for p in positives])
    assert auc >= 0.85
    assert on_nodule >= 8, f"Grad-CAM peak on the nodule in only {on_nodule} of 12 radiographs"


def test_classifier_result_is_a_finding_with_a_heatmap(classifier):
    volume, _ = radiograph_volume(200100, nodule=True)
    result = classifier.run(volume, RunContext())
    [finding] = result.findings
    assert finding.value.meaning == "Pulmonary nodule" and 0.0 <= finding.probability <= 1.0
    [heatmap] = result.heatmaps
    assert heatmap.array.shape == volume.array.shape and heatmap.name.startswith("Grad-CAM")


def test_compile_at_start_up_gives_the_same_answer(classifier, tmp_path):
    volume, _ = radiograph_volume(200200, nodule=True)
    compiled = MonaiBundle(CLASSIFIER_PIPELINE / "bundle", DEVICE, compile=True)
    eager = classifier.bundle
    data = eager.preprocess(volume, tmp_path)
    assert torch.allclose(compiled.infer(data), eager.infer(data), atol=1e-2 if DEVICE.startswith("cuda") else 1e-4)


def test_generic_pipeline_runs_a_bare_onnx_model(nodule_case, tmp_path):
    """pipeline.yaml with `model: {format: onnx}` and no code: the node feeds the ONNX file by sliding window."""
    volume, _ = nodule_case
    folder = tmp_path / "onnx_pipeline"
    folder.mkdir()
    network = MonaiBundle(NODULE_BUNDLE, "cpu").module
    torch.onnx.export(network, torch.zeros(1, 1, 32, 64, 64), str(folder / "model.onnx"), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    manifest = GENERIC_MANIFEST.format(labels=NODULE_LABEL).replace(
        "format: monai_bundle\n  path: bundle",
        "format: onnx\n  path: model.onnx\n  roi_size: [32, 64, 64]\n  intensity_window: [-1000, 400]")
    (folder / "pipeline.yaml").write_text(manifest)
    pipeline = instantiate(load_manifest(folder))
    pipeline.load("cpu")
    array = volume.array[:40, :80, :80]
    small = dataclasses.replace(volume, array=array, sources=volume.sources[:40])
    result = pipeline.run(small, RunContext())
    expected = BareModel(folder / "model.onnx", load_manifest(folder).model, "cpu").labels(array)
    [segment] = result.segments
    assert np.array_equal(segment.mask, expected == 1)


def test_spleen_zoo_example_manifest_fits_a_zoo_bundle(tmp_path):
    """deploy/examples/spleen_ct_segmentation/pipeline.yaml beside a bundle laid out as the zoo's (its
    metadata's channel_def names the spleen) loads without code: the labels it codes match the bundle's."""
    folder = tmp_path / "spleen_ct_segmentation"
    folder.mkdir()
    shutil.copy(REPO / "deploy" / "examples" / "spleen_ct_segmentation" / "pipeline.yaml", folder)
    bundle = zoo_style_copy(tmp_path)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "background", "1": "spleen"}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    bundle.rename(folder / "bundle")
    manifest = load_manifest(folder)
    assert manifest.entrypoint is None and manifest.model.labels[1].type.meaning == "Spleen"
    pipeline = instantiate(manifest)
    pipeline.load("cpu")
    assert pipeline.bundle.meta.channels[1] == "spleen"
