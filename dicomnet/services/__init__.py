"""The DIMSE services, each one module that plugs into the association shell.

A service gives the association two things: a `Service` object (what requests it
accepts, what an AE negotiates for it, how it answers a request: the SCP side) and,
if it offers requests to the SCU, a subclass of `BaseAssociation` with them. Adding a
service is one module and one registration here: its object in `SERVICES` and its SCU
class among `Association`'s bases. Services built on DIMSE-N (storage commitment, MPPS)
are handlers of N-service operations: they need no `Service` of their own, only their
SCU class if they offer one (`CommitmentUser` comes with the DIMSE-N requests).
"""

from __future__ import annotations

from typing import Any

from dicomnet.association import Service
from dicomnet.services.commitment import CommitmentUser
from dicomnet.services.nservices import NServices
from dicomnet.services.qr import QueryRetrieve, QueryRetrieveUser
from dicomnet.services.storage import Storage, StorageUser
from dicomnet.services.verification import Verification, VerificationUser

__all__ = ["SERVICES", "Association", "service_table"]

SERVICES: tuple[Service, ...] = (Verification(), Storage(), QueryRetrieve(), NServices())


class Association(VerificationUser, QueryRetrieveUser, StorageUser, CommitmentUser):
    """An established association, as requestor (SCU) or acceptor (SCP), with the
    requests of every service.

    Made by `dicomnet.connect()` or by `AE.serve()`; not constructed directly.
    """


def service_table(services: tuple[Service, ...] = SERVICES) -> dict[type[Any], Service]:
    """Request message type -> the service that answers it."""
    return {request: service for service in services for request in service.requests}
