"""From the runs of compare.py to medians, ratios and Markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench_procs import Sample
from bench_scenarios import Workload

SEQUENTIAL, MIGRATOR, BARE, CURL_F = "sequential loop", "migrator", "bare loop", "curl -F"
DASH = "\N{EN DASH}"  # an empty cell, and min-max


@dataclass(frozen=True, slots=True)
class Run:
    contender: str
    rep: int
    sample: Sample
    server_cpu: float  # CPU seconds the emulator spent during the run
    uploads: int | None  # uploads the emulator counted during the run (None: not counted)
    problem: str | None  # why the run does not count, or None


@dataclass(frozen=True, slots=True)
class Result:
    workload: Workload
    runs: tuple[Run, ...]


@dataclass(frozen=True, slots=True)
class Figures:
    """The medians of one contender's good runs."""

    contender: str
    ok: int
    total: int
    wall: float
    wall_min: float
    wall_max: float
    cpu: float
    rss: float
    server_cpu: float


def figures(result: Result) -> list[Figures]:
    table = []
    for contender in result.workload.contenders:
        mine = [run for run in result.runs if run.contender == contender.name]
        good = [run for run in mine if run.problem is None]
        if not good:
            table.append(Figures(contender.name, 0, len(mine), *([float("nan")] * 6)))
            continue
        walls = [run.sample.wall for run in good]
        table.append(
            Figures(
                contender.name,
                len(good),
                len(mine),
                statistics.median(walls),
                min(walls),
                max(walls),
                statistics.median(run.sample.cpu for run in good),
                statistics.median(run.sample.max_rss for run in good),
                statistics.median(run.server_cpu for run in good),
            )
        )
    return table


def _ratio(value: float, reference: float) -> str:
    if reference != reference or value != value or reference <= 0:  # nan or zero
        return DASH
    return f"{value / reference:.2f}"


def _number(value: float) -> str:
    """Three significant digits below 1,000; whole numbers above."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _ok(row: Figures) -> str:
    return "" if row.ok == row.total else f" ({row.ok}/{row.total} ok)"


def render(result: Result) -> str:
    work = result.workload
    rows = figures(result)
    ref = next((row for row in rows if row.contender == work.reference), None)
    lines = [f"### {work.title}, {work.condition.label}", ""]
    if work.scenario == "startup":
        lines += _startup_table(rows, ref)
    else:
        lines += _table(work, rows, ref)
    lines.append("")
    lines.append(
        f"Medians of {_reps(result)} runs each, contenders alternating. Ratios: each median "
        f"÷ that of `{work.reference}` (above 1: more time, CPU or memory than it)."
    )
    by_name = {row.contender: row for row in rows if row.ok}
    seq, mig, bare, curl = (by_name.get(name) for name in (SEQUENTIAL, MIGRATOR, BARE, CURL_F))
    if seq and mig and bare:
        lines.append(
            f"Sequential loop time ÷ migrator time: **{seq.wall / mig.wall:.1f}**; "
            f"÷ bare loop time: {seq.wall / bare.wall:.1f}."
        )
    if curl and mig:
        lines.append(f"migrator time ÷ `curl -F` time: **{mig.wall / curl.wall:.2f}**.")
    lines += list(work.notes)
    problems = [run for run in result.runs if run.problem is not None]
    if problems:
        lines += ["", "Runs that do not count:"]
        lines += [f"- {run.contender}, run {run.rep + 1}: {run.problem}" for run in problems]
    return "\n".join(lines) + "\n"


def targets(results: list[Result]) -> list[str]:
    """Issue 15's targets, beside what this run measured of each."""
    found = {(r.workload.scenario, r.workload.condition.kind): r for r in results}
    rows: list[tuple[str, str, str]] = []

    def good(key: tuple[str, str], *names: str) -> tuple[Result, list[Figures]] | None:
        result = found.get(key)
        if result is None:
            return None
        by_name = {row.contender: row for row in figures(result) if row.ok}
        if not all(name in by_name for name in names):
            return None
        return result, [by_name[name] for name in names]

    if got := good(("small", "loopback"), MIGRATOR, BARE):
        result, (mig, bare) = got
        title, items = result.workload.title, result.workload.items
        rows.append(
            (f"{title}: bare loop time ÷ migrator time", f"{bare.wall / mig.wall:.2f}", "≥ 1.0")
        )
        rows.append(
            (f"{title}: client CPU, migrator ÷ bare loop", f"{mig.cpu / bare.cpu:.2f}", "≤ 1.3")
        )
        rows.append(
            (
                f"the emulator: small uploads a second its CPU allows (1 ÷ its CPU per upload, "
                f"bare loop runs of {title})",
                f"{items / bare.server_cpu:,.0f}" if bare.server_cpu else DASH,
                "≥ 2,000",
            )
        )
    if got := good(("small", "rtt"), MIGRATOR, SEQUENTIAL):
        result, (mig, seq) = got
        label = f"{result.workload.title}, {result.workload.condition.label}"
        rows.append(
            (f"{label}: sequential loop time ÷ migrator time", f"{seq.wall / mig.wall:.1f}", "≥ 12")
        )
    if got := good(("big", "loopback"), MIGRATOR, CURL_F):
        result, (mig, curl) = got
        rows.append(
            (
                f"{result.workload.title}: migrator time ÷ `curl -F` time; migrator peak RSS",
                f"{mig.wall / curl.wall:.2f}; {mig.rss / 1e6:.0f} MB",
                "≤ 1.3; < 80 MB",
            )
        )
    if got := good(("noop", "local"), MIGRATOR):
        result, (mig,) = got
        uploads = {run.uploads for run in result.runs if run.contender == MIGRATOR}
        rows.append(
            (
                f"{result.workload.title}: migrator time; uploads",
                f"{mig.wall:.2f} s; {', '.join(str(n) for n in sorted(uploads, key=str))}",
                "< 1.5 s; 0",
            )
        )
    if got := good(("startup", "local"), "migrator --version", "migrator --help"):
        _, (version, help_) = got
        rows.append(
            (
                "`migrator --version` / `--help`",
                f"{version.wall:.2f} s / {help_.wall:.2f} s",
                "< 0.25 s",
            )
        )
    if got := good(("plan", "local"), "migrator plan"):
        result, (plan,) = got
        rows.append(
            (
                f"`migrator {result.workload.title}`: time; peak RSS",
                f"{plan.wall:.1f} s; {plan.rss / 1e6:.0f} MB",
                "< 4 s; < 100 MB",
            )
        )
    if not rows:
        return []
    lines = ["| work | measured here | target |", "|---|--:|--:|"]
    lines += [f"| {work} | {measured} | {target} |" for work, measured, target in rows]
    return lines


def _reps(result: Result) -> int:
    return max((run.rep for run in result.runs), default=-1) + 1


def _table(work: Workload, rows: list[Figures], ref: Figures | None) -> list[str]:
    # CPU per 1,000 items; for a workload of one item (the big file), per item.
    per, per_k = (" / 1k items", 1000 / work.items) if work.items > 1 else ("", 1.0)
    lines = [
        f"| contender | wall s (min{DASH}max) | files/s | MB/s | CPU s{per} | peak RSS MB "
        f"| emulator CPU s{per} | time ÷ ref | CPU ÷ ref | RSS ÷ ref |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        if not row.ok:
            lines.append(f"| {row.contender} | failed{_ok(row)} |" + f" {DASH} |" * 8)
            continue
        mbs = _number(work.payload / 1e6 / row.wall) if work.payload else DASH
        lines.append(
            f"| {row.contender} | {row.wall:.2f} ({row.wall_min:.2f}{DASH}{row.wall_max:.2f})"
            f"{_ok(row)} | {_number(work.items / row.wall)} | {mbs} "
            f"| {row.cpu * per_k:.3f} | {row.rss / 1e6:.0f} "
            f"| {row.server_cpu * per_k:.3f} "
            f"| {_ratio(row.wall, ref.wall) if ref else DASH} "
            f"| {_ratio(row.cpu, ref.cpu) if ref else DASH} "
            f"| {_ratio(row.rss, ref.rss) if ref else DASH} |"
        )
    return lines


def _startup_table(rows: list[Figures], ref: Figures | None) -> list[str]:
    lines = [
        f"| command | wall ms (min{DASH}max) | CPU ms | peak RSS MB | time ÷ ref |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        if not row.ok:
            lines.append(f"| {row.contender} | failed{_ok(row)} |" + f" {DASH} |" * 3)
            continue
        lines.append(
            f"| {row.contender} | {row.wall * 1000:.0f} "
            f"({row.wall_min * 1000:.0f}{DASH}{row.wall_max * 1000:.0f}){_ok(row)} "
            f"| {row.cpu * 1000:.0f} | {row.rss / 1e6:.0f} "
            f"| {_ratio(row.wall, ref.wall) if ref else DASH} |"
        )
    return lines


def raw(results: list[Result]) -> list[dict[str, object]]:
    """Every run, for --json."""
    return [
        {
            "scenario": result.workload.scenario,
            "title": result.workload.title,
            "condition": result.workload.condition.kind,
            "items": result.workload.items,
            "payload": result.workload.payload,
            "contender": run.contender,
            "rep": run.rep,
            "wall": run.sample.wall,
            "cpu": run.sample.cpu,
            "max_rss": run.sample.max_rss,
            "emulator_cpu": run.server_cpu,
            "uploads": run.uploads,
            "problem": run.problem,
        }
        for result in results
        for run in result.runs
    ]
