"""VolumeError and the way its messages name instances, frames and tags (UIDs only, never PHI)."""
from __future__ import annotations

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag


class VolumeError(ValueError):
    """A series cannot be made into a volume; the message names the series/instance and the tag at fault."""


def tag_name(keyword: str) -> str:
    """'ImagePositionPatient (0020,0032)': how every message names its tag."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


def instance_name(ds: Dataset, frame_number: int | None = None) -> str:
    """'instance <SOPInstanceUID>' or, for a frame of a multi-frame instance, '... frame <n>'."""
    name = f"instance {ds.get('SOPInstanceUID', '?')}"
    return name if frame_number is None else f"{name} frame {frame_number}"


def instance_error(ds: Dataset, problem: str, frame_number: int | None = None) -> VolumeError:
    """'series <uid>: instance <uid> [frame <n>] <problem>'."""
    return VolumeError(f"series {ds.get('SeriesInstanceUID', '?')}: {instance_name(ds, frame_number)} {problem}")
