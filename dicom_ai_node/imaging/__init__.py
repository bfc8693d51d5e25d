"""Imaging stage: DICOM instances -> Volume in real units with geometry, input QC, display values."""
from dicom_ai_node.imaging.display import display_pixels
from dicom_ai_node.imaging.errors import VolumeError
from dicom_ai_node.imaging.series import load_series
from dicom_ai_node.imaging.volume import Volume, load_volume

__all__ = ["Volume", "VolumeError", "display_pixels", "load_series", "load_volume"]
