"""What an observer costs: N C-ECHOs and N C-STOREs over loopback, in one process,
without an observer, with the no-op `Observer`, and with `PrometheusObserver` (on both
the SCU and the SCP), rounds interleaved; prints the best round of each in µs/operation.

    python -m benchmarks.observer [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicomnet
from dicomnet.proto.contexts import VERIFICATION, PresentationContext

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _instance() -> Dataset:
    """A ~2 KB Secondary Capture instance (as S3 of the benchmarks)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "BENCH^OBSERVER"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 48, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(48 * 32)
    return ds


def _observers(kind: str) -> tuple[Any, Any]:
    if kind == "none":
        return None, None
    if kind == "no-op":
        return dicomnet.Observer(), dicomnet.Observer()
    from dicomnet.metrics import PrometheusObserver

    return PrometheusObserver(), PrometheusObserver()


async def _round(kind: str, count: int, instance: Dataset) -> tuple[float, float]:
    """Seconds per C-ECHO and per C-STORE with observers of `kind`."""
    scp_observer, scu_observer = _observers(kind)
    ae = dicomnet.AE("BENCH", **({"observer": scp_observer} if scp_observer else {}))

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        return 0

    contexts = [
        PresentationContext(VERIFICATION),
        PresentationContext(SECONDARY_CAPTURE, (ExplicitVRLittleEndian,)),
    ]
    extra = {"observer": scu_observer} if scu_observer else {}
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts, **extra) as a:
            for _ in range(50):  # warm up
                await a.echo()
            start = time.perf_counter()
            for _ in range(count):
                await a.echo()
            echo = (time.perf_counter() - start) / count
            start = time.perf_counter()
            for _ in range(count):
                await a.store(instance)
            stored = (time.perf_counter() - start) / count
    return echo, stored


async def _main(count: int, rounds: int) -> None:
    kinds = ("none", "no-op", "prometheus")
    best = {kind: [float("inf"), float("inf")] for kind in kinds}
    instance = _instance()
    for _ in range(rounds):
        for kind in kinds:
            echo, stored = await _round(kind, count, instance)
            best[kind] = [min(best[kind][0], echo), min(best[kind][1], stored)]
    print(f"{count} operations a round, best of {rounds} rounds (µs per operation)")
    print(f"{'observer':<12}{'C-ECHO':>10}{'C-STORE':>10}")
    for kind in kinds:
        echo, stored = best[kind]
        print(f"{kind:<12}{echo * 1e6:>10.1f}{stored * 1e6:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    anyio.run(_main, args.count, args.rounds)


if __name__ == "__main__":
    main()
