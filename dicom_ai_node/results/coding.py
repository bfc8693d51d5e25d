"""Concepts of a PipelineResult as highdicom coded concepts."""
from __future__ import annotations

from highdicom.sr import CodedConcept

from dicom_ai_node.pipeline import Concept


def coded(concept: Concept) -> CodedConcept:
    return CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)
