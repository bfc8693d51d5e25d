"""results/encoding.py writes the same bytes as pydicom's save_as(enforce_file_format=True).

Checked on every file of pydicom's test data (as read, and as a copy whose raw elements pydicom decodes
again), and on made-up data sets with what the fast path must hand to pydicom or mirror: non-ASCII text in
UTF-8, ambiguous VRs resolved from an ancestor, undefined-length sequences and items, group lengths,
odd-length bytes, a value too long for its 16-bit length, a LUT descriptor. Every result kind's bytes are
compared in test_results_kinds.py.
"""
from __future__ import annotations

import copy
import warnings
from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai_node.results import encoding
from dicom_ai_node.results.encoding import dicom_file_bytes


def pydicom_bytes(ds: Dataset) -> bytes | type:
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - the same refusal is expected from both
        return type(exc)
    return buffer.getvalue()


def node_bytes(ds: Dataset) -> bytes | type:
    try:
        return dicom_file_bytes(ds)
    except Exception as exc:  # noqa: BLE001
        return type(exc)


def same_bytes(ds: Dataset) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom_bytes(copy.deepcopy(ds)) == node_bytes(copy.deepcopy(ds))


def readable_test_files() -> list[str]:
    paths = []
    for path in get_testdata_files("*"):
        try:
            pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001 - not DICOM (pydicom's test data holds other files too)
            continue
        paths.append(path)
    return paths


TEST_FILES = readable_test_files()


def fast_path_elements(ds: Dataset, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many elements of `ds` the fast path encoded itself (not handed to pydicom)."""
    counted = {"plain": 0}
    plain = encoding._plain_value

    def counting(elem):
        value = plain(elem)
        counted["plain"] += value is not None
        return value

    monkeypatch.setattr(encoding, "_plain_value", counting)
    dicom_file_bytes(copy.deepcopy(ds))
    return counted["plain"]


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_pydicom_test_files_encode_identically(path: str) -> None:
    ds = pydicom.dcmread(path, force=True)
    assert same_bytes(ds), "as read"
    for elem in ds.iterall():
        pass  # decodes every raw element: the data set now differs from what was read
    assert same_bytes(ds), "decoded"


def test_fast_path_is_taken_for_explicit_little_endian_files(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    copy_ = copy.deepcopy(ds)
    copy_.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for _ in copy_.iterall():
        pass  # every element decoded (a result object is made of such elements)
    assert fast_path_elements(copy_, monkeypatch) > 200
    assert same_bytes(copy_)


def made_up(**elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_non_ascii_text_in_utf8_is_left_to_pydicom() -> None:
    ds = made_up(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen", StudyDescription="Thorax ünd",
                 InstitutionName="Hôpital", SeriesDescription="plain ASCII")
    assert same_bytes(ds)


def test_ambiguous_vr_resolved_from_an_ancestor() -> None:
    ds = made_up(PixelRepresentation=1, Rows=2, Columns=2, BitsAllocated=16, BitsStored=16, SamplesPerPixel=1)
    item = Dataset()
    item.add_new(0x00280106, "US or SS", -5)  # SmallestImagePixelValue: SS because PixelRepresentation is 1
    ds.ReferencedImageSequence = Sequence([item])
    ds.add_new(0x00280107, "US or SS", 300)
    assert same_bytes(ds)


def test_undefined_lengths_group_lengths_and_odd_bytes() -> None:
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    inner.is_undefined_length_sequence_item = True
    ds = made_up(AnatomicRegionSequence=Sequence([inner]), EncapsulatedDocument=b"odd")
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.add_new(0x00080000, "UL", 1234)  # a retired group length: not written
    ds.add_new(0x00091010, "UN", b"abc")  # UN of odd length, not padded
    ds.add_new(0x00091011, "OW", b"\x01\x02\x03")
    assert same_bytes(ds)


def test_empty_values_numbers_and_lists() -> None:
    ds = made_up(ImageType=["DERIVED", "PRIMARY"], PixelSpacing=[0.5, "0.25"], WindowCenter="40",
                 InstanceNumber=7, Rows=0, ImagePositionPatient=[-1.5, 2.0, 3e-7], StudyDate="",
                 ReferencedFrameNumber=[1, 2, 3], ContentLabel="")
    ds.add_new(0x00181318, "DS", None)
    ds.add_new(0x00660107, "UL", [1, 2, 3])
    ds.add_new(0x00189219, "FD", [1.5, 2.25])
    ds.add_new(0x00660128, "OF", b"\x00\x00\x80\x3f")
    assert same_bytes(ds)


def test_text_too_long_for_its_length_field_becomes_un_as_in_pydicom() -> None:
    ds = made_up()
    ds.add_new(0x00081030, "LO", "x" * 70000)
    assert same_bytes(ds)


def test_lut_descriptor_and_other_encodings_left_to_pydicom() -> None:
    ds = made_up(PixelRepresentation=1)
    ds.add_new(0x00283002, "SS", [256, -100, 16])
    assert same_bytes(ds)
    implicit = made_up(StudyDescription="implicit")
    implicit.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    assert same_bytes(implicit)
    no_meta = made_up()
    del no_meta.file_meta
    assert same_bytes(no_meta)
