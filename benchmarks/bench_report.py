"""From the runs of compare.py to medians, ratios and Markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench_procs import Sample
from bench_scenarios import Workload

SEQUENTIAL, MIGRATOR, BARE = "sequential loop", "migrator", "bare loop"
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
        f"Medians of {_reps(result)} runs each, contenders alternating. Ratios are each "
        f"median ÷ the {work.reference}'s (above 1: more time, CPU or memory than it)."
    )
    by_name = {row.contender: row for row in rows}
    seq, mig, bare = (by_name.get(name) for name in (SEQUENTIAL, MIGRATOR, BARE))
    if seq and mig and bare and seq.ok and mig.ok and bare.ok:
        lines.append(
            f"Sequential loop time ÷ migrator time: **{seq.wall / mig.wall:.1f}**; "
            f"÷ bare loop time: {seq.wall / bare.wall:.1f}."
        )
    lines += list(work.notes)
    problems = [run for run in result.runs if run.problem is not None]
    if problems:
        lines += ["", "Runs that do not count:"]
        lines += [f"- {run.contender}, run {run.rep + 1}: {run.problem}" for run in problems]
    return "\n".join(lines) + "\n"


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
