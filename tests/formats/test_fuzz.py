"""Malformed files of every dialect and split packages end in a clean refusal, never in a raw exception.

Each campaign mutates lorakit's own files (see :mod:`tests.formats.fuzzing`) with a fixed seed and reads every
variant through the public readers (``lk.load``, ``read_any``, ``inspect``'s ``describe``, the dialect readers, the
package loader, ``join`` and ``recombine``), and every 50th through the CLI in-process. ``make test`` runs 2,000
variants per target; ``make fuzz`` sets ``LORAKIT_FUZZ_N=10000``. The counts are printed in the terminal summary.
"""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from tests.formats.fuzzing import REPORTS, TARGETS, build_seeds, campaign, cli_commands, readers, write_variant

N = int(os.environ.get("LORAKIT_FUZZ_N", "2000"))


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine thread hand-offs cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("target", TARGETS)
def test_seed_files_are_read_by_every_reader_and_the_cli(target, tmp_path):
    """The campaigns start from valid files: every reader and every CLI command accepts each seed."""
    runner = CliRunner()
    for k, seed in enumerate(build_seeds(tmp_path / "seeds")[target]):
        folder = tmp_path / f"v{k}"
        write_variant(folder, seed)
        for read in readers(target):
            read(folder)
        for args in cli_commands(target, folder, tmp_path / f"out{k}", seed):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)


@pytest.mark.fuzz
@pytest.mark.parametrize("target", TARGETS)
def test_malformed_variants_are_refused_cleanly(target, tmp_path, one_thread):
    report = campaign(target, N, tmp_path)
    REPORTS.append(report)
    assert report.variants == N and report.cli_runs >= 2 * (N // 50)
    # the mutations bite (most reads refuse) yet leave some files valid (the generator is not just noise)
    assert report.refusals > report.reads / 2 and report.accepted > 0
    shown = "; ".join(f"{n}× {where} (variant {report.examples[where][0]}: {report.examples[where][1]})"
                      for where, n in report.raw.most_common(5))
    assert report.raw_count == 0, f"{report.line()}: {shown}"
    assert not report.cli_bad, f"{report.line()}: {dict(report.cli_bad)}"
