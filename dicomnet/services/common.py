"""What the service modules share: turning handler results and errors into statuses."""

from __future__ import annotations

import logging
from typing import Any

from dicomnet.errors import DimseError
from dicomnet.proto.contexts import PresentationContext
from dicomnet.proto.dimse import DimseMessage
from dicomnet.status import Status

__all__ = ["check", "comment", "failure", "merge_contexts", "status_of"]

log = logging.getLogger("dicomnet")


def status_of(result: Any) -> tuple[int, str | None]:
    """A handler's result as (status, error comment): None is success; a status; or a
    (status, comment) pair."""
    if result is None:
        return 0x0000, None
    if isinstance(result, tuple):
        status, text = result
        return int(status), (str(text) if text is not None else None)
    return int(result), None


def comment(exc: BaseException) -> str:
    """An exception as an Error Comment (LO: at most 64 characters, PS3.7 Annex C)."""
    return f"{type(exc).__name__}: {exc}"[:64]


def failure(exc: Exception, handler: str, default: int = 0xC000) -> tuple[int, str]:
    """The failure status for a handler's exception: its own `status` (a `DimseError`,
    an index `QueryError`) if it has a failure one, else `default`."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and Status(status).is_failure:
        log.info("%s handler refused the request: %s", handler, exc)
        return status, str(getattr(exc, "error_comment", None) or exc)[:64]
    log.exception("%s handler failed", handler)
    return default, comment(exc)


def check(response: DimseMessage) -> Status:
    """The response's status; a failure (or cancel) raises `DimseError` carrying it."""
    status = Status(getattr(response, "status", 0))
    if status.is_failure or status.is_cancel:
        raise DimseError(status, getattr(response, "error_comment", None), response=response)
    return status


def _role(a: bool | None, b: bool | None) -> bool | None:
    if a or b:
        return True
    if a is False or b is False:
        return False
    return None


def merge_contexts(
    into: dict[str, PresentationContext], more: dict[str, PresentationContext]
) -> None:
    """Add `more` to `into`; where both have an abstract syntax, the transfer syntaxes and
    the roles a requestor may take (SCP/SCU role selection) are those of either."""
    for uid, context in more.items():
        have = into.get(uid)
        if have is None:
            into[uid] = context
            continue
        syntaxes = have.transfer_syntaxes + tuple(
            ts for ts in context.transfer_syntaxes if ts not in have.transfer_syntaxes
        )
        into[uid] = PresentationContext(
            uid,
            syntaxes,
            scu_role=_role(have.scu_role, context.scu_role),
            scp_role=_role(have.scp_role, context.scp_role),
        )
