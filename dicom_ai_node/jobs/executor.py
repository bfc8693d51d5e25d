"""Local executor: runs one job (series x pipeline) in this process with warm pipeline instances.

load volume -> run pipeline -> write DICOM results -> validation gate -> results saved on disk.
The job store is updated by the caller; this module only computes and writes files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_ai_node import __version__
from dicom_ai_node.config import NodeConfig
from dicom_ai_node.imaging.volume import load_volume
from dicom_ai_node.pipeline import Manifest, Pipeline, RunContext, instantiate
from dicom_ai_node.results.provenance import ResultContext
from dicom_ai_node.results.validate import gate
from dicom_ai_node.results.writer import file_name, write_results

log = logging.getLogger("dicom_ai_node.jobs")


def select_device(preference: str) -> str:
    """'cuda' when asked for (or 'auto') and a CUDA device is usable, else 'cpu'."""
    if preference == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if preference == "cuda":
        log.warning("workers.device is cuda but no CUDA device is usable: running on cpu")
    return "cpu"


@dataclass(frozen=True)
class ResultFile:
    sop_uid: str
    sop_class_uid: str
    path: Path
    modality: str


@dataclass
class JobTimings:
    stages: dict[str, float] = field(default_factory=dict)

    def measure(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = now - start
        return now


class LocalExecutor:
    """Keeps one instance of each pipeline warm (models loaded once per worker)."""

    def __init__(self, config: NodeConfig, manifests: dict[str, Manifest]) -> None:
        self.config = config
        self.manifests = manifests
        self.device = select_device(config.workers.device)
        self._warm: dict[str, Pipeline] = {}
        self.result_context = ResultContext(
            org_root=config.node.org_root,
            software_version=__version__,
            institution_name=config.node.institution_name,
        )

    def pipeline(self, name: str) -> Pipeline:
        if name not in self._warm:
            pipeline = instantiate(self.manifests[name])
            pipeline.load(self.device)
            self._warm[name] = pipeline
        return self._warm[name]

    def execute(self, job_id: int, pipeline_name: str, instance_paths: list[str]) -> tuple[list[ResultFile], JobTimings]:
        timings = JobTimings()
        t = time.perf_counter()
        volume = load_volume([Path(p) for p in instance_paths])
        t = timings.measure("load", t)
        pipeline = self.pipeline(pipeline_name)
        manifest = pipeline.manifest
        result = pipeline.run(volume, RunContext(device=self.device))
        t = timings.measure("infer", t)
        datasets: list[Dataset] = write_results(volume, result, manifest, self.result_context, kinds=tuple(manifest.outputs))
        t = timings.measure("write", t)
        folder = self.config.results_dir / f"job-{job_id:08d}"
        gate(datasets, volume.sources, manifest, folder)  # saves each object, then checks it (dciodvfy too)
        paths = [folder / file_name(ds) for ds in datasets]
        timings.measure("validate", t)
        files = [
            ResultFile(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path, str(ds.Modality))
            for ds, path in zip(datasets, paths)
        ]
        return files, timings
