"""What is measured: the scenarios (S1-S9), the SCU -> SCP pairings, and the ratios.

To add a scenario: a `Scenario` here with a `kind` the SCU drivers in peers.py know
(or a new kind and one method per driver), then name it in the pairings that run it.
To add a pairing: a `Pairing` with an SCU factory and an `SCPSpec` from peers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from benchmarks import peers

Kind = Literal["echo-associations", "echo-one", "store-one", "store-concurrent", "find", "idle"]
DataKey = Literal["sc2k", "ct512k", "big"]


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
    # "big" data (S5): the size of the one instance, MiB (full run, --quick).
    size_mib: int = 0
    quick_size_mib: int = 0
    # store-concurrent (S6): associations at once (full run, --quick); count is the total.
    associations: int = 1
    quick_associations: int = 1
    repetitions: int | None = None  # overrides the run's repetitions (S9: one)
    # Keys of RunRecord.extra shown in the table's "other" column.
    extras: tuple[str, ...] = ()
    optional: bool = False  # run only when asked for (--huge, or --scenario KEY)
    min_timeout: float = 0.0  # at least this per client run, seconds


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
        Scenario("S4-16K", "S4 with the SCP's maximum PDU at 16 KiB (DCMTK's default)",
                 "store-one", 300, 20, "store/s", "ct512k", megabytes=True),
        Scenario("S5", "one 256 MiB multi-frame C-STORE (quick: 32 MiB)", "store-one", 1, 1,
                 "store/s", "big", megabytes=True, size_mib=256, quick_size_mib=32,
                 extras=("scp_rss_growth_mib",)),
        Scenario("S5-2G", "one 2 GiB multi-frame C-STORE (--huge; quick: 256 MiB)", "store-one",
                 1, 1, "store/s", "big", megabytes=True, size_mib=2048, quick_size_mib=256,
                 extras=("scp_rss_growth_mib",), optional=True, min_timeout=900),
        Scenario("S6", "50 associations x 40 x 2 KB C-STORE at once (quick: 10 x 10)",
                 "store-concurrent", 2000, 100, "store/s", "sc2k", associations=50,
                 quick_associations=10),
        Scenario("S7", "one C-FIND with 10,000 matches (quick: 1,000)", "find", 10000, 1000,
                 "resp/s", extras=("scu_peak_rss_mib",)),
        Scenario("S8", "1,000 idle associations held open (quick: 100)", "idle", 1000, 100,
                 "assoc/s", extras=("kib_per_association", "idle_cpu_percent",
                                    "new_association_ms", "scp_threads")),
        Scenario("S9", "one C-FIND with 1,000,000 matches (quick: 50,000)", "find", 1_000_000,
                 50_000, "resp/s", repetitions=1, extras=("scu_peak_rss_mib",),
                 min_timeout=1800),
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
BIG = ("S5", "S5-2G")

# TLS (PS3.15 B.9, BCP 195; client certificates required on every SCP): its cost per
# round trip (S2), on a stream of medium instances (S4) and on one large one (S5).
TLS = ("S2", "S4", "S5")
TLS_DICOMNET = "dicomnet(tls)>dicomnet(tls, no-fsync)"
TLS_DCMTK = "dcmtk(tls)>dcmtk(tls)"

# Reduced counts where a peer is slow enough that the full count would blow the ~10 minute
# budget of a full run without changing the rate: a loop of echoscu processes (S1) is bound
# by process start-up (~45 ms each), and pynetdicom as shipped runs ~100 echo/s and
# ~17 store/s of 2 KB (Nagle's algorithm on). The table shows the counts actually run.
DCMTK_S1 = {"S1": 100}
PYNETDICOM = {"S2": 1000, "S3": 500}

# S8 against the pynetdicom SCP: one thread per association there, so 200 (issue 4's figure).
PYNETDICOM_S8 = {"S8": 200}
PYNETDICOM_S8_QUICK = {"S8": 50}

# P-DATA-TF PDUs of 16 KiB, DCMTK's default maximum: a 512 KB instance in 32 of them, each
# cut by the receive chunks more often than 256 KiB ones.
PDU16K = 16384
SMALL_PDU = ("S4-16K",)

PAIRINGS: tuple[Pairing, ...] = (
    Pairing("dicomnet>dicomnet", peers.DicomnetSCU, peers.dicomnet_scp(fsync=True),
            (*ALL, "S5", "S6", "S8")),
    Pairing("dicomnet>dicomnet(no-fsync)", peers.DicomnetSCU, peers.dicomnet_scp(fsync=False),
            (*STORES, *BIG, "S6")),
    Pairing("dicomnet>dicomnet(workers 2)", peers.DicomnetSCU,
            peers.dicomnet_scp(fsync=True, workers=2), ("S6",)),
    Pairing("dicomnet>dicomnet(workers 2, no-fsync)", peers.DicomnetSCU,
            peers.dicomnet_scp(fsync=False, workers=2), ("S6",)),
    Pairing("dicomnet>dicomnet(no-fsync, 16K PDU)", peers.DicomnetSCU,
            peers.dicomnet_scp(fsync=False, max_pdu=PDU16K), SMALL_PDU),
    Pairing("dcmtk>dicomnet(no-fsync, 16K PDU)", peers.DcmtkSCU,
            peers.dicomnet_scp(fsync=False, max_pdu=PDU16K), SMALL_PDU),
    Pairing("dcmtk>dcmtk(16K PDU)", peers.DcmtkSCU, peers.storescp_scp(max_pdu=PDU16K),
            SMALL_PDU),
    # Both sides on asyncio's own loop (the rows above use uvloop, installed with .[speed]).
    Pairing("dicomnet>dicomnet(asyncio, no-fsync)", lambda: peers.DicomnetSCU(loop="asyncio"),
            peers.dicomnet_scp(fsync=False, loop="asyncio"), ("S2", *STORES, "S6")),
    Pairing("dicomnet>dicomnet(on_find)", lambda: peers.DicomnetSCU("FINDSCP"),
            peers.dicomnet_find_scp(), ("S7", "S9")),
    Pairing("dcmtk>dicomnet", peers.DcmtkSCU, peers.dicomnet_scp(fsync=True),
            (*ALL, "S5", "S6"), DCMTK_S1),
    Pairing("dcmtk>dicomnet(no-fsync)", peers.DcmtkSCU, peers.dicomnet_scp(fsync=False),
            (*STORES, "S5", "S6")),
    Pairing("dcmtk>dicomnet(workers 2)", peers.DcmtkSCU,
            peers.dicomnet_scp(fsync=True, workers=2), ("S6",)),
    Pairing("dcmtk>dicomnet(workers 2, no-fsync)", peers.DcmtkSCU,
            peers.dicomnet_scp(fsync=False, workers=2), ("S6",)),
    Pairing("dcmtk>dicomnet(on_find)", lambda: peers.DcmtkSCU(aec="FINDSCP"),
            peers.dicomnet_find_scp(), ("S7",)),
    Pairing("pynetdicom>pynetdicom", peers.PynetdicomSCU, peers.pynetdicom_scp(),
            (*ALL, "S5", "S6", "S7"), PYNETDICOM),
    Pairing("dicomnet>pynetdicom", peers.DicomnetSCU, peers.pynetdicom_scp(), ("S8",),
            PYNETDICOM_S8, PYNETDICOM_S8_QUICK,
            note="S8: idle associations opened by dicomnet against the pynetdicom SCP"),
    Pairing("dcmtk>dcmtk", peers.DcmtkSCU, peers.storescp_scp(), (*ALL, "S5"), DCMTK_S1),
    Pairing("dcmtk>dcmtk(fork)", peers.DcmtkSCU, peers.storescp_scp(fork=True), ("S6",)),
    Pairing(TLS_DICOMNET, lambda: peers.DicomnetSCU(tls=True),
            peers.dicomnet_scp(fsync=False, tls=True), TLS),
    Pairing("dcmtk(tls)>dicomnet(tls, no-fsync)", lambda: peers.DcmtkSCU(tls=True),
            peers.dicomnet_scp(fsync=False, tls=True), TLS),
    Pairing(TLS_DCMTK, lambda: peers.DcmtkSCU(tls=True), peers.storescp_scp(tls=True), TLS),
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
    # Per-scenario replacements (S7: the dicomnet C-FIND SCP; S6: storescp --fork).
    numerators: Mapping[str, str] = field(default_factory=dict)
    denominators: Mapping[str, str] = field(default_factory=dict)

    def numerator_for(self, scenario: str) -> str:
        if scenario in self.numerators:
            return self.numerators[scenario]
        if scenario in ("S1", "S2") and self.echo_numerator is not None:
            return self.echo_numerator
        return self.numerator

    def denominator_for(self, scenario: str) -> str:
        return self.denominators.get(scenario, self.denominator)


FIND = {"S7": "dicomnet>dicomnet(on_find)"}
FORK = {"S6": "dcmtk>dcmtk(fork)"}

RATIOS: tuple[Ratio, ...] = (
    Ratio("dicomnet pair / pynetdicom pair (neither fsyncs)", "dicomnet>dicomnet(no-fsync)",
          "pynetdicom>pynetdicom", "dicomnet>dicomnet", numerators=FIND),
    # Not for S1: a loop of echoscu processes measures process start-up, not the protocol.
    Ratio("dicomnet pair / DCMTK pair (neither fsyncs)", "dicomnet>dicomnet(no-fsync)",
          "dcmtk>dcmtk", "dicomnet>dicomnet", only=("S2", "S3", "S4", "S5")),
    Ratio("DCMTK SCU: dicomnet SCP / storescp (neither fsyncs)", "dcmtk>dicomnet(no-fsync)",
          "dcmtk>dcmtk", "dcmtk>dicomnet", denominators=FORK),
    Ratio("DCMTK SCU: dicomnet SCP --workers 2 / storescp --fork (neither fsyncs)",
          "dcmtk>dicomnet(workers 2, no-fsync)", "dcmtk>dcmtk(fork)", only=("S6",)),
    Ratio("DCMTK SCU: dicomnet SCP (fsync) / storescp --fork (no fsync)", "dcmtk>dicomnet",
          "dcmtk>dcmtk(fork)", only=("S6",)),
    Ratio("DCMTK SCU: dicomnet SCP --workers 2 (fsync) / storescp --fork (no fsync)",
          "dcmtk>dicomnet(workers 2)", "dcmtk>dcmtk(fork)", only=("S6",)),
    Ratio("dicomnet pair: --workers 2 / 1 process (no fsync)",
          "dicomnet>dicomnet(workers 2, no-fsync)", "dicomnet>dicomnet(no-fsync)", only=("S6",)),
    Ratio("dicomnet pair with fsync / DCMTK pair without", "dicomnet>dicomnet", "dcmtk>dcmtk",
          only=(*STORES, "S5")),
    Ratio("DCMTK as shipped (Nagle): dicomnet SCP / storescp", "dcmtk(nagle)>dicomnet(no-fsync)",
          "dcmtk(nagle)>dcmtk(nagle)"),
    Ratio("dicomnet pair: fsync / no fsync", "dicomnet>dicomnet", "dicomnet>dicomnet(no-fsync)"),
    Ratio("TLS: dicomnet pair / DCMTK pair (neither fsyncs)", TLS_DICOMNET, TLS_DCMTK,
          only=TLS),
    Ratio("TLS, DCMTK SCU: dicomnet SCP / storescp (neither fsyncs)",
          "dcmtk(tls)>dicomnet(tls, no-fsync)", TLS_DCMTK, only=TLS),
    Ratio("dicomnet pair: TLS / plain (no fsync)", TLS_DICOMNET, "dicomnet>dicomnet(no-fsync)",
          only=TLS, denominators={"S2": "dicomnet>dicomnet"}),
    Ratio("DCMTK pair: TLS / plain", TLS_DCMTK, "dcmtk>dcmtk", only=TLS),
    Ratio("16 KiB PDUs: dicomnet pair / DCMTK pair (neither fsyncs)",
          "dicomnet>dicomnet(no-fsync, 16K PDU)", "dcmtk>dcmtk(16K PDU)", only=SMALL_PDU),
    Ratio("16 KiB PDUs, DCMTK SCU: dicomnet SCP / storescp (neither fsyncs)",
          "dcmtk>dicomnet(no-fsync, 16K PDU)", "dcmtk>dcmtk(16K PDU)", only=SMALL_PDU),
    Ratio("dicomnet pair: asyncio / uvloop (no fsync)", "dicomnet>dicomnet(asyncio, no-fsync)",
          "dicomnet>dicomnet(no-fsync)", denominators={"S2": "dicomnet>dicomnet"}),
)  # fmt: skip
