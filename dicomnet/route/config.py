"""The configuration of `dicomnet route` (TOML):

[listen]
host = "0.0.0.0"           # default 127.0.0.1
port = 11112               # default 11112
aet = "ROUTER"             # default DICOMNET-ROUTE; checked as the called AE title
allow = ["CT1", "MR1"]     # calling AE titles that may send, exactly (default: any)
tls_cert = "router.crt"    # with tls_key: TLS; with tls_ca too: client certificates
tls_key = "router.key"
users = "users"            # a `dicomnet passwd` file: user identities are checked
require_user = false       # true: an association without a valid identity is rejected
access = "access.toml"     # who may use which service (`serve --access`'s policy)
audit = "audit.jsonl"      # security events, a JSON object a line (`serve --audit`)

[queue]
folder = "route-queue"     # default ./route-queue
fsync = true
max_queued = 100000        # copies per destination before 0xA700 (default: no limit)
unrouted = "refuse"        # an instance no rule sends anywhere: "refuse" (0xC000,
                           # default) or "accept" (acknowledged and not kept)
database = "postgresql://route@db/route"  # the queue's state in PostgreSQL, shared with
                           # other route nodes on the same folder (a shared mount);
                           # needs dicomnet[postgresql] (default: the folder alone)
node = "route-1"           # with database: this node's name (default HOST-PORT)
lease = 30.0               # with database: seconds before another node takes the copies
                           # of a node that stopped renewing them (killed, cut off)

[[destination]]
name = "archive"           # what rules forward to
aet = "ARCHIVE"
host = "10.0.0.9"
port = 104
tls = false                # true: over TLS, verified with tls_ca (default: system CAs)
tls_cert = "router.crt"    # the client certificate presented (default: [listen]'s)
tls_key = "router.key"
associations = 2           # at most, at once (default 2)
window = 1                 # C-STOREs outstanding per association, if the peer agrees
attempts = 10              # then the copy goes to the dead letters (default 10)
backoff = 2.0              # seconds before the first retry, doubling, with jitter,
max_backoff = 600.0        #   up to this
trigger = "instance"       # or "series" / "study": send a series / study once no new
stable_after = 60.0        #   instance of it came for this many seconds
association_per = "series" # with a trigger: one association per series (or "study"),
                           #   released after it (default: the shared pool)

[[rule]]                   # dicomnet.route.rules
...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dicomnet.route.rules import RouteRule, RuleError, parse_rules

__all__ = ["ConfigError", "Destination", "RouteConfig", "load_config", "parse_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used, said in one line."""


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    aet: str
    host: str
    port: int
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    associations: int = 2
    window: int = 1
    attempts: int = 10
    backoff: float = 2.0
    max_backoff: float = 600.0
    trigger: str = "instance"
    stable_after: float = 60.0
    association_per: str | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    aet: str = "DICOMNET-ROUTE"
    allow: tuple[str, ...] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    users: str | None = None
    require_user: bool = False
    access: str | None = None
    audit: str | None = None
    queue: Path = Path("route-queue")
    fsync: bool = True
    max_queued: int | None = None
    unrouted: str = "refuse"
    database: str | None = None
    node: str | None = None
    lease: float = 30.0
    destinations: tuple[Destination, ...] = ()
    rules: tuple[RouteRule, ...] = field(default_factory=tuple)


def _take(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _no_more(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"{where}: unknown setting {sorted(table)[0]!r}")


def _destination(table: dict[str, Any], n: int, base: Path, listen: dict[str, Any]) -> Destination:
    where = f"destination {n}"
    name = _take(table, "name", str, None, where)
    if not name:
        raise ConfigError(f"{where}: a name is needed")
    where = f"destination {name!r}"
    values = {
        "aet": _take(table, "aet", str, None, where),
        "host": _take(table, "host", str, None, where),
        "port": _take(table, "port", int, None, where),
    }
    for key, value in values.items():
        if value is None:
            raise ConfigError(f"{where}: {key} is needed")
    destination = Destination(
        name=name,
        tls=_take(table, "tls", bool, False, where),
        tls_ca=_path(base, _take(table, "tls_ca", str, None, where)),
        tls_cert=_path(base, _take(table, "tls_cert", str, listen.get("tls_cert"), where)),
        tls_key=_path(base, _take(table, "tls_key", str, listen.get("tls_key"), where)),
        associations=_take(table, "associations", int, 2, where),
        window=_take(table, "window", int, 1, where),
        attempts=_take(table, "attempts", int, 10, where),
        backoff=_take(table, "backoff", float, 2.0, where),
        max_backoff=_take(table, "max_backoff", float, 600.0, where),
        trigger=_take(table, "trigger", str, "instance", where),
        stable_after=_take(table, "stable_after", float, 60.0, where),
        association_per=_take(table, "association_per", str, None, where),
        **values,
    )
    _no_more(table, where)
    if destination.associations < 1 or destination.window < 1 or destination.attempts < 1:
        raise ConfigError(f"{where}: associations, window and attempts are at least 1")
    _check_trigger(destination, where)
    return destination


def _check_trigger(destination: Destination, where: str) -> None:
    trigger, per = destination.trigger, destination.association_per
    if trigger not in ("instance", "series", "study"):
        raise ConfigError(f"{where}: trigger is 'instance', 'series' or 'study', not {trigger!r}")
    if destination.stable_after < 0:
        raise ConfigError(f"{where}: stable_after is at least 0 seconds")
    if per is not None and per not in ("series", "study"):
        raise ConfigError(f"{where}: association_per is 'series' or 'study', not {per!r}")
    if per is not None and (trigger == "instance" or (per, trigger) == ("study", "series")):
        raise ConfigError(
            f"{where}: association_per = {per!r} needs trigger = {per!r}"
            + (" or 'study'" if per == "series" else "")
        )


def parse_config(data: dict[str, Any], base: Path = Path(".")) -> RouteConfig:
    """A `RouteConfig` from a parsed TOML document; relative paths are taken from `base`."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    listen = data.pop("listen", {})
    queue = data.pop("queue", {})
    destinations = [
        _destination(dict(t), n, base, listen) for n, t in enumerate(data.pop("destination", []), 1)
    ]
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError("two destinations have the same name")
    try:
        rules = parse_rules(data.pop("rule", []), names)
    except RuleError as exc:
        raise ConfigError(str(exc)) from None
    _no_more(data, "the configuration")
    allow = _take(listen, "allow", list, None, "listen")

    def path(value: str | None) -> str | None:
        return _path(base, value)

    config = RouteConfig(
        host=_take(listen, "host", str, "127.0.0.1", "listen"),
        port=_take(listen, "port", int, 11112, "listen"),
        aet=_take(listen, "aet", str, "DICOMNET-ROUTE", "listen"),
        allow=tuple(allow) if allow is not None else None,
        tls_cert=path(_take(listen, "tls_cert", str, None, "listen")),
        tls_key=path(_take(listen, "tls_key", str, None, "listen")),
        tls_ca=path(_take(listen, "tls_ca", str, None, "listen")),
        users=path(_take(listen, "users", str, None, "listen")),
        require_user=_take(listen, "require_user", bool, False, "listen"),
        access=path(_take(listen, "access", str, None, "listen")),
        audit=path(_take(listen, "audit", str, None, "listen")),
        queue=base / _take(queue, "folder", str, "route-queue", "queue"),
        fsync=_take(queue, "fsync", bool, True, "queue"),
        max_queued=_take(queue, "max_queued", int, None, "queue"),
        unrouted=_take(queue, "unrouted", str, "refuse", "queue"),
        database=_take(queue, "database", str, None, "queue"),
        node=_take(queue, "node", str, None, "queue"),
        lease=_take(queue, "lease", float, 30.0, "queue"),
        destinations=tuple(destinations),
        rules=tuple(rules),
    )
    _no_more(listen, "listen")
    _no_more(queue, "queue")
    if config.unrouted not in ("refuse", "accept"):
        raise ConfigError(f"queue.unrouted: 'refuse' or 'accept', not {config.unrouted!r}")
    if not destinations:
        raise ConfigError("no [[destination]]: nothing to route to")
    _check_shared(config)
    if config.require_user and config.users is None:
        raise ConfigError("listen.require_user needs listen.users")
    return config


def _check_shared(config: RouteConfig) -> None:
    if config.database is not None and not config.database.startswith(
        ("postgresql://", "postgres://")
    ):
        raise ConfigError("queue.database: a postgresql:// URL")
    if config.lease <= 0:
        raise ConfigError("queue.lease: seconds, more than 0")
    if config.database is None and config.node is not None:
        raise ConfigError("queue.node: only with queue.database")


def _path(base: Path, value: str | None) -> str | None:
    return None if value is None else str(base / value)


def load_config(path: str | Path) -> RouteConfig:
    """Read and check the configuration file at `path` (`ConfigError` says what is wrong)."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not TOML: {exc}") from None
    try:
        return parse_config(data, file.parent)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
