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
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    training_data: str
    performance: str
    limitations: str
    not_for_diagnostic_use: bool = True


class Manifest(BaseModel):
    """pipeline.yaml: who the pipeline is, what it accepts, what it produces."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,63}$")
    version: str = Field(pattern=r"^[0-9A-Za-z.\-+]{1,32}$")
    title: str
    intended_use: str
    entrypoint: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.py:[A-Za-z_][A-Za-z0-9_]*$")
    accepts: Accepts
    outputs: list[str]  # subset of: seg, sr, sc
    gpu_memory_mb: int = 0
    model_card: ModelCard
    folder: Path | None = Field(default=None, exclude=True)

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
    return manifest


def instantiate(manifest: Manifest) -> Pipeline:
    """Import the pipeline's entrypoint ("file.py:ClassName") from its folder and construct it."""
    assert manifest.folder is not None
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
