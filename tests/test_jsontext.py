"""The JSON text the node records per received instance (jsontext): what the standard library reads back,
also for text it cannot write fast, and what SQLite's json_extract reads in the store."""
from __future__ import annotations

import json
import sqlite3

import pytest

from dicom_ai_node import jsontext

HEADER = {
    "SpecificCharacterSet": ["ISO 2022 IR 13", "ISO 2022 IR 87"],
    "PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",  # PS3.5 H.3.1's example
    "InstitutionName": "Hôpital Saint-Éloi",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "Rows": "512",
    "Empty": "",
    "Quote": 'a "quoted" \\ back\\slash',
}


@pytest.mark.parametrize("value", [HEADER, {}, [], "x", 12, 1.5, None, True, {"n": [1, 2.25, None, False]},
                                   {"control": "\x00\x1f\x7f\n\t"}])
def test_what_is_written_reads_back_the_same_with_either_reader(value):
    text = jsontext.dumps(value)
    assert json.loads(text) == value == jsontext.loads(text) == jsontext.loads(text.encode())
    assert "\n" not in text and ": " not in text  # compact, one line


def test_what_orjson_refuses_is_written_by_the_standard_library():
    for value in ({"lone": "\udcff"}, {1: "int key"}, {"big": 2 ** 70}):
        assert jsontext.dumps(value) == json.dumps(value, separators=(",", ":"))


def test_sqlite_reads_values_out_of_the_text():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (header TEXT)")
    db.execute("INSERT INTO t VALUES (?)", (jsontext.dumps(HEADER),))
    names = db.execute("SELECT json_extract(header, '$.PatientName'), json_extract(header, '$.InstitutionName'),"
                       " json_extract(header, '$.ImageType') FROM t").fetchone()
    assert names[0] == HEADER["PatientName"] and names[1] == HEADER["InstitutionName"]
    assert json.loads(names[2]) == HEADER["ImageType"]


def test_not_json_is_a_value_error():
    with pytest.raises(ValueError):
        jsontext.loads("{not json")
