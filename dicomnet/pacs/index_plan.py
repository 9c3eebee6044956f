"""Query/Retrieve identifiers checked and planned into SQL for the index (PS3.4 §C.4.1.2.1,
§C.4.1.3, §C.4.2.2.1, §C.4.3.2.1): a C-FIND's `FindPlan`, a C-MOVE / C-GET's retrieve query,
and the `QueryError` an identifier the index cannot answer raises. See `dicomnet.pacs.index`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicomnet.errors import DicomNetError
from dicomnet.pacs.combined import (
    CombinedRange,
    combined_range,
    combined_sql,
    date_time_pairs,
)
from dicomnet.pacs.index_schema import (
    ATTRIBUTES,
    ECHOED,
    FILE_LEVELS,
    FILE_OF_LEVEL,
    FROM_LEVEL,
    INSTANCE_AVAILABILITY,
    LEVELS,
    QUERY_RETRIEVE_LEVEL,
    RANK,
    SPECIFIC_CHARACTER_SET,
    UNIQUE_KEYS,
    Level,
    Model,
    QueryAttribute,
    attributes,
)
from dicomnet.pacs.matching import (
    SQLITE,
    MatchError,
    ParsedQuery,
    SqlDialect,
    normalize,
    parse_query,
    query_values,
    sql_condition_of,
)

__all__ = [
    "STATUS_IDENTIFIER_DOES_NOT_MATCH",
    "STATUS_UNABLE_TO_PROCESS",
    "FindPlan",
    "Output",
    "QueryError",
    "plan_find",
    "plan_retrieve",
]

#: PS3.4 §C.4.1.1.4 / §C.4.2.1.5 failure statuses.
STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000


class QueryError(DicomNetError):
    """An identifier the index cannot answer; `status` is the DIMSE failure status
    to send, `message` a short Error Comment (at most 64 characters, LO), and
    `offending` the tags to put in Offending Element (0000,0901)."""

    def __init__(self, status: int, message: str, offending: Iterable[int] = ()) -> None:
        self.status = status
        self.message = message[:64]
        #: The same as `message`, under the name `DimseError` uses for it.
        self.error_comment = self.message
        self.offending: tuple[int, ...] = tuple(offending)
        super().__init__(f"{message} (status 0x{status:04X})")


# -- query plans --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Output:
    """One attribute of a response: from a result column, from the file, or fixed."""

    tag: int
    vr: str
    source: Literal["column", "file", "level", "echo", "online"]
    index: int = 0  # result column
    key: DataElement | None = None  # the key as sent (file / echo)
    filter: bool = False  # file: the key's value must match


@dataclass(slots=True)
class FindPlan:
    level: Level
    sql: str
    params: list[str]
    outputs: list[Output] = field(default_factory=list)
    file_tags: list[int] = field(default_factory=list)
    charset: list[str] | None = None
    select: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    #: Combined date-time ranges checked on each response: (DA tag, TM tag, range).
    pairs: list[tuple[int, int, CombinedRange]] = field(default_factory=list)
    dialect: SqlDialect = SQLITE


def _keyword(elem: DataElement) -> str:
    return elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _is_key(tag: int) -> bool:
    """A key attribute of an identifier (not a group length, not Specific Character
    Set or Query/Retrieve Level and the like, which are never matched)."""
    return (
        tag & 0xFFFF != 0
        and tag >> 16 > 0x0002
        and tag
        not in (
            SPECIFIC_CHARACTER_SET,
            QUERY_RETRIEVE_LEVEL,
            INSTANCE_AVAILABILITY,
            *ECHOED,
        )
    )


def _model_levels(model: Model) -> tuple[Level, ...]:
    if model == "patient":
        return LEVELS
    if model == "study":
        return LEVELS[1:]
    raise ValueError(f"unknown information model {model!r} (expected 'patient' or 'study')")


def _check_level(model: Model, level: Level | None, identifier: Dataset) -> Level:
    """The Query/Retrieve Level: from the identifier, checked against `level` and the
    model (PS3.4 §C.6.1, §C.6.2)."""
    levels = _model_levels(model)
    elem = identifier.get(QUERY_RETRIEVE_LEVEL)
    given: str | None = None
    if elem is not None and elem.value not in (None, ""):
        given = normalize("CS", str(elem.value))
    if given is None and level is None:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            "Query/Retrieve Level (0008,0052) is missing",
            (QUERY_RETRIEVE_LEVEL,),
        )
    if given is not None and level is not None and given != level:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"Query/Retrieve Level {given} is not {level}",
            (QUERY_RETRIEVE_LEVEL,),
        )
    chosen = given if given is not None else level
    if chosen not in levels:
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"Query/Retrieve Level {chosen!r} not in the {model} root model",
            (QUERY_RETRIEVE_LEVEL,),
        )
    return chosen


def _attribute_level(elem: DataElement, model: Model, level: Level) -> Level:
    attr = ATTRIBUTES.get(elem.keyword)
    found = attr.level if attr is not None else FILE_LEVELS.get(elem.keyword, level)
    if model == "study" and found == "PATIENT":
        return "STUDY"  # Study Root: patient attributes are study attributes (§C.6.2.1.2)
    return found


def _check_hierarchy(
    model: Model, level: Level, identifier: Dataset, keys: list[DataElement], relational: bool
) -> None:
    """No keys below the level; for baseline hierarchical search (PS3.4 §C.4.1.2.1), a
    single value for the unique key of every level above it, which relational
    queries (§C.4.1.2.2.1, §C.4.1.3.2) do not need."""
    rank = RANK[level]
    for elem in keys:
        found = _attribute_level(elem, model, level)
        if RANK[found] > rank:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{_keyword(elem)} is a {found} key, below the {level} level",
                (elem.tag,),
            )
    if relational:
        return
    for above in _model_levels(model)[: rank - RANK[_model_levels(model)[0]]]:
        keyword = UNIQUE_KEYS[above]
        tag = tag_for_keyword(keyword)
        assert tag is not None
        elem = identifier.get(tag)
        values = query_values(ATTRIBUTES[keyword].vr, elem.value) if elem is not None else []
        if len(values) != 1 or "*" in values[0] or "?" in values[0]:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{keyword} needs a single value at {level} level",
                (tag,),
            )


def _parse(vr: str, value: object, keyword: str, tag: int) -> ParsedQuery:
    try:
        return parse_query(vr, value, keyword)
    except MatchError as exc:
        raise QueryError(STATUS_UNABLE_TO_PROCESS, str(exc), (tag,)) from None


def _condition(
    keyword: str, attr: QueryAttribute, value: object, dialect: SqlDialect
) -> tuple[str, tuple[str, ...]] | None:
    parsed = _parse(attr.vr, value, keyword, tag_for_keyword(keyword) or 0)
    if parsed.universal:
        return None
    if attr.exists is None:
        cond = sql_condition_of(attr.match_sql, parsed, dialect=dialect)
        return cond.sql, cond.params
    return _exists_condition(attr, parsed, dialect)


def _exists_condition(
    attr: QueryAttribute, parsed: ParsedQuery, dialect: SqlDialect
) -> tuple[str, tuple[str, ...]]:
    """A condition on an attribute derived from the entities below (ModalitiesInStudy,
    ...): some of them match, or, for Empty Value Matching, none has a value."""
    assert attr.exists is not None
    parts: list[str] = []
    params: tuple[str, ...] = ()
    valued = parsed.without_empty()
    if valued is not None:
        cond = sql_condition_of(attr.match_sql, valued, dialect=dialect)
        parts.append(attr.exists.format(cond=cond.sql))
        params = cond.params
    if parsed.has_empty:
        parts.append(f"{attr.value_sql} IS NULL")
    return ("(" + " OR ".join(parts) + ")" if len(parts) > 1 else parts[0]), params


def _plan_pairs(plan: FindPlan, keys: list[DataElement]) -> frozenset[int]:
    """Combined date-time matching (PS3.4 §C.2.2.2.5.4, `dicomnet.pacs.combined`) of
    the DA / TM key pairs that allow it: in SQL when both are indexed, else on each
    response. Returns the tags of the paired keys, which are not matched apart."""
    by_keyword = {elem.keyword: elem for elem in keys if elem.keyword}
    paired: set[int] = set()
    for date_keyword, time_keyword in date_time_pairs(by_keyword):
        date, time = by_keyword[date_keyword], by_keyword[time_keyword]
        if date.VR != "DA" or time.VR != "TM":
            continue
        span = combined_range(
            _parse("DA", date.value, date_keyword, int(date.tag)),
            _parse("TM", time.value, time_keyword, int(time.tag)),
        )
        if span is None:
            continue
        paired |= {int(date.tag), int(time.tag)}
        date_attr, time_attr = ATTRIBUTES.get(date_keyword), ATTRIBUTES.get(time_keyword)
        if date_attr is None or time_attr is None or date_attr.exists or time_attr.exists:
            plan.pairs.append((int(date.tag), int(time.tag), span))
            continue
        cond = combined_sql(span, date_attr.match_sql, time_attr.match_sql, plan.dialect)
        plan.where.append(cond.sql)
        plan.params.extend(cond.params)
    return frozenset(paired)


def plan_find(
    model: Model,
    level: Level | None,
    identifier: Dataset,
    relational: bool = False,
    combined_datetime: bool = False,
    dialect: SqlDialect = SQLITE,
) -> FindPlan:
    """The SQL of a C-FIND and how its rows become responses, in `dialect`."""
    chosen = _check_level(model, level, identifier)
    elements = list(identifier)
    keys = [elem for elem in elements if _is_key(elem.tag)]
    _check_hierarchy(model, chosen, identifier, keys, relational)
    plan = FindPlan(chosen, "", [], dialect=dialect)
    paired = _plan_pairs(plan, keys) if combined_datetime else frozenset()
    for elem in elements:
        _plan_element(plan, elem, int(elem.tag) in paired)
    if not any(output.source == "level" for output in plan.outputs):
        plan.outputs.append(Output(QUERY_RETRIEVE_LEVEL, "CS", "level"))
    path = FILE_OF_LEVEL[chosen] if plan.file_tags else "NULL"
    plan.sql = f"SELECT {', '.join([path, *plan.select])} FROM {FROM_LEVEL[chosen]}"
    if plan.where:
        plan.sql += " WHERE " + " AND ".join(plan.where)
    return plan


def _plan_element(plan: FindPlan, elem: DataElement, paired: bool) -> None:
    """Add one element of the identifier to `plan`; a `paired` key is returned but
    not matched on its own."""
    tag = int(elem.tag)
    if tag == SPECIFIC_CHARACTER_SET:
        values = query_values("CS", elem.value) if elem.value else []
        plan.charset = values or None
    elif tag == QUERY_RETRIEVE_LEVEL:
        plan.outputs.append(Output(tag, "CS", "level"))
    elif tag == INSTANCE_AVAILABILITY:
        plan.outputs.append(Output(tag, "CS", "online"))
    elif tag in ECHOED:
        plan.outputs.append(Output(tag, elem.VR, "echo", key=elem))
    elif _is_key(tag):
        _plan_key(plan, elem, paired)


def _plan_key(plan: FindPlan, elem: DataElement, paired: bool) -> None:
    tag = int(elem.tag)
    attr = attributes(plan.dialect).get(elem.keyword) if elem.keyword else None
    if attr is not None and elem.VR != "SQ":
        condition = None if paired else _condition(elem.keyword, attr, elem.value, plan.dialect)
        if condition is not None:
            plan.where.append(condition[0])
            plan.params.extend(condition[1])
        plan.select.append(attr.value_sql)
        plan.outputs.append(Output(tag, attr.vr, "column", index=len(plan.select)))
        return
    needs_filter = elem.VR == "SQ" or (
        not paired and not _parse(elem.VR, elem.value, _keyword(elem), tag).universal
    )
    plan.file_tags.append(tag)
    plan.outputs.append(Output(tag, elem.VR, "file", key=elem, filter=needs_filter))


def plan_retrieve(
    model: Model,
    level: Level | None,
    identifier: Dataset,
    select: str,
    relational: bool = False,
    dialect: SqlDialect = SQLITE,
) -> tuple[str, list[str]]:
    """The instances a C-MOVE / C-GET retrieves (PS3.4 §C.4.2.2.1, §C.4.3.2.1): the unique
    keys of the levels above the retrieve level each a single value (with relational
    retrieve, §C.4.2.3.2.1 / §C.4.3.3.2.1, they may be absent), the unique key of the
    retrieve level one value or a list of UIDs; other keys are ignored."""
    chosen = _check_level(model, level, identifier)
    where: list[str] = []
    params: list[str] = []
    for current in _model_levels(model):
        keyword = UNIQUE_KEYS[current]
        tag = tag_for_keyword(keyword)
        assert tag is not None
        elem = identifier.get(tag)
        attr = attributes(dialect)[keyword]
        values = query_values(attr.vr, elem.value) if elem is not None else []
        if not _retrieve_key(keyword, tag, values, current, chosen, relational):
            continue
        condition = _condition(keyword, attr, values, dialect)
        assert condition is not None
        where.append(condition[0])
        params.extend(condition[1])
    sql = f"SELECT {select} FROM {FROM_LEVEL['IMAGE']} WHERE {' AND '.join(where)}"
    return sql, params


def _retrieve_key(
    keyword: str, tag: int, values: list[str], current: Level, chosen: Level, relational: bool
) -> bool:
    """Check the unique key of `current` in a retrieve at level `chosen`; whether it
    is matched."""
    if RANK[current] > RANK[chosen]:
        if values:
            raise QueryError(
                STATUS_IDENTIFIER_DOES_NOT_MATCH,
                f"{keyword} is below the {chosen} retrieve level",
                (tag,),
            )
        return False
    if not values:
        if relational and current != chosen:
            return False
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"{keyword} is required to retrieve at {chosen} level",
            (tag,),
        )
    if any("*" in v or "?" in v for v in values) or (current != chosen and len(values) > 1):
        raise QueryError(
            STATUS_IDENTIFIER_DOES_NOT_MATCH,
            f"{keyword} must be {'UIDs' if current == chosen else 'one value'}, no wild cards",
            (tag,),
        )
    return True
