"""dicom-ai-node: a DICOM node that runs AI pipelines on studies from PACS and sends back DICOM results."""

__version__ = "0.1.0"
