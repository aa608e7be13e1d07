"""The fuzz campaigns' figures in pytest's terminal summary."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    fuzzing = sys.modules.get("tests.formats.fuzzing")
    reports = getattr(fuzzing, "REPORTS", None)
    if not reports:
        return
    terminalreporter.write_sep("-", "fuzz campaigns")
    for r in reports:
        terminalreporter.write_line(r.line())
    total = sum(r.variants for r in reports)
    terminalreporter.write_line(
        f"fuzz total: {total} variants, {sum(r.reads for r in reports)} reads: "
        f"{sum(r.refusals for r in reports)} clean refusals, {sum(r.accepted for r in reports)} accepted, "
        f"{sum(r.raw_count for r in reports)} raw exceptions; CLI: {sum(r.cli_runs for r in reports)} runs, "
        f"{sum(sum(r.cli_bad.values()) for r in reports)} bad")
