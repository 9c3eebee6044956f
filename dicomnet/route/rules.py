"""Routing rules: which destinations an instance goes to, and what is changed on the way.

Rules are taken in order and every rule that matches applies (as dcm4chee's forward
rules and mercure's routing rules do): the instance goes to the union of their
destinations. A rule with `stop = true` ends the evaluation when it matches; a `drop`
rule that matches discards the instance, whatever other rules said. A rule matches when
every condition it has holds; a condition is a string with ``*`` and ``?`` wildcards or
a list of them (any one may match), compared with the whole value:

    [[rule]]
    calling = "CT*"                  # calling AE title
    called = "ROUTER"                # called AE title
    address = ["10.1.0.0/16"]        # the sender's address or network
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    match = { Modality = "CT", StudyDescription = "*HEAD*" }   # any attribute
    forward = ["archive", "ai"]      # destination names
    set = { InstitutionName = "General Hospital" }             # coercion, on the copies
    remove = ["OtherPatientIDs"]     #   of this rule's destinations
    stop = false
    drop = false

An attribute absent from the data set matches only ``*``. Coercions of several rules
sending to one destination are applied in rule order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

__all__ = ["Arrival", "Coercion", "Route", "RouteRule", "RuleError", "parse_rules", "route"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """A rule the configuration cannot mean (an unknown keyword, a bad network, ...)."""


@dataclass(frozen=True, slots=True)
class Coercion:
    """Attributes to set and to remove in a destination's copy."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)

    def then(self, other: Coercion) -> Coercion:
        """This coercion followed by `other`."""
        return Coercion(self.set + other.set, self.remove + other.remove)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One `[[rule]]`: conditions, then what to do with a matching instance."""

    calling: tuple[str, ...] = ()
    called: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    sop_class: tuple[str, ...] = ()
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    forward: tuple[str, ...] = ()
    coercion: Coercion = field(default_factory=Coercion)
    stop: bool = False
    drop: bool = False

    @property
    def keywords(self) -> tuple[str, ...]:
        """The attributes its conditions read from the data set."""
        return tuple(keyword for keyword, _ in self.attributes)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one instance goes: destination name -> the coercion for its copy."""

    destinations: dict[str, Coercion]
    dropped: bool = False


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RuleError(f"{what}: a string or a list of strings, not {value!r}")


def _keyword(keyword: str, what: str) -> str:
    if tag_for_keyword(keyword) is None:
        raise RuleError(f"{what}: {keyword!r} is not a DICOM keyword")
    return keyword


def _networks(value: Any) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in _patterns(value, "address"))
    except ValueError as exc:
        raise RuleError(f"address: {exc}") from None


def _coercion(table: Mapping[str, Any]) -> Coercion:
    sets = table.get("set", {})
    if not isinstance(sets, dict):
        raise RuleError("set: a table of keyword = value")
    for keyword, value in sets.items():
        _keyword(keyword, "set")
        if dictionary_VR(keyword) == "SQ" or not isinstance(value, str):
            raise RuleError(f"set: {keyword} = {value!r}: a text value of a non-sequence")
    removes = _patterns(table["remove"], "remove") if "remove" in table else ()
    for keyword in removes:
        _keyword(keyword, "remove")
    return Coercion(tuple(sets.items()), removes)


_KNOWN = {"calling", "called", "address", "sop_class", "match", "forward", "set", "remove"}
_KNOWN |= {"stop", "drop"}


def parse_rules(
    tables: Iterable[Mapping[str, Any]], destinations: Iterable[str]
) -> list[RouteRule]:
    """The `[[rule]]` tables of a configuration, checked against the destination names."""
    known = set(destinations)
    rules = []
    for n, table in enumerate(tables, 1):
        try:
            rules.append(_rule(table, known))
        except RuleError as exc:
            raise RuleError(f"rule {n}: {exc}") from None
    return rules


def _rule(table: Mapping[str, Any], known: set[str]) -> RouteRule:
    unknown = set(table) - _KNOWN
    if unknown:
        raise RuleError(f"unknown setting {sorted(unknown)[0]!r}")
    match = table.get("match", {})
    if not isinstance(match, dict):
        raise RuleError("match: a table of keyword = pattern")
    forward = _patterns(table["forward"], "forward") if "forward" in table else ()
    for name in forward:
        if name not in known:
            raise RuleError(f"forward: no destination named {name!r}")
    drop = bool(table.get("drop", False))
    if not forward and not drop:
        raise RuleError("neither forward nor drop: the rule would do nothing")
    return RouteRule(
        calling=_patterns(table["calling"], "calling") if "calling" in table else (),
        called=_patterns(table["called"], "called") if "called" in table else (),
        networks=_networks(table["address"]) if "address" in table else (),
        sop_class=_patterns(table["sop_class"], "sop_class") if "sop_class" in table else (),
        attributes=tuple(
            (_keyword(k, "match"), _patterns(v, f"match.{k}")) for k, v in match.items()
        ),
        forward=forward,
        coercion=_coercion(table),
        stop=bool(table.get("stop", False)),
        drop=drop,
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """What is known of an instance without decoding it."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    sop_class_uid: str


def _any(patterns: Sequence[str], value: str) -> bool:
    return not patterns or any(fnmatchcase(value, p) for p in patterns)


def _in_networks(networks: Sequence[Network], address: str) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _matches(rule: RouteRule, arrival: Arrival, attribute: Callable[[str], str | None]) -> bool:
    if not (
        _any(rule.calling, arrival.calling_ae_title)
        and _any(rule.called, arrival.called_ae_title)
        and _any(rule.sop_class, arrival.sop_class_uid)
        and _in_networks(rule.networks, arrival.address)
    ):
        return False
    for keyword, patterns in rule.attributes:
        value = attribute(keyword)
        if value is None:
            if "*" not in patterns:
                return False
        elif not _any(patterns, value):
            return False
    return True


def route(
    rules: Sequence[RouteRule], arrival: Arrival, attribute: Callable[[str], str | None]
) -> Route:
    """Where the instance goes (module docstring). `attribute(keyword)` gives a top-level
    attribute's value as text (None when absent); it is called only for rules whose other
    conditions hold, so that a data set is decoded only when a rule looks into it."""
    destinations: dict[str, Coercion] = {}
    for rule in rules:
        if not _matches(rule, arrival, attribute):
            continue
        if rule.drop:
            return Route({}, dropped=True)
        for name in rule.forward:
            destinations[name] = destinations.get(name, Coercion()).then(rule.coercion)
        if rule.stop:
            break
    return Route(destinations)
