"""What is measured: the scenarios (S1-S4), the SCU -> SCP pairings, and the ratios.

To add a scenario: a `Scenario` here with a `kind` the SCU drivers in peers.py know
(or a new kind and one method per driver), then name it in the pairings that run it.
To add a pairing: a `Pairing` with an SCU factory and an `SCPSpec` from peers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from benchmarks import peers

Kind = Literal["echo-associations", "echo-one", "store-one"]
DataKey = Literal["sc2k", "ct512k"]


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    kind: Kind
    count: int
    quick_count: int
    unit: str
    data: DataKey | None = None
    megabytes: bool = False  # also report MB/s (10^6 bytes of data sets per second)


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario("S1", "300 associations x 1 C-ECHO, sequential", "echo-associations", 300, 20,
                 "assoc/s"),
        Scenario("S2", "3,000 C-ECHO on one association", "echo-one", 3000, 200, "echo/s"),
        Scenario("S3", "2,000 x 2 KB C-STORE on one association", "store-one", 2000, 100,
                 "store/s", "sc2k"),
        Scenario("S4", "300 x 512 KB CT C-STORE on one association", "store-one", 300, 20,
                 "store/s", "ct512k", megabytes=True),
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pairing:
    """One SCU against one SCP, for some scenarios.

    `counts` overrides the scenario counts (full run) and `repetitions` the run's
    repetitions: used for the slow "as shipped" DCMTK rows, which are informative only.
    """

    key: str
    scu: Callable[[], peers.SCU]
    scp: peers.SCPSpec
    scenarios: tuple[str, ...]
    counts: Mapping[str, int] = field(default_factory=dict)
    quick_counts: Mapping[str, int] = field(default_factory=dict)
    repetitions: int | None = None
    note: str = ""


ALL = ("S1", "S2", "S3", "S4")
STORES = ("S3", "S4")

# Reduced counts where a peer is slow enough that the full count would blow the ~10 minute
# budget of a full run without changing the rate: a loop of echoscu processes (S1) is bound
# by process start-up (~45 ms each), and pynetdicom as shipped runs ~100 echo/s and
# ~17 store/s of 2 KB (Nagle's algorithm on). The table shows the counts actually run.
DCMTK_S1 = {"S1": 100}
PYNETDICOM = {"S2": 1000, "S3": 500}

PAIRINGS: tuple[Pairing, ...] = (
    Pairing("dicomnet>dicomnet", peers.DicomnetSCU, peers.dicomnet_scp(fsync=True), ALL),
    Pairing("dicomnet>dicomnet(no-fsync)", peers.DicomnetSCU, peers.dicomnet_scp(fsync=False),
            STORES),
    Pairing("dcmtk>dicomnet", peers.DcmtkSCU, peers.dicomnet_scp(fsync=True), ALL, DCMTK_S1),
    Pairing("dcmtk>dicomnet(no-fsync)", peers.DcmtkSCU, peers.dicomnet_scp(fsync=False), STORES),
    Pairing("pynetdicom>pynetdicom", peers.PynetdicomSCU, peers.pynetdicom_scp(), ALL,
            PYNETDICOM),
    Pairing("dcmtk>dcmtk", peers.DcmtkSCU, peers.storescp_scp(), ALL, DCMTK_S1),
    # DCMTK as shipped: Nagle's algorithm on (no TCP_NODELAY in the environment). ~45-90 ms
    # per round trip, so reduced counts and one repetition: shows the effect, nothing more.
    Pairing("dcmtk(nagle)>dicomnet(no-fsync)", lambda: peers.DcmtkSCU(nodelay=False),
            peers.dicomnet_scp(fsync=False), ("S2", "S3"), {"S2": 100, "S3": 100},
            {"S2": 10, "S3": 10}, 1, "DCMTK as shipped (Nagle on), reduced counts"),
    Pairing("dcmtk(nagle)>dcmtk(nagle)", lambda: peers.DcmtkSCU(nodelay=False),
            peers.storescp_scp(nodelay=False), ("S2", "S3"), {"S2": 100, "S3": 100},
            {"S2": 10, "S3": 10}, 1, "DCMTK as shipped (Nagle on), reduced counts"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Ratio:
    """rate(numerator pairing) / rate(denominator pairing), per scenario where both ran."""

    label: str
    numerator: str
    denominator: str
    # For S1/S2 (no storage) the numerator may be taken from another pairing.
    echo_numerator: str | None = None
    only: tuple[str, ...] | None = None  # restrict to these scenarios

    def numerator_for(self, scenario: str) -> str:
        if scenario in ("S1", "S2") and self.echo_numerator is not None:
            return self.echo_numerator
        return self.numerator


RATIOS: tuple[Ratio, ...] = (
    Ratio("dicomnet pair / pynetdicom pair (neither fsyncs)", "dicomnet>dicomnet(no-fsync)",
          "pynetdicom>pynetdicom", "dicomnet>dicomnet"),
    # Not for S1: a loop of echoscu processes measures process start-up, not the protocol.
    Ratio("dicomnet pair / DCMTK pair (neither fsyncs)", "dicomnet>dicomnet(no-fsync)",
          "dcmtk>dcmtk", "dicomnet>dicomnet", only=("S2", "S3", "S4")),
    Ratio("DCMTK SCU: dicomnet SCP / storescp (neither fsyncs)", "dcmtk>dicomnet(no-fsync)",
          "dcmtk>dcmtk", "dcmtk>dicomnet"),
    Ratio("dicomnet pair with fsync / DCMTK pair without", "dicomnet>dicomnet", "dcmtk>dcmtk",
          only=STORES),
    Ratio("DCMTK as shipped (Nagle): dicomnet SCP / storescp", "dcmtk(nagle)>dicomnet(no-fsync)",
          "dcmtk(nagle)>dcmtk(nagle)"),
    Ratio("dicomnet pair: fsync / no fsync", "dicomnet>dicomnet", "dicomnet>dicomnet(no-fsync)"),
)  # fmt: skip
