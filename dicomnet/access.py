"""Access control: which services a peer may use, by calling AE title, address and user.

An `AccessPolicy` is a list of `AccessRule`s; the first rule that matches the calling AE
title, the peer address and the verified user of an association gives the services it
may use, and no matching rule means none (the association is then rejected, PS3.8
Table 9-21: rejected-permanent, service-user, no reason given). A service refused on an
association it is allowed has its presentation contexts rejected in the A-ASSOCIATE-AC
(result 1, user-rejection, PS3.8 Table 9-18). The services:

    echo  store  find  worklist  move  get  commitment  mpps  n-services  (or "all")

`n-services` is every other SOP class (DIMSE-N handlers of the application). The file
`serve --access FILE` reads (TOML):

    [[rule]]
    calling = "CT*"                 # AE title, * and ? wildcards; a list; default "*"
    address = ["10.0.0.0/8", "192.168.1.7"]   # IP address or CIDR; a list; default any
    user = "alice"                  # a verified user name, "*" any; default: anyone
    services = ["echo", "store"]
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dicomnet.proto.contexts import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    MODALITY_WORKLIST_FIND,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STORAGE_COMMITMENT_PUSH,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    AcceptedContext,
    Negotiated,
    all_storage_sop_classes,
)
from dicomnet.proto.pdu import PresentationContextAC, PresentationContextResult, RoleSelection

__all__ = [
    "ALL_SERVICES",
    "AccessPolicy",
    "AccessRule",
    "load_access",
    "restrict",
    "service_of",
]

ALL_SERVICES = frozenset(
    ("echo", "store", "find", "worklist", "move", "get", "commitment", "mpps", "n-services")
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PATIENT_ROOT_FIND_OLD = "1.2.840.10008.5.1.4.1.2.3.1"  # Patient/Study Only (retired)


@cache
def _services_by_sop_class() -> dict[str, str]:
    table = dict.fromkeys(all_storage_sop_classes(), "store")
    table.update(
        {
            VERIFICATION: "echo",
            PATIENT_ROOT_FIND: "find",
            STUDY_ROOT_FIND: "find",
            PATIENT_ROOT_FIND_OLD: "find",
            MODALITY_WORKLIST_FIND: "worklist",
            PATIENT_ROOT_MOVE: "move",
            STUDY_ROOT_MOVE: "move",
            PATIENT_ROOT_GET: "get",
            STUDY_ROOT_GET: "get",
            STORAGE_COMMITMENT_PUSH: "commitment",
            MODALITY_PERFORMED_PROCEDURE_STEP: "mpps",
        }
    )
    return table


def service_of(abstract_syntax: str) -> str:
    """The service a SOP class belongs to (one dict lookup; others: `n-services`)."""
    return _services_by_sop_class().get(abstract_syntax, "n-services")


def _services(names: Iterable[str]) -> frozenset[str]:
    wanted = {name.strip().lower() for name in names}
    if "all" in wanted or "*" in wanted:
        return ALL_SERVICES
    unknown = wanted - ALL_SERVICES
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}; known: {sorted(ALL_SERVICES)}")
    return frozenset(wanted)


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One rule: who (`calling` AE title patterns, `networks`, `users`; empty: any) may
    use which `services`."""

    services: frozenset[str]
    calling: tuple[str, ...] = ("*",)
    networks: tuple[Network, ...] = ()
    users: tuple[str, ...] = ()

    @classmethod
    def make(
        cls,
        services: Iterable[str],
        calling: str | Iterable[str] = "*",
        address: str | Iterable[str] = (),
        user: str | Iterable[str] = (),
    ) -> AccessRule:
        """A rule from names as written in the access file."""
        return cls(
            _services(services),
            tuple(t.strip() for t in _listed(calling)) or ("*",),
            tuple(_network(a) for a in _listed(address)),
            tuple(_listed(user)),
        )

    def matches(self, calling: str, host: str, user: str | None) -> bool:
        title = calling.strip()
        if not any(fnmatchcase(title, pattern) for pattern in self.calling):
            return False
        if self.networks:
            address = _address(host)
            if address is None or not any(address in net for net in self.networks):
                return False
        if self.users:
            return user is not None and ("*" in self.users or user in self.users)
        return True


def _listed(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected a string or a list of strings, not {value!r}")
    return items


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Rules, the first that matches deciding (see the module's documentation)."""

    rules: tuple[AccessRule, ...] = ()

    def allowed(self, calling: str, host: str, user: str | None = None) -> frozenset[str]:
        """The services the first matching rule allows; none if no rule matches."""
        for rule in self.rules:
            if rule.matches(calling, host, user):
                return rule.services
        return frozenset()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccessPolicy:
        unknown = set(data) - {"rule"}
        if unknown:
            raise ValueError(f"unknown table(s) {sorted(unknown)}: only [[rule]]")
        rules = []
        for number, raw in enumerate(data.get("rule", []), 1):
            extra = set(raw) - {"calling", "address", "user", "services"}
            if extra or "services" not in raw:
                raise ValueError(
                    f"rule {number}: keys are calling, address, user and services (required)"
                )
            try:
                rules.append(AccessRule.make(**raw))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"rule {number}: {exc}") from None
        return cls(tuple(rules))


def load_access(path: str | Path) -> AccessPolicy:
    """An `AccessPolicy` from a TOML file of `[[rule]]` tables."""
    with open(path, "rb") as source:
        try:
            data = tomllib.load(source)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    try:
        return AccessPolicy.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _allowed_roles(context: AcceptedContext, allowed: frozenset[str]) -> tuple[bool, bool]:
    """(we may be SCU, we may be SCP) on a storage context: the peer's C-STOREs to us are
    `store`; ours to it, a C-GET's sub-operations, are `get`."""
    return context.we_are_scu and "get" in allowed, context.we_are_scp and "store" in allowed


def restrict(
    negotiated: Negotiated, allowed: frozenset[str]
) -> tuple[Negotiated, list[tuple[str, str]]]:
    """Reject the accepted contexts of services not `allowed` (PS3.8 Table 9-18, result 1):
    the negotiation left, and the refused (abstract syntax, service) pairs."""
    if allowed >= ALL_SERVICES:
        return negotiated, []
    response = negotiated.response
    contexts: dict[int, AcceptedContext] = {}
    results: list[PresentationContextAC] = []
    refused: list[tuple[str, str]] = []
    roles = {role.sop_class_uid: role for role in response.user_information.role_selections}
    for result in response.presentation_contexts:
        context = negotiated.contexts.get(result.context_id)
        if context is None:
            results.append(result)
            continue
        service = service_of(context.abstract_syntax)
        keep = service in allowed
        if service == "store":
            scu, scp = _allowed_roles(context, allowed)
            keep = scu or scp
            if keep and (scu, scp) != (context.we_are_scu, context.we_are_scp):
                context = replace(context, we_are_scu=scu, we_are_scp=scp)
                roles[context.abstract_syntax] = RoleSelection(context.abstract_syntax, scp, scu)
        if keep:
            contexts[context.context_id] = context
            results.append(result)
        else:
            refused.append((context.abstract_syntax, service))
            results.append(replace(result, result=PresentationContextResult.USER_REJECTION))
    information = replace(response.user_information, role_selections=tuple(roles.values()))
    response = replace(response, presentation_contexts=tuple(results), user_information=information)
    return replace(negotiated, response=response, contexts=contexts), refused
