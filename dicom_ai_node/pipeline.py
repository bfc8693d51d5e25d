"""The Pipeline contract: what every pipeline in pipelines/ implements and returns.

A pipeline gets a `Volume` (real units, geometry) and returns a `PipelineResult` made of plain numpy
arrays and coded concepts. It never touches the network and never writes DICOM: the node turns the result
into SEG, SR and SC objects (dicom_ai_node.results), so every pipeline gets standards-correct output for free.
"""
from __future__ import annotations

import abc
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_ai_node.imaging.volume import Volume


@dataclass(frozen=True)
class Concept:
    """A coded concept (code value, coding scheme designator, code meaning), e.g. SNOMED CT lung."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Segment:
    """One segment of a segmentation, in the source volume's geometry (same shape as Volume.array)."""

    number: int  # 1-based, unique within the result
    label: str  # human-readable, e.g. "Right lung"
    category: Concept  # SNOMED CT segmented property category, e.g. Anatomical Structure
    type: Concept  # SNOMED CT segmented property type, e.g. Lung
    mask: np.ndarray  # bool (binary) or float32 in [0, 1] (fractional), shape (slices, rows, columns)
    anatomic_region: Concept | None = None
    laterality: Concept | None = None
    color_rgb: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement, optionally of one segment (referenced by Segment.number)."""

    name: Concept  # what is measured, e.g. DCM 118565006 "Volume"
    value: float
    unit: Concept  # UCUM, e.g. Concept("mL", "UCUM", "milliliter")
    segment_number: int | None = None
    method: Concept | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class Finding:
    """A coded classification or detection, with its probability."""

    name: Concept  # the question, e.g. "Finding"
    value: Concept  # the answer, e.g. SNOMED "Pneumothorax"
    probability: float | None = None
    segment_number: int | None = None


@dataclass(frozen=True)
class Heatmap:
    """A float map in the source geometry (e.g. Grad-CAM), values in `unit`."""

    name: str
    array: np.ndarray  # float32, shape (slices, rows, columns)
    unit: Concept = Concept("1", "UCUM", "no units")


@dataclass(frozen=True)
class Detection:
    """A finding located on one source slice (2D findings: X-ray lesions, landmarks), with its probability.

    Coordinates are numpy indices of Volume.array[slice_index]: `box` is (row_min, col_min, row_max, col_max)
    with slice bounds, covering array[row_min:row_max, col_min:col_max]; `points` are (row, col) pixel
    centres. A detection has a box, points or both.
    """

    label: str  # human-readable, e.g. "Nodule"
    finding: Concept  # what was found, e.g. SNOMED CT "Pulmonary nodule"
    slice_index: int  # index into Volume.array axis 0 (0 for a single 2D image)
    probability: float | None = None
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()


@dataclass
class PipelineResult:
    segments: list[Segment] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    key_slice: int | None = None  # index into Volume.array axis 0 that best shows the result
    notes: list[str] = field(default_factory=list)  # free-text remarks; never PHI
    detections: list[Detection] = field(default_factory=list)


@dataclass(frozen=True)
class RunContext:
    """What a pipeline may know besides the pixels: the device to use and a scratch folder."""

    device: str = "cpu"
    work_dir: Path | None = None


class Pipeline(abc.ABC):
    """Base class of every pipeline. Instances are created once per worker and kept warm."""

    manifest: "Manifest"

    def __init__(self, manifest: "Manifest") -> None:
        self.manifest = manifest

    def load(self, device: str) -> None:
        """Load models onto `device`; called once before the first run. Classical pipelines do nothing."""

    @abc.abstractmethod
    def run(self, volume: Volume, context: RunContext) -> PipelineResult:
        """Compute the result for one series."""


class ConceptModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str
    scheme: str
    meaning: str

    def concept(self) -> Concept:
        return Concept(self.value, self.scheme, self.meaning)


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    def contains(self, x: float) -> bool:
        return (self.min is None or x >= self.min) and (self.max is None or x <= self.max)


class Accepts(BaseModel):
    """What input the pipeline was validated on."""

    model_config = ConfigDict(extra="forbid")
    modality: list[str]
    body_part: list[str] = Field(default_factory=list)
    slice_thickness_mm: Range | None = None
    pixel_spacing_mm: Range | None = None
    min_slices: int = 1
    kvp: Range | None = None  # CT tube voltage
    magnetic_field_strength_t: Range | None = None  # MR
    radiopharmaceutical: list[str] = Field(default_factory=list)  # PET/NM tracers, e.g. [Fluorodeoxyglucose]
    # Contrast phases validated on (empty: any): "contrast" when the header has ContrastBolusAgent,
    # ContrastBolusRoute or ContrastBolusStartTime with a value, else "non-contrast" (imaging/qc.py).
    contrast: list[Literal["non-contrast", "contrast"]] = Field(default_factory=list)


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    training_data: str
    performance: str
    limitations: str
    not_for_diagnostic_use: bool = True


class SegmentLabel(BaseModel):
    """How one label value of a segmentation model is coded in the SEG (DICOM needs coded concepts)."""

    model_config = ConfigDict(extra="forbid")
    label: str
    category: ConceptModel
    type: ConceptModel
    anatomic_region: ConceptModel | None = None
    color_rgb: tuple[int, int, int] | None = None


class ModelSpec(BaseModel):
    """The model a pipeline runs: a MONAI bundle folder (its own transforms and inferer), or a bare
    TorchScript/ONNX file that the node feeds itself (intensity window, sliding window, softmax, argmax)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["monai_bundle", "torchscript", "onnx"]
    path: str  # relative to the pipeline folder
    amp: bool = True  # float16 autocast on GPU
    cpu_amp: bool = False  # bfloat16 autocast on CPU: fast where the CPU has native bf16 (AVX512-BF16/AMX)
    compile: bool = False  # torch.compile when the worker starts (bundles and TorchScript)
    labels: dict[int, SegmentLabel] = Field(default_factory=dict)  # segmentation label value -> coded segment
    # bare models only: the network sees the volume as (1, 1, slices, rows, columns) in these units
    intensity_window: tuple[float, float] | None = None  # scaled to [0, 1] and clipped
    roi_size: tuple[int, int, int] | None = None  # sliding window (slices, rows, columns)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _bare_needs_window(self) -> "ModelSpec":
        if self.format != "monai_bundle" and self.roi_size is None:
            raise ValueError(f"a {self.format} model needs roi_size (the sliding window, slices x rows x columns)")
        return self


class Manifest(BaseModel):
    """pipeline.yaml: who the pipeline is, what it accepts, what it produces."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,63}$")
    version: str = Field(pattern=r"^[0-9A-Za-z.\-+]{1,32}$")
    title: str
    intended_use: str
    # file.py:Class in the folder; may be left out when `model` is given: the node's generic segmentation
    # pipeline then runs the model and reports each labelled segment with its volume.
    entrypoint: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.py:[A-Za-z_][A-Za-z0-9_]*$")
    accepts: Accepts
    outputs: list[str]  # subset of: seg, sr, sc, pmap, heatmap_sc, gsps
    gpu_memory_mb: int = 0  # peak GPU memory of one run; the worker waits until it is free (0: not checked)
    host_memory_mb: int = 0  # peak host memory of one run on CPU; same rule
    model: ModelSpec | None = None
    model_card: ModelCard
    folder: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _code_or_model(self) -> "Manifest":
        if self.entrypoint is None and self.model is None:
            raise ValueError("give an entrypoint (file.py:Class) or a model (the generic segmentation pipeline)")
        if self.entrypoint is None and self.model is not None and not self.model.labels:
            raise ValueError("model.labels: the generic segmentation pipeline needs the coded segment of each label")
        return self

    @property
    def series_description_suffix(self) -> str:
        return "not for diagnostic use" if self.model_card.not_for_diagnostic_use else ""


class ManifestError(ValueError):
    pass


def load_manifest(folder: Path) -> Manifest:
    path = Path(folder) / "pipeline.yaml"
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read pipeline manifest: {exc}") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{path}: invalid pipeline manifest: {errors}") from exc
    manifest.folder = Path(folder).resolve()
    if manifest.model is not None and not (manifest.folder / manifest.model.path).exists():
        raise ManifestError(f"{path}: model.path {manifest.model.path!r} does not exist in {manifest.folder}")
    return manifest


def instantiate(manifest: Manifest) -> Pipeline:
    """Import the pipeline's entrypoint ("file.py:ClassName") from its folder and construct it."""
    assert manifest.folder is not None
    if manifest.entrypoint is None:
        from dicom_ai_node.runtime.model_pipeline import ModelSegmentation

        return ModelSegmentation(manifest)
    filename, class_name = manifest.entrypoint.split(":")
    module_name = f"dicom_ai_node_pipelines.{manifest.name}"
    spec = importlib.util.spec_from_file_location(module_name, manifest.folder / filename)
    if spec is None or spec.loader is None:
        raise ManifestError(f"{manifest.folder / filename}: cannot import pipeline entrypoint")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise ManifestError(f"{manifest.folder / filename}: {class_name} is not a dicom_ai_node Pipeline")
    return cls(manifest)


def discover(folders: list[Path]) -> dict[str, Manifest]:
    """Manifests of every pipeline folder (one holding pipeline.yaml) under the given folders."""
    found: dict[str, Manifest] = {}
    for root in folders:
        for child in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            if (child / "pipeline.yaml").is_file():
                manifest = load_manifest(child)
                if manifest.name in found:
                    raise ManifestError(
                        f"{child}: pipeline name {manifest.name!r} also used by {found[manifest.name].folder}"
                    )
                found[manifest.name] = manifest
    return found
