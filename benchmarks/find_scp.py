"""A dicomnet C-FIND SCP for S7/S9, run as a subprocess by the benchmark.

Every C-FIND (Patient Root, any query) is answered with `--matches` generated patient-level
identifiers (QueryRetrieveLevel PATIENT, PatientID, PatientName), one pending response
each, from an `on_find` async generator: nothing is read from disk or an index.
uvloop when installed, as the `dicomnet` commands do (`DICOMNET_LOOP=asyncio` turns it off).

    python -m benchmarks.find_scp --port P --matches N
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.services.qr import FindRequest


def backend_options(loop: str | None = None) -> dict[str, Any]:
    """anyio's options for `loop`: "uvloop" (when installed) or "asyncio"; by default the
    `DICOMNET_LOOP` environment variable decides, as for the `dicomnet` commands."""
    if loop is None:
        loop = os.environ.get("DICOMNET_LOOP", "")
    if loop.lower() == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def identifier(i: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = f"P{i:08d}"
    ds.PatientName = f"BENCH^PATIENT{i}"
    return ds


async def serve(host: str, port: int, matches: int) -> None:
    ae = dicomnet.AE("FINDSCP", max_associations=None)

    @ae.on_find
    async def on_find(request: FindRequest) -> AsyncIterator[Dataset]:
        for i in range(matches):
            yield identifier(i)

    async with ae.serve(host, port):
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--matches", type=int, required=True)
    args = parser.parse_args()
    anyio.run(serve, args.host, args.port, args.matches, backend_options=backend_options())


if __name__ == "__main__":
    main()
