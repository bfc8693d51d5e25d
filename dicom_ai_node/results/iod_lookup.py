"""Memoised IOD table look-ups for highdicom.

highdicom asks its copy of the standard's IOD tables whether an attribute belongs to an IOD
(`_standard_utils.is_attribute_in_iod`, by a walk over every module of the IOD) once per source image when
it builds a SEG: 126 walks, ~24 ms of the ~77 ms a 120-slice SEG takes. The answer depends only on the
arguments and the tables, which never change in a process, so it is remembered. Same answers, same objects.
It replaces a private function of highdicom: pyproject.toml pins highdicom to 0.28.x, whose code this follows.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

from highdicom import _standard_utils, base

_walk = _standard_utils.is_attribute_in_iod


@functools.lru_cache(maxsize=1024)
def _remembered(attribute: str, sop_class_uid: str, exclude_path_elements: tuple[str, ...] | None) -> bool:
    return _walk(attribute, sop_class_uid, list(exclude_path_elements) if exclude_path_elements is not None else None)


def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                        exclude_path_elements: Sequence[str] | None = None) -> bool:
    """highdicom's is_attribute_in_iod, remembered (an unknown SOP class still raises, and is not remembered)."""
    exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
    return _remembered(attribute, str(sop_class_uid), exclude)


def memoize_iod_lookups() -> None:
    """Have highdicom use the remembered look-up (where it calls it by name: its IOD helpers and base)."""
    _standard_utils.is_attribute_in_iod = is_attribute_in_iod
    base.is_attribute_in_iod = is_attribute_in_iod
