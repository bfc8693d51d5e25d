"""Deterministic UIDs for result objects.

Every UID the node puts into a result is a hash of what the result is *of* (the source series, the
pipeline name and version, the output kind and an index) under the configured organisation root. A re-run
of the same pipeline version on the same series therefore produces the same Series and SOP Instance UIDs,
so a re-send replaces the earlier object in PACS instead of duplicating it; a new pipeline version gives
new UIDs, so results of different versions coexist.

Kinds (the `kind` argument of `derive_result_uid`):

- ``seg-series``, ``seg``: SeriesInstanceUID / SOPInstanceUID of the Segmentation
- ``sr-series``, ``sr``: the same for the TID 1500 Comprehensive 3D SR
- ``sr-viewer-series``, ``sr-viewer``: the same for the TID 1500 SR of the "viewer" profile (sr_viewer.py)
- ``sc-series``, ``sc``: the same for the key-image Secondary Capture
- ``pmap-series``, ``pmap``: the same for the Parametric Maps of heatmaps; `index` is the heatmap's position
- ``heatmap-sc-series``, ``heatmap-sc``: the same for the heatmap Secondary Captures; `index` as for pmap
- ``gsps-series``, ``gsps``: the same for the Grayscale Softcopy Presentation State of detections
- ``no-result-sr-series``, ``no-result-sr``: the same for the "no result" SR sent when input QC refused the
  series (no_result.py); `index` of the instance is the series revision, so each received version of the
  series gets its own report and a retry of one version the same
- ``tracking``: tracking UIDs that tie a SEG segment to its SR measurement group; `index` is the
  segment number, 0 is the group of series-level measurements
- ``finding-tracking``: tracking UID of the SR group of a finding that belongs to no segment; `index` is the
  finding's position among those
- ``detection-tracking``: tracking UID of one region of a detection, shared by its SR planar group and its
  GSPS graphics; `index` is the detection's position, `part` the region's (box first, then key points)

The device UID (the pipeline version running on this node) identifies equipment rather than a result, so
it does not depend on a series and comes from `derive_device_uid`.
"""
from __future__ import annotations

import json
import re

from pydicom.uid import UID, generate_uid

RESULT_UID_KINDS = frozenset({
    "seg-series", "seg", "sr-series", "sr", "sr-viewer-series", "sr-viewer", "sc-series", "sc", "pmap-series", "pmap",
    "heatmap-sc-series", "heatmap-sc", "gsps-series", "gsps", "tracking", "finding-tracking", "detection-tracking",
    "no-result-sr-series", "no-result-sr",
})

# A root of at most 40 characters leaves at least 24 hash digits (about 80 bits) in a 64-character UID,
# enough that two different inputs practically never share a UID.
MAX_ORG_ROOT_LENGTH = 40
_ORG_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def validated_org_root(org_root: str) -> str:
    """`org_root` if it can prefix a UID (digits and dots, no leading zeros, ends with '.'), else ValueError."""
    if not isinstance(org_root, str) or not _ORG_ROOT.match(org_root):
        raise ValueError(
            f"org_root {org_root!r} is not a valid UID root: use digits separated by dots, no leading zeros, "
            "ending with '.' (e.g. '1.2.826.0.1.3680043.10.1234.')"
        )
    if len(org_root) > MAX_ORG_ROOT_LENGTH:
        raise ValueError(
            f"org_root {org_root!r} is {len(org_root)} characters; at most {MAX_ORG_ROOT_LENGTH} leave room "
            "for a collision-resistant hash in a 64-character UID"
        )
    return org_root


def _hashed_uid(org_root: str, parts: list[str]) -> str:
    # pydicom joins entropy sources without a separator ("ab"+"c" == "a"+"bc"); one JSON string does not.
    uid = generate_uid(prefix=validated_org_root(org_root), entropy_srcs=[json.dumps(parts)])
    if not UID(uid).is_valid:
        raise ValueError(f"derived UID {uid} is not a valid DICOM UID")
    return str(uid)


def derive_result_uid(
    org_root: str, source_series_uid: str, pipeline: str, version: str, kind: str, index: int = 0,
    part: int | None = None,
) -> str:
    """The UID of result `kind` number `index` (part `part`) made by `pipeline` `version` from `source_series_uid`.

    Without `part` the hashed input is what it always was, so UIDs of existing kinds never change.
    """
    if kind not in RESULT_UID_KINDS:
        raise ValueError(f"unknown result UID kind {kind!r}; known: {', '.join(sorted(RESULT_UID_KINDS))}")
    if not source_series_uid:
        raise ValueError("source_series_uid is empty: result UIDs are derived from the source SeriesInstanceUID")
    if index < 0 or (part is not None and part < 0):
        raise ValueError(f"index {index} or part {part} is negative")
    parts = ["result", source_series_uid, pipeline, version, kind, str(index)]
    return _hashed_uid(org_root, parts if part is None else [*parts, str(part)])


def derive_device_uid(org_root: str, node_name: str, pipeline: str, version: str) -> str:
    """DeviceUID of `pipeline` `version` running on node `node_name` (the same for every result it makes)."""
    return _hashed_uid(org_root, ["device", node_name, pipeline, version])
