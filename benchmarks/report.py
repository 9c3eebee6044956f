"""Records of single runs, medians over repetitions, and the text / markdown / JSON output."""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from benchmarks.scenarios import PAIRINGS, RATIOS, SCENARIOS


@dataclass(slots=True)
class RunRecord:
    """One repetition of one scenario for one pairing."""

    pairing: str
    scenario: str
    repetition: int
    count: int
    seconds: float
    ok: int
    failed: int
    rate: float  # operations (associations, echoes, stores) per second
    mb_per_s: float | None  # data set megabytes (10^6 bytes) per second, store scenarios
    scu_cpu_seconds: float
    scp_cpu_seconds: float | None  # since the SCP was listening
    scp_peak_rss_kib: int | None  # VmHWM just before stopping the SCP
    stored: int | None  # files found in the SCP's storage folder afterwards
    errors: list[str] = field(default_factory=list)
    scp_log_issues: list[str] = field(default_factory=list)  # warning/error lines of the SCP
    # Scenario-specific figures: scp_rss_growth_mib (VmHWM at the end - VmRSS once
    # listening), scu_peak_rss_mib, S8's kib_per_association, idle_cpu_percent, ...
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Summary:
    """Medians over the repetitions of one (pairing, scenario)."""

    pairing: str
    scenario: str
    scu: str
    scp: str
    durability: str
    count: int
    repetitions: int
    clean_repetitions: int  # without failures or errors; medians are over these if any
    rate: float
    rate_min: float
    rate_max: float
    mb_per_s: float | None
    scu_cpu_seconds: float
    scp_cpu_seconds: float | None
    scp_peak_rss_mib: float | None  # the largest over repetitions
    failed: int
    errors: list[str]
    note: str
    # Medians of RunRecord.extra over the same repetitions as `rate`; the RSS figures
    # (keys containing "rss") are the largest over the repetitions instead.
    extra: dict[str, float] = field(default_factory=dict)


def _extras(basis: list[RunRecord], runs: list[RunRecord]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r.extra})
    out: dict[str, float] = {}
    for key in keys:
        if "rss" in key:
            values = [r.extra[key] for r in runs if key in r.extra]
            out[key] = max(values)
        else:
            values = [r.extra[key] for r in basis if key in r.extra]
            if values:
                out[key] = statistics.median(values)
    return out


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run_config(
    started: datetime, load: str, quick: bool, repetitions: int, elapsed: float
) -> dict[str, Any]:
    """How a benchmark run was made, for its JSON."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "load": load,
        "quick": quick,
        "repetitions": repetitions,
        "elapsed_seconds": round(elapsed, 1),
        "argv": sys.argv,
    }


def summarise(records: list[RunRecord]) -> list[Summary]:
    pairings = {p.key: p for p in PAIRINGS}
    out: list[Summary] = []
    for pairing in PAIRINGS:
        for scenario in pairing.scenarios:
            runs = [r for r in records if r.pairing == pairing.key and r.scenario == scenario]
            if not runs:
                continue
            # Medians over the repetitions without failures when there is one: a repetition
            # that hit a timeout measures the timeout. Failed ones stay in `failed`/`errors`.
            clean = [r for r in runs if not r.failed and not r.errors]
            basis = clean or runs
            rates = [r.rate for r in basis]
            rss = [r.scp_peak_rss_kib for r in runs if r.scp_peak_rss_kib is not None]
            errors: list[str] = []
            for r in runs:
                errors.extend(f"rep {r.repetition}: {e}" for e in r.errors)
                errors.extend(f"rep {r.repetition}: SCP log: {e}" for e in r.scp_log_issues)
            p = pairings[pairing.key]
            out.append(
                Summary(
                    pairing=pairing.key,
                    scenario=scenario,
                    scu=p.scu().label,
                    scp=p.scp.label,
                    durability=p.scp.durability,
                    count=runs[0].count,
                    repetitions=len(runs),
                    clean_repetitions=len(clean),
                    rate=statistics.median(rates),
                    rate_min=min(rates),
                    rate_max=max(rates),
                    mb_per_s=_median_or_none([r.mb_per_s for r in basis]),
                    scu_cpu_seconds=statistics.median(r.scu_cpu_seconds for r in basis),
                    scp_cpu_seconds=_median_or_none([r.scp_cpu_seconds for r in basis]),
                    scp_peak_rss_mib=max(rss) / 1024 if rss else None,
                    failed=sum(r.failed for r in runs),
                    errors=errors,
                    note=p.note,
                    extra=_extras(basis, runs),
                )
            )
    return out


def scenarios_run(summaries: list[Summary]) -> list[str]:
    """The scenarios present in `summaries`, in the order of SCENARIOS."""
    present = {s.scenario for s in summaries}
    return [k for k in SCENARIOS if k in present]


def ratios(summaries: list[Summary]) -> list[tuple[str, dict[str, float | None]]]:
    """For each ratio of scenarios.RATIOS: {scenario: numerator rate / denominator rate},
    over the scenarios that ran."""
    by_key = {(s.pairing, s.scenario): s for s in summaries}
    rows: list[tuple[str, dict[str, float | None]]] = []
    for ratio in RATIOS:
        values: dict[str, float | None] = {}
        for scenario in scenarios_run(summaries):
            if ratio.only is not None and scenario not in ratio.only:
                values[scenario] = None
                continue
            num = by_key.get((ratio.numerator_for(scenario), scenario))
            den = by_key.get((ratio.denominator_for(scenario), scenario))
            usable = (
                num is not None
                and den is not None
                and num.clean_repetitions > 0
                and den.clean_repetitions > 0
                and den.rate > 0
            )
            # No ratio from repetitions that all failed: their rate measures a timeout.
            values[scenario] = num.rate / den.rate if usable and num and den else None
        if any(v is not None for v in values.values()):
            rows.append((ratio.label, values))
    return rows


# --- formatting ----------------------------------------------------------------------------


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value >= 100:
        text = f"{value:,.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return text + unit


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


RATE_HEADERS = (
    "scen",
    "SCU > SCP",
    "n x reps",
    "rate (median)",
    "min-max",
    "MB/s",
    "SCU CPU s",
    "SCP CPU s",
    "SCP peak RSS",
    "failed",
    "other",
)

# How RunRecord.extra keys are shown in the "other" column.
_EXTRA_FORMAT: dict[str, tuple[str, str]] = {
    "scp_rss_growth_mib": ("SCP RSS growth", " MiB"),
    "scu_peak_rss_mib": ("SCU peak RSS", " MiB"),
    "kib_per_association": ("", " KiB/assoc"),
    "idle_cpu_percent": ("idle CPU", " %"),
    "new_association_ms": ("new assoc+echo", " ms"),
    "scp_threads": ("SCP threads", ""),
}


def _other(s: Summary) -> str:
    parts: list[str] = []
    for key in SCENARIOS[s.scenario].extras:
        if key in s.extra:
            label, unit = _EXTRA_FORMAT.get(key, (key, ""))
            parts.append(f"{label} {_num(s.extra[key])}{unit}".strip())
    return "; ".join(parts) or "-"


def rate_rows(summaries: list[Summary]) -> list[list[str]]:
    rows: list[list[str]] = []
    for s in sorted(summaries, key=lambda s: (s.scenario, _pairing_order(s.pairing))):
        unit = SCENARIOS[s.scenario].unit
        rows.append(
            [
                s.scenario,
                s.pairing,
                f"{s.count} x {s.repetitions}"
                + ("" if s.clean_repetitions == s.repetitions else f" ({s.clean_repetitions} ok)"),
                f"{_num(s.rate)} {unit}",
                f"{_num(s.rate_min)}-{_num(s.rate_max)}",
                _num(s.mb_per_s),
                _num(s.scu_cpu_seconds),
                _num(s.scp_cpu_seconds),
                _num(s.scp_peak_rss_mib, " MiB"),
                str(s.failed),
                _other(s),
            ]
        )
    return rows


def ratio_rows(summaries: list[Summary]) -> list[list[str]]:
    keys = scenarios_run(summaries)
    return [[label, *(_ratio(values[k]) for k in keys)] for label, values in ratios(summaries)]


def _pairing_order(key: str) -> int:
    return [p.key for p in PAIRINGS].index(key)


def text_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [max([len(str(h)), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths, strict=True)):
            cells.append(cell.ljust(w) if i < 3 or i == len(row) - 1 else cell.rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def markdown_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def durability_lines(summaries: list[Summary]) -> list[str]:
    seen: dict[str, str] = {}
    for s in summaries:
        seen.setdefault(s.scp, s.durability)
    return [f"{scp}: {durability}" for scp, durability in seen.items()]


def render_text(machine: str, summaries: list[Summary]) -> str:
    parts = [
        machine,
        "",
        text_table(RATE_HEADERS, rate_rows(summaries)),
        "",
        text_table(["ratio (rates, median)", *scenarios_run(summaries)], ratio_rows(summaries)),
        "",
        "SCP durability: " + "; ".join(durability_lines(summaries)),
        "",
        "Failures and errors: " + ("none" if not failure_lines(summaries) else ""),
        *(f"  {line}" for line in failure_lines(summaries)),
    ]
    return "\n".join(parts)


def failure_lines(summaries: list[Summary], per_row: int = 3) -> list[str]:
    return [
        f"{s.scenario} {s.pairing}: {s.failed} failed; " + " | ".join(s.errors[:per_row])
        for s in summaries
        if s.failed or s.errors
    ]


def render_markdown(machine: str, date: str, summaries: list[Summary]) -> str:
    ran = scenarios_run(summaries)
    scen = "\n".join(
        f"- **{SCENARIOS[k].key}**: {SCENARIOS[k].title} ({SCENARIOS[k].unit})" for k in ran
    )
    durability = "\n".join(f"- {line}" for line in durability_lines(summaries))
    failures = failure_lines(summaries)
    fail_text = "\n\n" + "\n".join(f"- {line}" for line in failures) if failures else "none"
    return "\n".join(
        [
            f"Run {date}. {machine}",
            "",
            scen,
            "",
            markdown_table(RATE_HEADERS, rate_rows(summaries)),
            "",
            markdown_table(["ratio (median rates)", *ran], ratio_rows(summaries)),
            "",
            "SCP durability:",
            "",
            durability,
            "",
            f"Failures and errors: {fail_text}",
            "",
        ]
    )


def to_json(
    machine: dict[str, Any], config: dict[str, Any], records: list[RunRecord]
) -> dict[str, Any]:
    summaries = summarise(records)
    return {
        "machine": machine,
        "config": config,
        "scenarios": {k: asdict(s) for k, s in SCENARIOS.items()},
        "summaries": [asdict(s) for s in summaries],
        "ratios": [{"label": label, "values": values} for label, values in ratios(summaries)],
        "runs": [asdict(r) for r in records],
    }
