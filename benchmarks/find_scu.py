"""A dicomnet C-FIND SCU for S7/S9, run as a subprocess so that its peak RSS is its own.

One association, one Patient Root C-FIND (QueryRetrieveLevel PATIENT, PatientID and
PatientName universal), every pending response counted; prints one JSON object:
{"matches", "seconds" (before the association request to after the release),
"cpu_seconds", "peak_rss_kib" (VmHWM), "error"}. uvloop when installed.

    python -m benchmarks.find_scu --port P [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anyio
from pydicom.dataset import Dataset

import dicomnet
from benchmarks.find_scp import backend_options


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def find(host: str, port: int, timeout: float, out: dict[str, Any]) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = ""
    query.PatientName = ""
    with anyio.fail_after(timeout):
        async with dicomnet.connect(host, port, aet="BENCHSCU", aec="FINDSCP") as assoc:
            async for _identifier in assoc.find(query, model="patient"):
                out["matches"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    out: dict[str, Any] = {"matches": 0, "error": None}
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        anyio.run(find, args.host, args.port, args.timeout, out, backend_options=backend_options())
    except (dicomnet.DicomNetError, TimeoutError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - cpu0
    out["peak_rss_kib"] = peak_rss_kib()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
