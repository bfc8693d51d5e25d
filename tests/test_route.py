"""Routing is a pure function: table-driven tests of the condition grammar and rule selection."""
from __future__ import annotations

import pytest

from dicom_ai_node.config import Rule
from dicom_ai_node.route import assignments, parse_condition, route

CHEST_CT = {"Modality": "CT", "BodyPartExamined": "CHEST", "SliceThickness": "1.25",
            "SeriesDescription": "AX LUNG 1.25", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}


@pytest.mark.parametrize("key, spec, header, expected", [
    ("Modality", "CT", CHEST_CT, True),
    ("Modality", "ct", CHEST_CT, True),
    ("Modality", "MR", CHEST_CT, False),
    ("BodyPartExamined", ["LUNG", "CHEST"], CHEST_CT, True),
    ("BodyPartExamined", ["ABDOMEN"], CHEST_CT, False),
    ("SliceThickness", "<=2.5", CHEST_CT, True),
    ("SliceThickness", "<1.25", CHEST_CT, False),
    ("SliceThickness", ">=1.25", CHEST_CT, True),
    ("SliceThickness", "==1.25", CHEST_CT, True),
    ("SliceThickness", "!=1.25", CHEST_CT, False),
    ("SliceThickness", "<=2.5", {"Modality": "CT"}, False),  # absent never satisfies a comparison
    ("SeriesDescription", {"regex": "lung"}, CHEST_CT, True),
    ("SeriesDescription", {"regex": "^cor"}, CHEST_CT, False),
    ("ImageType", "AXIAL", CHEST_CT, True),  # any value of a multi-valued element
    ("ImageType", {"regex": "PRIMARY.AXIAL"}, CHEST_CT, True),  # regex also sees the joined value
    ("ContrastBolusAgent", {"present": False}, CHEST_CT, True),
    ("ContrastBolusAgent", {"present": True}, CHEST_CT, False),
    ("SeriesNumber", 3, {"SeriesNumber": "3"}, True),
    ("SeriesNumber", 3, {"SeriesNumber": "4"}, False),
])
def test_condition(key, spec, header, expected):
    from dicom_ai_node.route import header_values

    assert parse_condition(key, spec).test(header_values(header, key)) is expected


@pytest.mark.parametrize("spec", [{"regex": "("}, {"foo": 1}, [], [["a"]], None, True])
def test_bad_condition_names_the_key(spec):
    with pytest.raises(ValueError, match="BodyPartExamined"):
        parse_condition("BodyPartExamined", spec)


def rule(name, match, pipelines=("ct_lung",), priority=0, destinations=None):
    return Rule(name=name, match=match, pipelines=list(pipelines), priority=priority, destinations=destinations)


def test_route_orders_firing_rules_by_priority_and_explains():
    rules = [
        rule("low", {"Modality": "CT"}, ["a"], priority=1),
        rule("mr", {"Modality": "MR"}, ["b"]),
        rule("high", {"Modality": "CT", "calling_ae": "PACS1"}, ["a", "c"], priority=5, destinations=["X"]),
    ]
    decisions = route(rules, CHEST_CT, "PACS1")
    assert [d.rule for d in decisions] == ["high", "low", "mr"]
    assert [d.fires for d in decisions] == [True, True, False]
    assert "Modality: is 'CT', wanted 'MR'" in decisions[2].explain()
    chosen = assignments(decisions)
    assert [(a.pipeline, a.rule, a.destinations) for a in chosen] == [("a", "high", ("X",)), ("c", "high", ("X",))]


def test_calling_ae_condition():
    rules = [rule("only-pacs1", {"calling_ae": "PACS1"})]
    assert route(rules, CHEST_CT, "PACS1")[0].fires
    assert not route(rules, CHEST_CT, "PACS2")[0].fires


def test_no_rule_fires():
    assert assignments(route([rule("mr", {"Modality": "MR"})], CHEST_CT, "X")) == []
