"""Routing rules (dicomnet.route.rules): parsing, matching, and which rules apply."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from dicomnet.route.rules import Arrival, Coercion, RuleError, parse_rules, route

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
DESTINATIONS = ("archive", "ai", "research")

CONFIG = """
[[rule]]
calling = "TEST*"
drop = true

[[rule]]
match = { Modality = "CT" }
forward = ["archive"]

[[rule]]
match = { Modality = ["CT", "MR"], StudyDescription = "*HEAD*" }
forward = ["ai"]
set = { InstitutionName = "Anonymous" }
remove = ["OtherPatientIDs"]

[[rule]]
sop_class = "1.2.840.10008.5.1.4.1.1.4"
address = ["10.1.0.0/16"]
forward = ["archive", "research"]
stop = true

[[rule]]
forward = ["archive"]
set = { InstitutionName = "Last" }
"""


def rules() -> Any:
    return parse_rules(tomllib.loads(CONFIG)["rule"], DESTINATIONS)


def arrival(calling: str = "CT1", address: str = "10.2.0.5", sop: str = CT) -> Arrival:
    return Arrival(calling, "ROUTER", address, sop)


def looked_up(values: dict[str, str]) -> tuple[Any, list[str]]:
    seen: list[str] = []

    def attribute(keyword: str) -> str | None:
        seen.append(keyword)
        return values.get(keyword)

    return attribute, seen


def test_every_matching_rule_adds_its_destinations_with_its_coercion() -> None:
    attribute, _ = looked_up({"Modality": "CT", "StudyDescription": "CT HEAD W/O"})
    result = route(rules(), arrival(), attribute)
    assert set(result.destinations) == {"archive", "ai"}
    assert result.destinations["ai"] == Coercion(
        (("InstitutionName", "Anonymous"),), ("OtherPatientIDs",)
    )
    # The last rule matches everything: its coercion follows for archive.
    assert result.destinations["archive"] == Coercion((("InstitutionName", "Last"),))


def test_stop_ends_the_evaluation() -> None:
    attribute, _ = looked_up({"Modality": "MR", "StudyDescription": "KNEE"})
    result = route(rules(), arrival(address="10.1.4.4", sop=MR), attribute)
    assert result.destinations == {"archive": Coercion(), "research": Coercion()}


def test_drop_wins_and_needs_no_attribute() -> None:
    attribute, seen = looked_up({"Modality": "CT"})
    result = route(rules(), arrival(calling="TESTBOX"), attribute)
    assert result.dropped and result.destinations == {}
    assert seen == []  # the data set need not be decoded


def test_an_absent_attribute_matches_only_a_star() -> None:
    attribute, _ = looked_up({})
    result = route(rules(), arrival(), attribute)
    assert set(result.destinations) == {"archive"}
    star = parse_rules([{"match": {"Modality": "*"}, "forward": "ai"}], DESTINATIONS)
    assert set(route(star, arrival(), attribute).destinations) == {"ai"}


def test_no_rule_matches_no_destination() -> None:
    only_mr = parse_rules([{"sop_class": MR, "forward": "ai"}], DESTINATIONS)
    result = route(only_mr, arrival(), looked_up({})[0])
    assert result.destinations == {} and not result.dropped


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"forward": "nowhere"}, "no destination named 'nowhere'"),
        ({"match": {"Modalty": "CT"}, "forward": "ai"}, "'Modalty' is not a DICOM keyword"),
        ({"address": "10.0.0.300", "forward": "ai"}, "address"),
        ({"calling": "CT*"}, "neither forward nor drop"),
        ({"forward": "ai", "sets": {}}, "unknown setting 'sets'"),
        ({"forward": "ai", "set": {"ReferencedStudySequence": "x"}}, "non-sequence"),
        ({"forward": "ai", "set": {"PatientName": 3}}, "text value"),
        ({"forward": "ai", "calling": 5}, "a string or a list of strings"),
    ],
)
def test_a_rule_the_configuration_cannot_mean(table: dict[str, Any], message: str) -> None:
    with pytest.raises(RuleError, match="rule 1: .*" + message.replace("(", r"\(")):
        parse_rules([table], DESTINATIONS)
