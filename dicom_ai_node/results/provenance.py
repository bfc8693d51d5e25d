"""Who made a result: the node's equipment identity and its IHE AI Results provenance.

IHE AIR asks that an AI result name the algorithm in the General Equipment module and in a Contributing
Equipment item carrying a Device UID. highdicom adds items for the acquisition device and for itself but
has no DeviceUID argument, so the node adds its own item for the pipeline after construction.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

from dicom_ai_node.pipeline import Manifest
from dicom_ai_node.results.uids import derive_device_uid, validated_org_root

LO_MAX = 64  # DICOM Long String
SH_MAX = 16  # DICOM Short String
ST_MAX = 1024  # DICOM Short Text
NOT_FOR_DIAGNOSTIC_USE = "not for diagnostic use"


def _node_software_version() -> str:
    try:
        return metadata.version("dicom-ai-node")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ResultContext:
    """Node-level settings every result object carries (from node.yaml)."""

    org_root: str
    node_name: str = "dicom-ai-node"
    manufacturer: str = "dicom-ai-node project"
    software_version: str = field(default_factory=_node_software_version)
    institution_name: str | None = None
    device_serial: str = "1"

    def __post_init__(self) -> None:
        validated_org_root(self.org_root)
        for name, limit in (("node_name", LO_MAX), ("manufacturer", LO_MAX), ("software_version", LO_MAX),
                            ("institution_name", LO_MAX), ("device_serial", LO_MAX)):
            value = getattr(self, name)
            if value is not None and (len(value) > limit or "\\" in value or not value.strip()):
                raise ValueError(f"ResultContext.{name} must be 1 to {limit} characters without a backslash")


def device_uid(manifest: Manifest, ctx: ResultContext) -> str:
    """DeviceUID of the pipeline version on this node, shared by the Contributing Equipment and SR observer."""
    return derive_device_uid(ctx.org_root, ctx.node_name, manifest.name, manifest.version)


def software_versions(manifest: Manifest, ctx: ResultContext) -> list[str]:
    """SoftwareVersions of a result: the pipeline version first, then the node's."""
    return [manifest.version, f"{ctx.node_name} {ctx.software_version}"[:LO_MAX]]


def equipment_kwargs(manifest: Manifest, ctx: ResultContext) -> dict[str, Any]:
    """General Equipment arguments of highdicom constructors: the pipeline is the model, we the maker."""
    kwargs: dict[str, Any] = {
        "manufacturer": ctx.manufacturer,
        "manufacturer_model_name": manifest.name,
        "software_versions": software_versions(manifest, ctx),
        "device_serial_number": ctx.device_serial,
    }
    if ctx.institution_name is not None:
        kwargs["institution_name"] = ctx.institution_name
    return kwargs


def pipeline_equipment(manifest: Manifest, ctx: ResultContext) -> hd.ContributingEquipment:
    """The node's Contributing Equipment item for the pipeline (IHE AIR), with its DeviceUID."""
    item = hd.ContributingEquipment(
        manufacturer=ctx.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=manifest.name,
        software_versions=software_versions(manifest, ctx),
        device_serial_number=ctx.device_serial,
        institution_name=ctx.institution_name,
        station_name=ctx.node_name[:SH_MAX],
        contribution_datetime=DT(dt.datetime.now(dt.timezone.utc).replace(microsecond=0)),
        contribution_description=f"AI pipeline {manifest.name} {manifest.version}: {manifest.title}"[:ST_MAX],
    )
    item.DeviceUID = device_uid(manifest, ctx)
    return item


def add_provenance(ds: Dataset, manifest: Manifest, ctx: ResultContext) -> None:
    """Set the General Equipment tags and append the pipeline's item after highdicom's own ones."""
    ds.Manufacturer = ctx.manufacturer
    ds.ManufacturerModelName = manifest.name
    ds.SoftwareVersions = software_versions(manifest, ctx)
    ds.DeviceSerialNumber = ctx.device_serial
    existing = list(ds.get("ContributingEquipmentSequence", []))
    ours = device_uid(manifest, ctx)
    kept = [item for item in existing if item.get("DeviceUID") != ours]  # re-applying replaces, never doubles
    ds.ContributingEquipmentSequence = [*kept, pipeline_equipment(manifest, ctx)]


def with_use_warning(text: str, manifest: Manifest) -> str:
    """`text` as an LO value ending in "not for diagnostic use" where the model card says so.

    The warning is kept whole and `text` shortened, so the 64-character LO limit never cuts the warning.
    """
    tail = f" - {NOT_FOR_DIAGNOSTIC_USE}" if manifest.model_card.not_for_diagnostic_use else ""
    return text.replace("\\", "/")[: LO_MAX - len(tail)].rstrip() + tail


def series_description(manifest: Manifest, what: str) -> str:
    """SeriesDescription saying AI, what the object is (SEG, SR...) and the pipeline's title."""
    return with_use_warning(f"AI {what} {manifest.title}", manifest)
