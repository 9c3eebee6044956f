"""A pynetdicom storage + verification SCP, run as a subprocess by the benchmark.

Each received instance is written as ``<storage>/<SOPInstanceUID>.dcm`` from
``event.encoded_dataset()`` (preamble, file meta and the data set bytes as received,
never decoded): pynetdicom's documented fast path. Plain ``write``: no fsync, not atomic.

    python -m benchmarks.pynetdicom_scp --port P --storage DIR
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--aet", default="PYNETDICOM")
    parser.add_argument("--find-matches", type=int, default=0, help="C-FIND matches (S7)")
    parser.add_argument("--max-associations", type=int, default=1100)
    args = parser.parse_args()
    storage: Path = args.storage
    storage.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def on_store(event: Event) -> int:
        request = cast(C_STORE, event.request)
        uid = str(request.AffectedSOPInstanceUID)
        with open(storage / f"{uid}.dcm", "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    def on_echo(event: Event) -> int:
        return 0x0000

    matches: int = args.find_matches

    def on_find(event: Event) -> Iterator[tuple[int, Dataset | None]]:
        for i in range(matches):
            ds = Dataset()
            ds.QueryRetrieveLevel = "PATIENT"
            ds.PatientID = f"P{i:08d}"
            ds.PatientName = f"BENCH^PATIENT{i}"
            yield 0xFF00, ds
        yield 0x0000, None

    ae = AE(ae_title=args.aet)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)]
    if matches:
        ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
        handlers.append((evt.EVT_C_FIND, on_find))
    # S8 holds hundreds of idle associations open; pynetdicom's default limit is 10.
    ae.maximum_associations = args.max_associations
    ae.start_server((args.host, args.port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main()
